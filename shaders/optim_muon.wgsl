// Muon, last stage: W ← W − lr·(0.2·√max(rows, cols)·O + wd·W) with O the Newton–Schulz output
// (Moonlight's scale, matching AdamW's update RMS); lr is the group's times the expert multiplier
// of `expert_lr = adaptive`, which scales the decay too.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> scalars: Scalars;
@group(0) @binding(2) var<storage, read> stats: Stats;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read> o: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wg, nwg, lid);
    if (i >= arrayLength(&param) || stats.bad != 0u) {
        return;
    }
    let lr = scalars.lr[info.group] * stats.lr_scale[lr_scale_index(info, i)];
    let scale = 0.2 * sqrt(f32(max(info.rows, info.cols)));
    param[i] = param[i] - lr * (scale * o[i] + info.decay * param[i]);
}
