    let c = i % {w}u;
    let t = (i / {w}u) % {steps}u;
    let last = select({last_step}u, 0u, c >= {dir_w}u);
    let v = select(0.0, {src}[(i / ({w}u * {steps}u)) * {w}u + c], t == last);
