//! The AscendCL wrapper against the stub runtime (`ascendcl-stub`). Each
//! scenario runs in a child process of this test binary, so every run starts
//! with a fresh runtime and its own failure-injection settings.

use ascend_quant::acl::{Acl, AclFailure, IoRole};
use std::process::Command;

/// A stub model: y_j = a * x + b, one float32 input and output of `dims`.
fn stub_model(a: f32, b: f32, dims: &[i64]) -> Vec<u8> {
    let mut m = b"ASTB".to_vec();
    for v in [1u32, 1, 1] {
        m.extend(v.to_le_bytes());
    }
    m.extend(a.to_le_bytes());
    m.extend(b.to_le_bytes());
    for name in ["x", "y"] {
        let mut n = [0u8; 128];
        n[..name.len()].copy_from_slice(name.as_bytes());
        m.extend(n);
        m.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            m.extend(d.to_le_bytes());
        }
        m.extend(0i32.to_le_bytes()); // ACL_FLOAT
    }
    m
}

fn acl() -> Result<Acl, AclFailure> {
    Acl::load(Some(ascendcl_stub::library_path()))
}

/// The whole life cycle: device, context, stream, memory, model, execute.
fn full_cycle(acl: &Acl) -> Result<Vec<f32>, AclFailure> {
    let device = acl.device(0)?;
    let ctx = device.context()?;
    let stream = ctx.stream()?;
    let mut model = ctx.load_model(&stub_model(2.0, 1.0, &[1, 4]))?;
    let mut x = ctx.alloc(16)?;
    let mut y = ctx.alloc(16)?;
    x.write_f32(&[0.0, 1.0, 2.0, 3.5])?;
    model.execute(&[&x], &mut [&mut y])?;
    stream.synchronize()?;
    y.read_f32(4)
}

fn run_scenario(name: &str) {
    match name {
        "cycle_and_clean_finalize" => {
            let acl = acl().unwrap();
            assert_eq!(full_cycle(&acl).unwrap(), vec![1.0, 3.0, 5.0, 8.0]);
            acl.finalize()
                .expect("the ledger is clean once everything is dropped");
        }
        "leak_is_reported" => {
            let acl = acl().unwrap();
            let device = acl.device(0).unwrap();
            let ctx = device.context().unwrap();
            std::mem::forget(ctx.alloc(64).unwrap());
            drop(ctx);
            drop(device);
            // The leaked buffer still holds its context, device and the runtime.
            match acl.finalize() {
                Err(AclFailure::Usage(m)) => {
                    assert!(m.contains("still in use by 1 other handle"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
        "injected" => {
            let spec = std::env::var("ASCEND_STUB_FAIL").unwrap();
            let function = spec.split('=').next().unwrap().to_string();
            let acl = match acl() {
                Ok(a) => a,
                Err(AclFailure::Call(e)) => {
                    assert_eq!(e.function, function);
                    return;
                }
                Err(other) => panic!("{other}"),
            };
            match full_cycle(&acl) {
                Err(AclFailure::Call(e)) => {
                    assert_eq!(e.function, function, "{e}");
                    if [
                        "aclmdlCreateDesc",
                        "aclmdlCreateDataset",
                        "aclCreateDataBuffer",
                    ]
                    .contains(&function.as_str())
                    {
                        // These return a NULL handle instead of a code.
                        assert_eq!((e.code, e.name), (-1, "null handle"));
                    } else {
                        assert_eq!((e.code, e.name), (200000, "ACL_ERROR_BAD_ALLOC"));
                    }
                    assert!(
                        e.message.as_deref().unwrap_or("").contains(&function),
                        "{e}"
                    );
                }
                other => panic!("expected the injected failure of {function}, got {other:?}"),
            }
            acl.finalize().expect("nothing leaks after a failure");
        }
        "retry_after_failed_load" => {
            match Acl::load(Some(std::path::Path::new("/nonexistent/ascend/lib64"))) {
                Err(AclFailure::Load(e)) => {
                    assert!(e.to_string().contains("/nonexistent/ascend/lib64"), "{e}")
                }
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("a missing folder must not load"),
            }
            // The failure is not remembered: the right location loads now.
            let acl = acl().expect("a later load with another location succeeds");
            assert_eq!(full_cycle(&acl).unwrap(), vec![1.0, 3.0, 5.0, 8.0]);
            acl.finalize().unwrap();
        }
        "two_threads" => {
            // Both contexts are made on this thread and used only on others,
            // which have no current context until the wrapper binds one: the
            // stub refuses every allocation and copy on a thread without one.
            let acl = acl().unwrap();
            let device = acl.device(0).unwrap();
            let contexts = [device.context().unwrap(), device.context().unwrap()];
            let handles: Vec<_> = contexts
                .iter()
                .enumerate()
                .map(|(t, ctx)| {
                    let ctx = ctx.clone();
                    std::thread::spawn(move || {
                        let mut buf = ctx.alloc(1 << 16).unwrap();
                        let values: Vec<f32> = (0..16384).map(|i| (i * (t + 1)) as f32).collect();
                        for _ in 0..20 {
                            buf.write_f32(&values).unwrap();
                            assert_eq!(buf.read_f32(16384).unwrap(), values);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            drop(contexts);
            drop(device);
            acl.finalize().unwrap();
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Entry point of the child processes, not a test of its own: ignored in the
/// normal run, started with `--ignored` by [`child`].
#[test]
#[ignore = "child-process entry point; run by the other tests"]
fn scenario_entry() {
    let name = std::env::var("ACL_SCENARIO").expect("started by child() with ACL_SCENARIO");
    run_scenario(&name);
    println!("{}{name}", SCENARIO_DONE);
}

/// What a child prints when its scenario ran to the end.
const SCENARIO_DONE: &str = "acl scenario finished: ";

fn child(name: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--ignored",
        "--exact",
        "scenario_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("ACL_SCENARIO", name)
    .env_remove("ASCEND_STUB_FAIL");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn assert_passes(name: &str, env: &[(&str, &str)]) {
    let o = child(name, env);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "scenario {name} {env:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A filter that stops matching would run no test and still succeed.
    assert!(
        stdout.contains(&format!("{SCENARIO_DONE}{name}\n")),
        "scenario {name} {env:?} did not run:\n{stdout}"
    );
}

#[test]
fn device_info_memory_round_trip_and_model_execution() {
    let acl = acl().unwrap();
    assert_eq!(acl.device_count().unwrap(), 1);
    assert_eq!(acl.version().unwrap(), (1, 10, 0));
    assert_eq!(acl.soc_name().as_deref(), Some("Ascend310P3"));
    let device = acl.device(0).unwrap();
    let ctx = device.context().unwrap();
    let mut buf = ctx.alloc(1 << 20).unwrap();
    let data: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    buf.copy_from_host(&data).unwrap();
    let mut back = vec![0u8; 1 << 20];
    buf.copy_to_host(&mut back).unwrap();
    assert!(back == data);
    assert!(matches!(
        buf.copy_from_host(&vec![0u8; (1 << 20) + 1]),
        Err(AclFailure::Usage(_))
    ));
    let model = ctx.load_model(&stub_model(1.0, 0.0, &[2, 3])).unwrap();
    assert_eq!(model.inputs()[0].name, "x");
    assert_eq!(model.inputs()[0].dims, vec![2, 3]);
    assert_eq!(model.outputs()[0].size, 24);
    let err = ctx.load_model(b"not a model").err().unwrap();
    assert_eq!(err.name, "ACL_ERROR_PARSE_MODEL");
    assert_eq!(err.function, "aclmdlLoadFromMem");
}

#[test]
fn full_cycle_then_a_clean_finalize() {
    assert_passes("cycle_and_clean_finalize", &[]);
}

#[test]
fn a_failed_load_is_not_cached() {
    assert_passes("retry_after_failed_load", &[]);
}

#[test]
fn execute_checks_buffer_sizes_and_contexts() {
    let acl = acl().unwrap();
    let device = acl.device(0).unwrap();
    let ctx = device.context().unwrap();
    let other = device.context().unwrap();
    let mut model = ctx.load_model(&stub_model(2.0, 1.0, &[1, 4])).unwrap();
    let x = ctx.alloc(16).unwrap();
    let small = ctx.alloc(12).unwrap();
    let mut y = ctx.alloc(16).unwrap();
    let mut y_small = ctx.alloc(15).unwrap();
    let mut y_foreign = other.alloc(16).unwrap();
    match model.execute(&[&small], &mut [&mut y]) {
        Err(AclFailure::BufferTooSmall {
            role,
            index: 0,
            needed: 16,
            got: 12,
        }) => assert_eq!(role, IoRole::Input),
        other => panic!("{other:?}"),
    }
    match model.execute(&[&x], &mut [&mut y_small]) {
        Err(AclFailure::BufferTooSmall {
            role,
            needed: 16,
            got: 15,
            ..
        }) => assert_eq!(role, IoRole::Output),
        other => panic!("{other:?}"),
    }
    match model.execute(&[&x], &mut [&mut y_foreign]) {
        Err(e @ AclFailure::ForeignBuffer { .. }) => {
            assert!(e.to_string().contains("output 0"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        model.execute(&[&x], &mut []),
        Err(AclFailure::Usage(_))
    ));
    model.execute(&[&x], &mut [&mut y]).unwrap();
}

#[test]
fn a_leaked_buffer_is_reported_at_finalize() {
    assert_passes("leak_is_reported", &[]);
}

#[test]
fn each_wrapped_call_fails_cleanly_when_injected() {
    for function in [
        "aclrtSetDevice",
        "aclrtCreateContext",
        "aclrtCreateStream",
        "aclmdlLoadFromMem",
        "aclmdlCreateDesc",
        "aclmdlGetDesc",
        "aclrtMalloc",
        "aclrtMemcpy",
        "aclmdlCreateDataset",
        "aclCreateDataBuffer",
        "aclmdlAddDatasetBuffer",
        "aclmdlExecute",
        "aclrtSynchronizeStream",
    ] {
        assert_passes(
            "injected",
            &[("ASCEND_STUB_FAIL", &format!("{function}=200000"))],
        );
    }
}

#[test]
fn contexts_bound_per_thread() {
    assert_passes("two_threads", &[]);
}
