fn load_a(bi: u32, m: u32, k: u32) -> f32 {
    if (m < M && k < K) {
        return {a};
    }
    return 0.0;
}

fn load_b(bi: u32, k: u32, n: u32) -> f32 {
    if (n < N && k < K) {
        return {b};
    }
    return 0.0;
}
