    let c = i % {w}u;
    let t = select({last_step}u, 0u, c >= {dir_w}u);
    let v = {src}[((i / {w}u) * {steps}u + t) * {w}u + c];
