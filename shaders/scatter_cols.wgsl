    let t = i / {cols}u;
    let c = i % {cols}u;
    var v = 0.0;
    for (var j = 0u; j < {k}u; j = j + 1u) {
        if ({idx}[t * {k}u + j] == c) {
            v = v + {g}[t * {k}u + j];
        }
    }
