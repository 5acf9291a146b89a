fn kept(e: u32, s: u32, seen: u32) -> bool {
    return seen < CAPACITY;
}

