//! The executor on a hand-written plan: buffer roles, bindings, dispatch and readback, independent of
//! the emitter.

use moec_compiler::ir::{DType, InputRole};
use moec_compiler::plan::{Binding, BufferRole, BufferSpec, Dispatch, Kernel, Plan};
use moec_runtime::{AdapterChoice, Executor, Gpu, RuntimeError};

const AXPY: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i < 100u) { y[i] = 2.0 * x[i] + 1.0; }
}
"#;

fn axpy_plan() -> Plan {
    let buffer = |role, label: &str| BufferSpec {
        size: 400,
        dtype: DType::F32,
        role,
        label: label.into(),
    };
    Plan {
        buffers: vec![
            buffer(
                BufferRole::Input {
                    name: "x".into(),
                    shape: vec![100],
                    role: InputRole::Data,
                },
                "x",
            ),
            buffer(
                BufferRole::Output {
                    name: "y".into(),
                    shape: vec![100],
                },
                "y",
            ),
        ],
        kernels: vec![Kernel {
            name: "axpy".into(),
            wgsl: AXPY.into(),
            entry_point: "main".into(),
            writes: vec![false, true],
        }],
        dispatches: vec![Dispatch {
            name: "axpy".into(),
            kernel: 0,
            bindings: [0, 1]
                .map(|buffer| Binding {
                    buffer,
                    offset: 0,
                    size: 400,
                })
                .to_vec(),
            workgroups: [2, 1, 1],
        }],
    }
}

#[test]
fn runs_a_plan_and_reads_back() {
    let gpu = Gpu::new(&AdapterChoice::default())
        .expect("a wgpu adapter (lavapipe: apt-get install mesa-vulkan-drivers)");
    let exec = Executor::new(&gpu, &axpy_plan()).unwrap();
    let x: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
    exec.write_f32("x", &x).unwrap();
    exec.run().unwrap();
    let y = exec.read_f32("y").unwrap();
    for (xi, yi) in x.iter().zip(&y) {
        assert_eq!(*yi, 2.0 * xi + 1.0);
    }
}

#[test]
fn rejects_wrong_sizes_and_names() {
    let gpu = Gpu::new(&AdapterChoice::default()).unwrap();
    let exec = Executor::new(&gpu, &axpy_plan()).unwrap();
    assert!(matches!(
        exec.write_f32("x", &[1.0; 99]),
        Err(RuntimeError::SizeMismatch {
            expected: 400,
            got: 396,
            ..
        })
    ));
    assert!(matches!(
        exec.read_f32("nope"),
        Err(RuntimeError::UnknownBuffer(_))
    ));
}

#[test]
fn invalid_shader_is_an_error_not_a_panic() {
    let gpu = Gpu::new(&AdapterChoice::default()).unwrap();
    let mut plan = axpy_plan();
    plan.kernels[0].wgsl = "this is not wgsl".into();
    assert!(Executor::new(&gpu, &plan).is_err());
}

#[test]
fn unknown_adapter_name_lists_the_known_ones() {
    let err = Gpu::new(&AdapterChoice {
        name: Some("no-such-gpu-xyz".into()),
        max_binding: None,
    })
    .err()
    .expect("no adapter matches");
    assert!(err.to_string().contains("no-such-gpu-xyz"), "{err}");
}
