//! Matmul throughput of the emitted kernels on the default adapter (docs/DECISIONS.md, Runtime: lavapipe f32 1024³).
//!
//! `cargo run --release -p moec-runtime --example bench_matmul [-- M N K]`: times the register-blocked
//! and the shared-tiled schedules, for `x · wᵀ` (PyTorch `[out, in]` weights, the common case) and
//! `x · w`, and prints GFLOP/s (best of 5 runs after a warm-up).

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
            let plan = emit(&g, &fuse(&g, FuseOptions::for_target(&target)), &target)?;
            let exec = Executor::new(&gpu, &plan)?;
            exec.write_f32("x", &vec![0.5; m * k])?;
            exec.write_f32("w", &vec![0.25; n * k])?;
            exec.run()?;
            exec.wait()?;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                exec.run()?;
                exec.wait()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            let y = exec.read_f32("y")?;
            let want = 0.125 * k as f32;
            if (y[0] - want).abs() > 1e-3 * want || (y[m * n - 1] - want).abs() > 1e-3 * want {
                return Err(format!("wrong result {} (want {want})", y[0]).into());
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
