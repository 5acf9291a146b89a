// Adafactor's unclipped update of element t of matrix m (HF's _approx_sq_grad times the gradient):
// factored, rsqrt(row_i / mean(row)) * rsqrt(col_j) * g; a vector, rsqrt(exp_avg_sq_t) * g. `rmean` is
// the mean of matrix m's row moments (unused for a vector). Needs `info`, `stats`, `grad`, `moments`.
fn adafactor_update(m: u32, t: u32, rmean: f32) -> f32 {
    let size = info.rows * info.cols;
    let g = grad[m * size + t] * stats.scale;
    if (info.factored == 0u) {
        return inverseSqrt(moments[t]) * g;
    }
    let r = moments[m * info.rows + t / info.cols];
    let c = moments[info.matrices * info.rows + m * info.cols + t % info.cols];
    return inverseSqrt(r / rmean) * inverseSqrt(c) * g;
}
