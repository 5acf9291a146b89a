@compute @workgroup_size({wg})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wg = wid.x + wid.y * GX + wid.z * (GX * GY);
    let row = {row};
    if (row >= {rows}u) {
        return;
    }
