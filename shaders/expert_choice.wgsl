    let tok = i / {e}u;
    let ex = i % {e}u;
    let s = {x}[i];
    var rank = 0u;
    for (var u = 0u; u < {t}u; u = u + 1u) {
        let o = {x}[u * {e}u + ex];
        if (o > s || (o == s && u < tok)) {
            rank = rank + 1u;
        }
    }
    let v = select({none}u, ex, rank < {capacity}u);
