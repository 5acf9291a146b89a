// Sum over a 256-invocation workgroup in a fixed tree order (deterministic): every invocation passes
// its partial and gets the total. Has barriers: call it from uniform control flow.
var<workgroup> sums: array<f32, 256>;

fn workgroup_sum(lid: u32, s: f32) -> f32 {
    sums[lid] = s;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w >> 1u) {
        if (lid < w) {
            sums[lid] = sums[lid] + sums[lid + w];
        }
        workgroupBarrier();
    }
    let total = sums[0];
    workgroupBarrier();
    return total;
}

