#!/usr/bin/env python3
"""Hand-written register-blocked matmul kernels with vec4 loads, to time against the emitted schedule
(docs/DECISIONS.md, Runtime: "Mesa 25 re-measure"). Writes one WGSL kernel for y[M,N] = x[M,K] · B
and prints the workgroup count to dispatch:

    python3 scripts/matmul_probe.py FORM ROWS COLS WG OUT.wgsl [M N K]
    FORM kk: B = wᵀ, w [N,K]  (x and w read as vec4 along k: forward products)
    FORM kn: B = w,  w [K,N]  (x as vec4 along k, w as vec4 along columns: input gradients)

A workgroup owns ROWS rows (shared through 8-lane subgroup broadcasts, as the emitted schedule does),
each lane COLS columns. Time it with the bench example, which swaps it in for the emitted kernel:

    n=$(python3 scripts/matmul_probe.py kk 16 8 32 /tmp/p.wgsl 4096 512 256)
    PROBE_WGSL_true=/tmp/p.wgsl PROBE_WG=$n,1,1 cargo run -p moec-runtime --example bench_matmul -- 4096 512 256

SYNTHETIC=x, SYNTHETIC=w or SYNTHETIC=x,w replaces that operand's loads with values computed from the
load's index (in [1, 2), never denormal, so nothing is hoisted or slowed by microcode), to time the
loop without them (docs/DECISIONS.md, "Where the blocked loop's time goes"). The product is then
wrong on purpose: time it with PROBE_UNCHECKED=1.
"""
import os
import sys

LANES = 8
XYZW = "xyzw"
SYNTHETIC = set(filter(None, os.environ.get("SYNTHETIC", "").split(",")))


def load(operand, binding, index):
    """A vec4 read of `binding` at `index`, or under SYNTHETIC a value made from the index alone."""
    if operand not in SYNTHETIC:
        return f"b{binding}[{index}]"
    bits = f"vec4<u32>({index}, k, lid, ({index}) ^ k)"
    return f"bitcast<vec4<f32>>(({bits} & vec4<u32>(0x7fffffu)) | vec4<u32>(0x3f800000u))"


def kernel(form, rows, cols, wg, m, n, k):
    col_vec4 = form == "kn"
    per_lane = cols // 4 if col_vec4 else cols
    ct = n // (cols * wg)
    s = f"""@group(0) @binding(0) var<storage, read> b0: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> b1: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> b2: array<f32>;
@compute @workgroup_size({wg})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) lane: u32) {{
    let w = wid.x;
    let m0 = (w / {ct}u) * {rows}u;
    let n0 = (w % {ct}u) * {per_lane * wg}u + (lid / {LANES}u) * {LANES * per_lane}u + lid % {LANES}u;
"""
    for q in range(rows // LANES):
        s += f"    let ar{q} = (m0 + lane + {q * LANES}u) * {k // 4}u;\n"
    s += "".join(f"    var c{i}_{j} = 0.0;\n" for i in range(rows) for j in range(cols))
    s += f"    for (var k = 0u; k < {k // 4}u; k = k + 1u) {{\n"
    for q in range(rows // LANES):
        s += f"        let al{q} = {load('x', 0, f'ar{q} + k')};\n"
    if col_vec4:
        for u in range(4):
            for j4 in range(per_lane):
                index = f"(k * 4u + {u}u) * {n // 4}u + n0 + {j4 * LANES}u"
                s += f"        let bv{u}_{j4} = {load('w', 1, index)};\n"
    else:
        for j in range(cols):
            s += f"        let bv{j} = {load('w', 1, f'(n0 + {j * LANES}u) * {k // 4}u + k')};\n"
    for i in range(rows):
        s += f"        let av{i} = subgroupBroadcast(al{i // LANES}, {i % LANES}u);\n"
        for j in range(cols):
            acc = f"c{i}_{j}"
            for u in range(4):
                b = f"bv{u}_{j // 4}.{XYZW[j % 4]}" if col_vec4 else f"bv{j}.{XYZW[u]}"
                acc = f"fma(av{i}.{XYZW[u]}, {b}, {acc})"
            s += f"        c{i}_{j} = {acc};\n"
    s += "    }\n"
    for i in range(rows):
        for j in range(cols):
            col = f"(n0 + {(j // 4) * LANES}u) * 4u + {j % 4}u" if col_vec4 else f"n0 + {j * LANES}u"
            s += f"    b2[(m0 + {i}u) * {n}u + {col}] = c{i}_{j};\n"
    return s + "}\n", (m // rows) * ct


if __name__ == "__main__":
    form, rows, cols, wg, out = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    m, n, k = map(int, sys.argv[6:9]) if len(sys.argv) > 6 else (4096, 512, 256)
    wgsl, workgroups = kernel(form, rows, cols, wg, m, n, k)
    open(out, "w").write(wgsl)
    print(workgroups)
