//! Matmul throughput of the emitted kernels on the default adapter (docs/DECISIONS.md, Runtime: lavapipe f32 1024³).
//!
//! `cargo run --release -p moec-runtime --example bench_matmul [-- M N K]`: times the register-blocked
//! and the shared-tiled schedules, for `x · wᵀ` (PyTorch `[out, in]` weights, the common case) and
//! `x · w`, and prints GFLOP/s (best of 15 runs after a warm-up).
//!
//! `PROBE_WGSL_true=FILE` / `PROBE_WGSL_false=FILE` with `PROBE_WG=X,Y,Z` time a hand-written kernel
//! (same bindings: x, w, y) in place of the emitted register-blocked one, checked the same way
//! (`scripts/matmul_probe.py` writes such kernels). `PROBE_UNCHECKED=1` skips the probe's check, for
//! probes that compute a wrong product on purpose (the script's `SYNTHETIC` operands).

use moec_compiler::emit::{emit, MatmulVariant, Target};
use moec_compiler::fuse::{fuse, FuseOptions};
use moec_compiler::ir::{Graph, Init, Op, TensorType};
use moec_runtime::{AdapterChoice, Executor, Gpu};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (m, n, k) = match args[..] {
        [m, n, k] => (m, n, k),
        _ => (1024, 1024, 1024),
    };
    let gpu = Gpu::new(&AdapterChoice::default())?;
    println!("adapter: {}", gpu.info);
    for trans_b in [true, false] {
        let mut g = Graph::new();
        let x = g.input("x", TensorType::f32(&[m, k]));
        let w_shape = if trans_b { [n, k] } else { [k, n] };
        let w = g.param("w", &w_shape, Init::Constant(0.0));
        let y = g.add(Op::MatMul { trans_b }, &[x, w], "y")?;
        g.set_output("y", y);
        for variant in [MatmulVariant::RegisterBlocked, MatmulVariant::SharedTiled] {
            let target = Target {
                matmul: variant,
                ..gpu.target()
            };
            let mut plan = emit(&g, &fuse(&g, FuseOptions::for_target(&target)), &target)?;
            if let Ok(dir) = std::env::var("PROBE_DUMP") {
                std::fs::write(
                    format!("{dir}/mm_{trans_b}_{variant:?}.wgsl"),
                    &plan.kernels[0].wgsl,
                )?;
                println!("wg {:?}", plan.dispatches[0].workgroups);
            }
            let mut probed = false;
            if let (Ok(f), true) = (
                std::env::var(format!("PROBE_WGSL_{trans_b}")),
                variant == MatmulVariant::RegisterBlocked,
            ) {
                plan.kernels[0].wgsl = std::fs::read_to_string(f)?;
                let wg: Vec<u32> = std::env::var("PROBE_WG")?
                    .split(',')
                    .map(|x| x.parse().unwrap())
                    .collect();
                plan.dispatches[0].workgroups = [wg[0], wg[1], wg[2]];
                probed = true;
            }
            let exec = Executor::new(&gpu, &plan)?;
            // Inputs that differ along every axis, so a kernel that mixes up a layout fails the check.
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.125).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.25).collect();
            exec.write_f32("x", &x)?;
            exec.write_f32("w", &w)?;
            exec.run()?;
            exec.wait()?;
            let mut best = f64::INFINITY;
            for _ in 0..15 {
                let t = Instant::now();
                exec.run()?;
                exec.wait()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            let y = exec.read_f32("y")?;
            let w_at = |t: usize, c: usize| if trans_b { w[c * k + t] } else { w[t * n + c] };
            let checked = !(probed && std::env::var_os("PROBE_UNCHECKED").is_some());
            for (r, c) in [
                (0, 0),
                (m / 3, n / 2 + 1),
                (m - 1, n - 1),
                (m / 2 + 3, 5 % n),
            ] {
                let want: f32 = (0..k).map(|t| x[r * k + t] * w_at(t, c)).sum();
                if checked && (y[r * n + c] - want).abs() > 1e-4 * want.abs().max(1.0) {
                    return Err(
                        format!("wrong y[{r}, {c}] = {} (want {want})", y[r * n + c]).into(),
                    );
                }
            }
            let gflops = 2.0 * (m * n * k) as f64 / best / 1e9;
            println!(
                "{m}x{n}x{k} trans_b={trans_b:<5} {variant:?}: {:.1} ms, {gflops:.1} GFLOP/s",
                best * 1e3
            );
        }
    }
    Ok(())
}
