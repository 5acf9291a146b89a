    let base = {base_expr};
    var v = 0.0;
    for (var r = 0u; r < {count}u; r = r + 1u) {
        v = v + {term};
    }
