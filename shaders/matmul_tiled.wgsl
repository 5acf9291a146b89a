// Shared-memory tiled matmul for real GPUs (MatmulVariant::SharedTiled).
// A workgroup of 16x16 invocations computes a 64x64 output tile, each invocation a 4x4 block strided by
// 16 (conflict-free shared reads), stepping K by 16 through workgroup memory.
// Provided by the generator: constants M, N, K, BATCH, GX, GY; functions
// `load_a(bi, m, k) -> f32` and `load_b(bi, k, n) -> f32` (zero outside the matrix) and
// `store(lin, v)` (the epilogue; `lin` is the row-major index into the [BATCH, M, N] output).

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const MT: u32 = (M + BM - 1u) / BM;
const NT: u32 = (N + BN - 1u) / BN;

var<workgroup> tile_a: array<f32, 1024>; // [BK][BM]
var<workgroup> tile_b: array<f32, 1024>; // [BK][BN]

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wg = wid.x + wid.y * GX + wid.z * (GX * GY);
    if (wg >= BATCH * MT * NT) {
        return;
    }
    let nt = wg % NT;
    let mt = (wg / NT) % MT;
    let bi = wg / (NT * MT);
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < K; k0 = k0 + BK) {
        for (var i = 0u; i < 4u; i = i + 1u) {
            let e = lid + i * 256u;
            let r = e / BK;
            let kk = e % BK;
            tile_a[kk * BM + r] = load_a(bi, mt * BM + r, k0 + kk);
            let kb = e / BN;
            let c = e % BN;
            tile_b[kb * BN + c] = load_b(bi, k0 + kb, nt * BN + c);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                a[i] = tile_a[kk * BM + ty + 16u * i];
                b[i] = tile_b[kk * BN + tx + 16u * i];
            }
            for (var i = 0u; i < 4u; i = i + 1u) {
                for (var j = 0u; j < 4u; j = j + 1u) {
                    acc[i * 4u + j] = acc[i * 4u + j] + a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            let m = mt * BM + ty + 16u * i;
            let n = nt * BN + tx + 16u * j;
            if (m < M && n < N) {
                store((bi * M + m) * N + n, acc[i * 4u + j]);
            }
        }
    }
}
