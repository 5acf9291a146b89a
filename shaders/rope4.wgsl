fn {name}(q: u32) -> vec4<f32> {
    let i = q * 4u;
    let d = i % {hd}u;
    let pos = f32((i / {row}u) % {t}u);
    let j = vec4<u32>(d % {half}u) + vec4<u32>(0u, 1u, 2u, 3u);
    let inv = exp2(-vec4<f32>(2u * j) / {hd_f} * log2({theta}));
    let ang = {sign}pos * inv;
    let x = {x};
    if (d < {half}u) {
        return x * cos(ang) - {x_hi} * sin(ang);
    }
    return x * cos(ang) + {x_lo} * sin(ang);
}
