fn {name}(i: u32) -> f32 {
    let d = i % {hd}u;
    let pos = f32((i / {row}u) % {t}u);
    let j = d % {half}u;
    let inv = exp2(-f32(2u * j) / {hd_f} * log2({theta}));
    let ang = {sign}pos * inv;
    let x = {x};
    if (d < {half}u) {
        return x * cos(ang) - {x_hi} * sin(ang);
    }
    return x * cos(ang) + {x_lo} * sin(ang);
}

