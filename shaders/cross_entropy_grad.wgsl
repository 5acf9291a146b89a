{main}    let r = i;
    var m = -FLT_MAX;
    for (var c = 0u; c < opaque_trips({v}u); c = c + 1u) {
        m = max(m, {logit});
    }
    var s = 0.0;
    for (var c = 0u; c < opaque_trips({v}u); c = c + 1u) {
        s = s + exp({logit} - m);
    }
    let lse = m + log(s);
    let scale = {g}[0] / {n};
    let t = {targets}[r];
    for (var c = 0u; c < opaque_trips({v}u); c = c + 1u) {
        {store}
    }
}
