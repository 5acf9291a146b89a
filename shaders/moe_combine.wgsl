    let t = i / {d}u;
    var v = 0.0;
    for (var j = 0u; j < {k}u; j = j + 1u) {
        let r = {route}[{slot_row_at}u + t * {k}u + j];
        if (r != {none}u) {
            v = v + {w_at} * {yp_at};
        }
    }
