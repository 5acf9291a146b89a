    red[lid] = {acc};
    workgroupBarrier();
    for (var s = {half}u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = {combined};
        }
        workgroupBarrier();
    }
    let {name} = red[0];
    workgroupBarrier();
