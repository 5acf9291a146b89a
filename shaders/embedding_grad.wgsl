{main}    let tok = i;
    for (var c = 0u; c < opaque_trips({d}u); c = c + 1u) {
        {zero}
    }
    for (var j = 0u; j < {n_ids}u; j = j + 1u) {
        if ({ids}[j] == tok) {
            for (var c = 0u; c < opaque_trips({d}u); c = c + 1u) {
                {acc}
            }
        }
    }
}
