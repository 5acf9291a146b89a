    let r = {route}[{slot_row_at}u + i];
    var v = 0.0;
    if (r != {none}u) {
        let t = i / {k}u;
        for (var c = 0u; c < opaque_trips({d}u); c = c + 1u) {
            v = v + {dy_at} * {yp_at};
        }
    }
