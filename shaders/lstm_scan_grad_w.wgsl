    let r = i / {h}u;
    let k = i % {h}u;
    var v = 0.0;
    for (var bi = 0u; bi < {bs}u; bi = bi + 1u) {
        for (var s = 1u; s < {t}u; s = s + 1u) {
            let row = bi * {t}u + {step};
            let prow = bi * {t}u + {prev};
            v = v + {dg}[row * {gates}u + r] * {rec}[prow * {rec_width}u + {h_at}u + k];
        }
    }
