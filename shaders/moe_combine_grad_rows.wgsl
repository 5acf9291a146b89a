    let slot = {route}[{row_slot_at}u + i / {d}u];
    var v = 0.0;
    if (slot != {none}u) {
        v = {w_at} * {dy_at};
    }
