//! Shampoo and Muon: the matrix optimizers of LANGUAGE.md ("Optimizer formulas"), as kernels in
//! `shaders/optim_shampoo*.wgsl` and `shaders/optim_muon*.wgsl`. A stacked expert parameter
//! `[E, rows, cols]` is E matrices, each preconditioned or orthogonalised on its own; everything else
//! takes AdamW's kernel (`optim_adamw.wgsl`, pipeline 0) with the optimizer's Adam settings.
//!
//! # Shampoo
//! Adam's moments `m`, `v` are kept for every parameter (`optim.<name>.m` / `.v`, shaped like it).
//! A matrix with both sides ≤ `max_dim` also keeps `optim.<name>.left` (L, `[.., rows, rows]`),
//! `.right` (R, `[.., cols, cols]`) and their inverse fourth roots `.left_root` / `.right_root` (from
//! the last root step; checkpointed so that `--resume` between root steps is exact). Its stages:
//! 1. moments: m, v (elementwise); 2. statistics: L ← decay·L + (1 − decay)·G·Gᵀ and R likewise
//!    (one invocation per entry);
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

use super::{factoring, fold, grid, lit, Built, OptimError, SlotContext, State};
use crate::Gpu;
use nalgebra::{DMatrix, SymmetricEigen};

const ADAMW: &str = include_str!("../../../shaders/optim_adamw.wgsl");

/// Shampoo's pipelines, in [`SlotContext::shampoo`]'s stage indices (0: AdamW).
pub(super) const SHAMPOO_STAGES: [(&str, &str); 7] = [
    ("optim_adamw", ADAMW),
    (
        "optim_shampoo_moments",
        include_str!("../../../shaders/optim_shampoo_moments.wgsl"),
    ),
    (
        "optim_shampoo_stats",
        include_str!("../../../shaders/optim_shampoo_stats.wgsl"),
    ),
    (
        "optim_shampoo_right",
        include_str!("../../../shaders/optim_shampoo_right.wgsl"),
    ),
    (
        "optim_shampoo_left",
        include_str!("../../../shaders/optim_shampoo_left.wgsl"),
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

/// Muon's pipelines, in [`SlotContext::muon`]'s stage indices (0: AdamW).
pub(super) const MUON_STAGES: [(&str, &str); 6] = [
    ("optim_adamw", ADAMW),
    (
        "optim_muon_momentum",
        concat!(
            include_str!("../../../shaders/optim_workgroup_sum.wgsl"),
            include_str!("../../../shaders/optim_muon_momentum.wgsl")
        ),
    ),
    (
        "optim_muon_gram",
        include_str!("../../../shaders/optim_muon_gram.wgsl"),
    ),
    (
        "optim_muon_poly",
        include_str!("../../../shaders/optim_muon_poly.wgsl"),
    ),
    (
        "optim_muon_apply",
        include_str!("../../../shaders/optim_muon_apply.wgsl"),
    ),
    (
        "optim_muon",
        include_str!("../../../shaders/optim_muon.wgsl"),
    ),
];

/// The quintic Newton–Schulz coefficients (a, b, c) of Jordan et al. (2024), pinned by LANGUAGE.md.
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

impl SlotContext<'_> {
    /// `(matrices, rows, cols)` of the parameter and its state shape `[.., n, n]`.
    fn square(&self, n: usize) -> Vec<usize> {
        let mut shape = self.shape[..self.shape.len() - 2].to_vec();
        shape.extend([n, n]);
        shape
    }

    /// A Shampoo matrix: state m, v, left, right, left_root, right_root; stages 1–6, the last four
    /// after the host roots.
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
        let entries = matrices * (rows * rows + cols * cols);
        let mut update = vec![
            self.stage(1, &[stats, grad, m, v], all),
            self.stage(
                2,
                &[info, stats, grad, left, right],
                grid(entries, self.max_dim),
            ),
            self.stage(3, &[info, stats, grad, right_root, &tmp], all),
            self.stage(4, &[info, left_root, &tmp, &d], all),
            self.stage(
                5,
                &[info, scalars, m, v, &d, &ratio],
                fold(matrices as u64, self.max_dim),
            ),
            self.stage(6, &[info, scalars, stats, self.param, &d, &ratio], all),
        ];
        for stage in &mut update[2..] {
            stage.after_roots = true;
        }
        Built {
            state,
            update,
            scratch_bytes: 4 * (2 * numel + matrices) as u64,
        }
    }

    /// A Muon matrix: state momentum_buffer; momentum, `ns_steps` × (gram, polynomial, apply)
    /// between two buffers, update.
    pub(super) fn muon(&self, ns_steps: usize) -> Built {
        let (matrices, rows, cols, _) = factoring(self.shape);
        let small = matrices * rows.min(cols) * rows.min(cols);
        let numel = self.numel();
        let state = vec![self.state("momentum_buffer", self.shape.to_vec())];
        let x = [
            self.scratch("newton-schulz X", numel),
            self.scratch("newton-schulz X'", numel),
        ];
        let a = self.scratch("newton-schulz A", small);
        let b = self.scratch("newton-schulz B", small);
        let (info, stats) = (self.info, self.stats);
        let all = grid(numel, self.max_dim);
        let products = grid(small, self.max_dim);
        let mut update = vec![self.stage(
            1,
            &[info, stats, self.grad, &state[0].buffer, &x[0]],
            fold(matrices as u64, self.max_dim),
        )];
        for k in 0..ns_steps {
            let (from, to) = (&x[k % 2], &x[(k + 1) % 2]);
            update.push(self.stage(2, &[info, from, &a], products));
            update.push(self.stage(3, &[info, &a, &b], products));
            update.push(self.stage(4, &[info, from, &b, to], all));
        }
        update.push(self.stage(
            5,
            &[info, self.scalars, stats, self.param, &x[ns_steps % 2]],
            all,
        ));
        Built {
            state,
            update,
            scratch_bytes: 4 * (2 * numel + 2 * small) as u64,
        }
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
