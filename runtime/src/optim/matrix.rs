//! Shampoo and Muon: the matrix optimizers of docs/language.md ("Optimizers"), as kernels in
//! `shaders/optim_shampoo*.wgsl` and `shaders/optim_muon*.wgsl`. A stacked expert parameter
//! `[E, rows, cols]` is E matrices, each preconditioned or orthogonalised on its own; everything else
//! takes AdamW's kernel (`optim_adamw.wgsl`, pipeline 0) with the optimizer's Adam settings.
//!
//! # Shampoo
//! Adam's moments `m`, `v` are kept for every parameter (`optim.<name>.m` / `.v`, shaped like it).
//! A matrix with both sides ≤ `max_dim` also keeps `optim.<name>.left` (L, `[.., rows, rows]`),
//! `.right` (R, `[.., cols, cols]`) and their inverse fourth roots `.left_root` / `.right_root` (from
//! the last root step; checkpointed so that `--resume` between root steps is exact). Its stages:
//! 1. moments: m, v (elementwise); 2. statistics: L ← decay·L + (1 − decay)·G·Gᵀ and R likewise;
//! 3. on root steps (0-based step a multiple of `root_every`) the host reads L and R, computes
//!    (L + eps·I)^(−1/4) in f64 ([`inverse_fourth_root`]: nalgebra's symmetric eigendecomposition,
//!    eigenvalues clamped at 0 against f32 rounding) and uploads the roots;
//! 4. T = G·P_R, D = P_L·T; 5. the grafting ratio ‖A‖_F/‖D‖_F per matrix (one workgroup each, A
//!    = m̂/(√v̂ + eps)); 6. W ← W − lr·(D·ratio + wd·W).
//!
//! A vector or a matrix with a side over `max_dim` runs AdamW, which is the pinned W ← W − lr·(A +
//! wd·W) (PyTorch's decoupled decay p·(1 − lr·wd) − lr·A is the same expression).
//!
//! # Muon
//! A hidden matrix ([`super::is_hidden_matrix`]) keeps `optim.<name>.momentum_buffer` (PyTorch's
//! name); the others take Muon's `adamw` (`optim.<name>.m` / `.v`, learning-rate group 2, its own
//! `lr` under the spec's schedule, its own weight decay). Stages: 1. momentum, Nesterov and X₀ =
//! U/(‖U‖_F + 1e-7) (one workgroup per matrix); 2. `ns_steps` quintic Newton–Schulz iterations in
//! f32, each A = X·Xᵀ, B = b·A + c·A², X ← a·X + B·X (with XᵀX and X·B when rows > cols, which is
//! the transposed iteration without a transpose), between two buffers; 3. W ← W − lr·(0.2·√max(rows,
//! cols)·O + wd·W).
//!
//! Both scale every use of lr (the decay too) by the expert multiplier of `expert_lr = adaptive`.
//!
//! # Matrix products
//! Every product above (Shampoo's statistics, T and D; Muon's A, B and X') is a kernel generated
//! per shape with the plan's register-blocked matmul schedule ([`StridedMatmul`]; transposes are
//! strides), batched over the matrices of a stacked parameter in one dispatch, its epilogue (the EMA,
//! the clip scale, the polynomial) fused into the store. A one-output-per-invocation loop paid two
//! storage loads per multiply-add, which on lavapipe made these steps 10–30× slower than AdamW's.

use super::{factoring, fold, grid, lit, Built, OptimError, SlotContext, Stage, State};
use crate::Gpu;
use moec_compiler::emit::{Strided, StridedMatmul};
use nalgebra::{DMatrix, SymmetricEigen};

const ADAMW: &str = include_str!("../../../shaders/optim_adamw.wgsl");

/// Shampoo's fixed pipelines, in [`SlotContext::shampoo`]'s stage indices (0: AdamW); its matrix
/// products are generated per shape ([`SlotContext::product`]).
pub(super) const SHAMPOO_STAGES: [(&str, &str); 4] = [
    ("optim_adamw", ADAMW),
    (
        "optim_shampoo_moments",
        include_str!("../../../shaders/optim_shampoo_moments.wgsl"),
    ),
    (
        "optim_shampoo_graft",
        concat!(
            include_str!("../../../shaders/optim_workgroup_sum.wgsl"),
            include_str!("../../../shaders/optim_shampoo_graft.wgsl")
        ),
    ),
    (
        "optim_shampoo",
        include_str!("../../../shaders/optim_shampoo.wgsl"),
    ),
];

/// Muon's fixed pipelines, in [`SlotContext::muon`]'s stage indices (0: AdamW); the Newton–Schulz
/// products are generated per shape ([`SlotContext::product`]).
pub(super) const MUON_STAGES: [(&str, &str); 3] = [
    ("optim_adamw", ADAMW),
    (
        "optim_muon_momentum",
        concat!(
            include_str!("../../../shaders/optim_workgroup_sum.wgsl"),
            include_str!("../../../shaders/optim_muon_momentum.wgsl")
        ),
    ),
    (
        "optim_muon",
        include_str!("../../../shaders/optim_muon.wgsl"),
    ),
];

/// The quintic Newton–Schulz coefficients (a, b, c) of Jordan et al. (2024), pinned by
/// docs/language.md.
pub const NS_COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// Jacobi sweeps allowed to the eigendecomposition before a root step fails (it converges in a few
/// dozen for the matrices Shampoo sees; the cap only turns a pathological input into an error).
const MAX_EIGEN_ITERATIONS: usize = 100_000;

/// WGSL constants of the Newton–Schulz coefficients.
pub(super) fn ns_consts() -> String {
    let (a, b, c) = NS_COEFFICIENTS;
    format!(
        "const NS_A: f32 = {};\nconst NS_B: f32 = {};\nconst NS_C: f32 = {};\n",
        lit(a),
        lit(b),
        lit(c)
    )
}

/// Elements [`SlotContext::shampoo`] allocates for a parameter of this shape: m and v, L and R and
/// their roots, and the working buffers G·P_R, the update and the graft ratios.
pub(super) fn shampoo_elements(shape: &[usize]) -> usize {
    let (matrices, rows, cols, _) = factoring(shape);
    let numel: usize = shape.iter().product();
    2 * numel + 2 * matrices * (rows * rows + cols * cols) + 2 * numel + matrices
}

/// Elements [`SlotContext::muon`] allocates for a parameter of this shape: the momentum, the two
/// Newton–Schulz iterates and the two Gram-sized products.
pub(super) fn muon_elements(shape: &[usize]) -> usize {
    let (matrices, rows, cols, _) = factoring(shape);
    let numel: usize = shape.iter().product();
    let small = matrices * rows.min(cols) * rows.min(cols);
    numel + 2 * numel + 2 * small
}

impl SlotContext<'_> {
    /// `(matrices, rows, cols)` of the parameter and its state shape `[.., n, n]`.
    fn square(&self, n: usize) -> Vec<usize> {
        let mut shape = self.shape[..self.shape.len() - 2].to_vec();
        shape.extend([n, n]);
        shape
    }

    /// A stage of a generated product: `bindings` (WGSL name, writes, buffer) in binding order;
    /// `stats` is the [`Stats`](super) struct, every other binding an f32 array.
    fn product(
        &self,
        name: &str,
        bindings: &[(&str, bool, &wgpu::Buffer)],
        mm: StridedMatmul,
    ) -> Stage {
        let (body, groups) = mm.wgsl(self.target);
        let grid = fold(groups as u64, self.max_dim);
        let mut wgsl = format!(
            "const GX: u32 = {}u;\nconst GY: u32 = {}u;\n",
            grid[0], grid[1]
        );
        for (i, (var, writes, _)) in bindings.iter().enumerate() {
            let access = if *writes { "read_write" } else { "read" };
            let ty = if *var == "stats" {
                "Stats"
            } else {
                "array<f32>"
            };
            wgsl += &format!("@group(0) @binding({i}) var<storage, {access}> {var}: {ty};\n");
        }
        wgsl += &body;
        let pipeline = self.pipelines.generated(name, wgsl);
        let buffers: Vec<&wgpu::Buffer> = bindings.iter().map(|b| b.2).collect();
        self.stage(pipeline, &buffers, grid)
    }

    /// A Shampoo matrix: state m, v, left, right, left_root, right_root; stages moments,
    /// statistics, then after the host roots T = G·P_R, D = P_L·T, graft, update.
    pub(super) fn shampoo(&self) -> Built {
        let (matrices, rows, cols, _) = factoring(self.shape);
        let numel = self.numel();
        let state = vec![
            self.state("m", self.shape.to_vec()),
            self.state("v", self.shape.to_vec()),
            self.state("left", self.square(rows)),
            self.state("right", self.square(cols)),
            self.state("left_root", self.square(rows)),
            self.state("right_root", self.square(cols)),
        ];
        let [m, v, left, right, left_root, right_root] =
            [0, 1, 2, 3, 4, 5].map(|i| &state[i].buffer);
        let tmp = self.scratch("shampoo G·P_R", numel);
        let d = self.scratch("shampoo update", numel);
        let ratio = self.scratch("shampoo graft ratio", matrices);
        let (info, scalars, stats, grad) = (self.info, self.scalars, self.stats, self.grad);
        let all = grid(numel, self.max_dim);
        let size = rows * cols;
        let g = stored("g", size, cols);
        let gt = transposed("g", size, cols);
        // L ← DECAY·L + (1 − DECAY)·G·Gᵀ and R likewise with Gᵀ·G; G is the clipped gradient.
        let statistic = |side: &str, n: usize| {
            format!(
                "    if (stats.bad != 0u) {{\n        return;\n    }}\n    let i = (bi * {n}u + row) * {n}u + col;\n    {side}[i] = DECAY * {side}[i] + (1.0 - DECAY) * (acc * (stats.scale * stats.scale));"
            )
        };
        let out = format!("(bi * {rows}u + row) * {cols}u + col");
        let mut update = vec![
            self.stage(1, &[stats, grad, m, v], all),
            self.product(
                "optim_shampoo_left",
                &[
                    ("stats", false, stats),
                    ("g", false, grad),
                    ("left", true, left),
                ],
                StridedMatmul {
                    batch: matrices,
                    m: rows,
                    n: rows,
                    k: cols,
                    a: g,
                    b: gt,
                    put: &statistic("left", rows),
                },
            ),
            self.product(
                "optim_shampoo_right",
                &[
                    ("stats", false, stats),
                    ("g", false, grad),
                    ("right", true, right),
                ],
                StridedMatmul {
                    batch: matrices,
                    m: cols,
                    n: cols,
                    k: rows,
                    a: gt,
                    b: g,
                    put: &statistic("right", cols),
                },
            ),
            self.product(
                "optim_shampoo_gpr",
                &[
                    ("stats", false, stats),
                    ("g", false, grad),
                    ("pr", false, right_root),
                    ("tmp", true, &tmp),
                ],
                StridedMatmul {
                    batch: matrices,
                    m: rows,
                    n: cols,
                    k: cols,
                    a: g,
                    b: stored("pr", cols * cols, cols),
                    put: &format!("    tmp[{out}] = acc * stats.scale;"),
                },
            ),
            self.product(
                "optim_shampoo_plt",
                &[
                    ("pl", false, left_root),
                    ("tmp", false, &tmp),
                    ("d", true, &d),
                ],
                StridedMatmul {
                    batch: matrices,
                    m: rows,
                    n: cols,
                    k: rows,
                    a: stored("pl", rows * rows, rows),
                    b: stored("tmp", size, cols),
                    put: &format!("    d[{out}] = acc;"),
                },
            ),
            self.stage(
                2,
                &[info, scalars, m, v, &d, &ratio],
                fold(matrices as u64, self.max_dim),
            ),
            self.stage(3, &[info, scalars, stats, self.param, &d, &ratio], all),
        ];
        for stage in &mut update[3..] {
            stage.after_roots = true;
        }
        Built { state, update }
    }

    /// A Muon matrix: state momentum_buffer; momentum, `ns_steps` × (A = X·Xᵀ, B = b·A + c·A²,
    /// X' = a·X + B·X) between two buffers, update. When rows > cols the iteration runs on Xᵀ
    /// (docs/language.md) without transposing anything: A = XᵀX and X' = a·X + X·B (B is
    /// symmetric).
    pub(super) fn muon(&self, ns_steps: usize) -> Built {
        let (matrices, rows, cols, _) = factoring(self.shape);
        let s = rows.min(cols);
        let small = matrices * s * s;
        let numel = self.numel();
        let size = rows * cols;
        let state = vec![self.state("momentum_buffer", self.shape.to_vec())];
        let x = [
            self.scratch("newton-schulz X", numel),
            self.scratch("newton-schulz X'", numel),
        ];
        let a = self.scratch("newton-schulz A", small);
        let b = self.scratch("newton-schulz B", small);
        let (info, stats) = (self.info, self.stats);
        let wide = rows <= cols;
        let gram = |from| StridedMatmul {
            batch: matrices,
            m: s,
            n: s,
            k: rows.max(cols),
            a: if wide {
                stored("x", size, cols)
            } else {
                transposed("x", size, cols)
            },
            b: if wide {
                transposed("x", size, cols)
            } else {
                stored("x", size, cols)
            },
            put: from,
        };
        let gram_put = format!("    a[(bi * {s}u + row) * {s}u + col] = acc;");
        let poly_put = format!(
            "    let i = (bi * {s}u + row) * {s}u + col;\n    b[i] = NS_B * a[i] + NS_C * acc;"
        );
        let apply_put = format!(
            "    let i = (bi * {rows}u + row) * {cols}u + col;\n    y[i] = NS_A * x[i] + acc;"
        );
        let (apply_a, apply_b) = if wide {
            (stored("b", s * s, s), stored("x", size, cols))
        } else {
            (stored("x", size, cols), stored("b", s * s, s))
        };
        let mut update = vec![self.stage(
            1,
            &[info, stats, self.grad, &state[0].buffer, &x[0]],
            fold(matrices as u64, self.max_dim),
        )];
        for k in 0..ns_steps {
            let (from, to) = (&x[k % 2], &x[(k + 1) % 2]);
            update.push(self.product(
                "optim_muon_gram",
                &[("x", false, from), ("a", true, &a)],
                gram(&gram_put),
            ));
            update.push(self.product(
                "optim_muon_poly",
                &[("a", false, &a), ("b", true, &b)],
                StridedMatmul {
                    batch: matrices,
                    m: s,
                    n: s,
                    k: s,
                    a: stored("a", s * s, s),
                    b: stored("a", s * s, s),
                    put: &poly_put,
                },
            ));
            update.push(self.product(
                "optim_muon_apply",
                &[("x", false, from), ("b", false, &b), ("y", true, to)],
                StridedMatmul {
                    batch: matrices,
                    m: rows,
                    n: cols,
                    k: s,
                    a: apply_a,
                    b: apply_b,
                    put: &apply_put,
                },
            ));
        }
        update.push(self.stage(
            2,
            &[info, self.scalars, stats, self.param, &x[ns_steps % 2]],
            grid(numel, self.max_dim),
        ));
        Built { state, update }
    }
}

/// Matrix `[.., rows, cols]` of `buffer` (`size` = rows · cols elements each) as stored.
fn stored(buffer: &str, size: usize, cols: usize) -> Strided<'_> {
    Strided {
        buffer,
        batch: size,
        rows: cols,
        cols: 1,
    }
}

/// The transpose of [`stored`]'s matrix, read in place.
fn transposed(buffer: &str, size: usize, cols: usize) -> Strided<'_> {
    Strided {
        buffer,
        batch: size,
        rows: 1,
        cols,
    }
}

/// Shampoo's root step for one parameter: reads its L and R (if it has them), writes
/// (L + eps·I)^(−1/4) and (R + eps·I)^(−1/4) into its root state.
pub(super) fn update_roots(
    gpu: &Gpu,
    name: &str,
    state: &[State],
    eps: f64,
) -> Result<(), OptimError> {
    let find = |suffix: &str| state.iter().find(|s| s.suffix == suffix);
    for side in ["left", "right"] {
        let (Some(stat), Some(root)) = (find(side), find(&format!("{side}_root"))) else {
            continue;
        };
        let n = *stat.shape.last().unwrap_or(&1);
        let len: usize = stat.shape.iter().product();
        let values = gpu.read_buffer_f32(&stat.buffer, len)?;
        let mut roots = Vec::with_capacity(len);
        for a in values.chunks(n * n) {
            roots.extend(
                inverse_fourth_root(a, n, eps).ok_or_else(|| OptimError::Root {
                    name: name.to_string(),
                    side,
                })?,
            );
        }
        gpu.queue
            .write_buffer(&root.buffer, 0, bytemuck::cast_slice(&roots));
    }
    Ok(())
}

/// (A + eps·I)^(−1/4) of a symmetric n × n matrix (row-major) in f64: A = QΛQᵀ, then
/// Q·diag((max(λ, 0) + eps)^(−1/4))·Qᵀ. A is symmetrised ((A + Aᵀ)/2) and negative eigenvalues are
/// clamped to 0: L and R are positive semi-definite, and only f32 rounding makes them otherwise.
/// `None` when A is not finite or the eigendecomposition does not converge.
pub(super) fn inverse_fourth_root(a: &[f32], n: usize, eps: f64) -> Option<Vec<f32>> {
    if a.len() != n * n || a.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let m = DMatrix::from_fn(n, n, |i, j| {
        0.5 * (a[i * n + j] as f64 + a[j * n + i] as f64)
    });
    let eig = SymmetricEigen::try_new(m, f64::EPSILON, MAX_EIGEN_ITERATIONS)?;
    let q = &eig.eigenvectors;
    let d = eig.eigenvalues.map(|l| (l.max(0.0) + eps).powf(-0.25));
    let p = q * DMatrix::from_diagonal(&d) * q.transpose();
    Some((0..n * n).map(|k| p[(k / n, k % n)] as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_fourth_root_of_a_known_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 3 and 1 with eigenvectors (1, 1)/√2 and (1, −1)/√2.
        let p = inverse_fourth_root(&[2.0, 1.0, 1.0, 2.0], 2, 0.0).unwrap();
        let (x, y) = (3f64.powf(-0.25), 1.0);
        let expected = [(x + y) / 2.0, (x - y) / 2.0, (x - y) / 2.0, (x + y) / 2.0];
        for (p, e) in p.iter().zip(expected) {
            assert!((*p as f64 - e).abs() < 1e-6, "{p} vs {e}");
        }
        // A rank-deficient matrix with a slightly negative eigenvalue (f32 rounding): clamped, so
        // the null direction gets eps^(−1/4).
        let p = inverse_fourth_root(&[1.0, 0.0, 0.0, -1e-9], 2, 1e-8).unwrap();
        assert!((p[3] as f64 - 1e-8f64.powf(-0.25)).abs() < 1e-3, "{p:?}");
        assert!(inverse_fourth_root(&[f32::NAN, 0.0, 0.0, 1.0], 2, 1e-8).is_none());
    }
}
