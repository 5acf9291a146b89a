fn kept(e: u32, s: u32, seen: u32) -> bool {
    var rank = 0u;
    for (var o = 0u; o < opaque_trips(T * KK); o = o + 1u) {
        if (idx[o] == e && (prio[o] > prio[s] || (prio[o] == prio[s] && o < s))) {
            rank = rank + 1u;
        }
    }
    return rank < CAPACITY;
}

