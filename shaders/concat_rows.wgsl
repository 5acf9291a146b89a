    var v = 0.0;
    if (i < {split}u) {
        v = {upper_at};
    } else {
        v = {lower_at};
    }
