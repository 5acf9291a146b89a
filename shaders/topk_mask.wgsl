    let t = i / {experts}u;
    let e = i % {experts}u;
    var v = 0.0;
    for (var j = 0u; j < {k}u; j = j + 1u) {
        if ({idx}[t * {k}u + j] == e) {
            v = 1.0;
        }
    }
