//! The NPU path end to end against the stub AscendCL runtime and a fake
//! `atc`: `devices`, `compile`, and `calibrate --backend npu`. What is tested
//! is the plumbing (search, compile, cache, load, execute, observe), not the
//! device arithmetic: the fake atc writes stub models whose outputs are 0.5.

use ascend_quant::onnx::load_model;
use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
use ascend_quant::tensor::Tensor;
use std::path::{Path, PathBuf};

mod common;
use common::{bin, digits};

/// A stub-runtime model with these inputs and outputs (float32), outputs = 0 * x + 0.5.
fn stub_om(inputs: &[(String, Vec<usize>)], outputs: &[(String, Vec<usize>)]) -> Vec<u8> {
    let mut m = b"ASTB".to_vec();
    for v in [1u32, inputs.len() as u32, outputs.len() as u32] {
        m.extend(v.to_le_bytes());
    }
    m.extend(0f32.to_le_bytes());
    m.extend(0.5f32.to_le_bytes());
    for (name, dims) in inputs.iter().chain(outputs) {
        let mut n = [0u8; 128];
        let len = name.len().min(127);
        n[..len].copy_from_slice(&name.as_bytes()[..len]);
        m.extend(n);
        m.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            m.extend((*d as i64).to_le_bytes());
        }
        m.extend(0i32.to_le_bytes());
    }
    m
}

/// Acts as `atc` when this test binary is started by the fake atc script;
/// not a test of its own (ignored in the normal run, started with `--ignored`).
#[test]
#[ignore = "child-process entry point of the fake atc"]
fn fake_atc_entry() {
    let args = std::env::var("FAKE_ATC_ARGS").expect("started by the fake atc script");
    let arg = |key: &str| {
        args.split(' ')
            .find_map(|a| a.strip_prefix(&format!("--{key}=")))
            .map(String::from)
    };
    assert_eq!(
        arg("framework").as_deref(),
        Some("5"),
        "atc needs --framework=5: {args}"
    );
    let soc = arg("soc_version").expect("--soc_version");
    assert!(!soc.is_empty());
    if std::env::var_os("FAKE_ATC_FAIL").is_some() {
        println!("ATC run failed, E10001: fake failure for {soc}");
        std::process::exit(1);
    }
    let model = load_model(Path::new(&arg("model").expect("--model"))).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = arg("input_shape")
        .expect("--input_shape")
        .split(';')
        .map(|s| {
            let (n, d) = s.rsplit_once(':').unwrap();
            (
                n.to_string(),
                d.split(',').map(|v| v.parse().unwrap()).collect(),
            )
        })
        .collect();
    // Output shapes from one run of the simulator on zeros.
    let session = CpuExecutor
        .prepare(
            &model,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let feeds: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, d)| {
            (
                n.clone(),
                Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(d))),
            )
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let names: Vec<String> = model
        .graph
        .as_ref()
        .unwrap()
        .output
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    let fetch: Vec<&str> = names.iter().map(String::as_str).collect();
    let outs = session.run(&refs, &fetch).unwrap();
    let outputs: Vec<(String, Vec<usize>)> = names
        .iter()
        .zip(&outs)
        .map(|(n, t)| (n.clone(), t.shape().to_vec()))
        .collect();
    std::fs::write(
        format!("{}.om", arg("output").expect("--output")),
        stub_om(&shapes, &outputs),
    )
    .unwrap();
}

/// Writes the fake `atc` script into `dir`; it logs each call to `dir/atc.log`.
fn fake_atc(dir: &Path) -> PathBuf {
    let script = dir.join("atc");
    let text = format!(
        "#!/bin/sh\necho \"$@\" >> '{}'\nFAKE_ATC_ARGS=\"$*\" exec '{}' --ignored --exact fake_atc_entry --nocapture --test-threads=1\n",
        dir.join("atc.log").display(),
        std::env::current_exe().unwrap().display()
    );
    std::fs::write(&script, text).unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    script
}

#[test]
fn devices_with_and_without_a_runtime() {
    let o = bin()
        .args(["devices", "--json"])
        .env("ASCEND_QUANT_ACL_LIB", ascendcl_stub::library_path())
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["soc"], "Ascend310P3");
    assert_eq!(v["runtime"], "1.10.0");
    assert_eq!(v["devices"].as_array().unwrap().len(), 1);
    assert_eq!(v["devices"][0]["memory_total"], 8u64 << 30);

    let o = bin()
        .args(["devices"])
        .env("ASCEND_QUANT_ACL_LIB", "/nonexistent/cann/lib64")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("no Ascend runtime found") && text.contains("/nonexistent/cann/lib64"),
        "{text}"
    );
}

#[test]
fn compile_runs_atc_and_reports_its_log_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let atc = fake_atc(dir.path());
    let model = dir.path().join("m.onnx");
    std::fs::copy(digits().join("digits_cnn.onnx"), &model).unwrap();
    let o = bin()
        .args([
            "compile",
            "--soc-version",
            "Ascend310P3",
            "--input-shape",
            "x:1,1,8,8",
            "--model",
        ])
        .arg(&model)
        .env("ASCEND_QUANT_ATC", &atc)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(dir.path().join("m.om").is_file());
    let log = std::fs::read_to_string(dir.path().join("atc.log")).unwrap();
    assert!(
        log.contains("--framework=5")
            && log.contains("--soc_version=Ascend310P3")
            && log.contains("--input_shape=x:1,1,8,8"),
        "{log}"
    );

    // Without --soc-version the runtime's SoC is used.
    let o = bin()
        .args(["compile", "--input-shape", "x:1,1,8,8", "--output"])
        .arg(dir.path().join("m2"))
        .arg("--model")
        .arg(&model)
        .env("ASCEND_QUANT_ATC", &atc)
        .env("ASCEND_QUANT_ACL_LIB", ascendcl_stub::library_path())
        .env("ASCEND_STUB_SOC", "Ascend910B1")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let log = std::fs::read_to_string(dir.path().join("atc.log")).unwrap();
    assert!(log.contains("--soc_version=Ascend910B1"), "{log}");
    assert!(dir.path().join("m2.om").is_file());
    let before = std::fs::read(dir.path().join("m.om")).unwrap();

    let o = bin()
        .args([
            "compile",
            "--soc-version",
            "Ascend310P3",
            "--input-shape",
            "x:1,1,8,8",
            "--model",
        ])
        .arg(&model)
        .env("ASCEND_QUANT_ATC", &atc)
        .env("FAKE_ATC_FAIL", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        std::fs::read(dir.path().join("m.om")).unwrap(),
        before,
        "a failed compilation leaves the existing .om as it was"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.'))
            .count(),
        0,
        "no staging folder is left behind"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("atc failed") && err.contains("E10001"),
        "{err}"
    );
}

#[test]
fn calibrate_on_the_npu_backend_compiles_once_and_observes_device_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let atc = fake_atc(dir.path());
    let run = |prefix: &str| {
        common::calibrate_digits(&dir.path().join(prefix))
            .args([
                "--backend",
                "npu",
                "--quiet",
                "--json",
                "--batch-size",
                "4",
                "--batch-num",
                "5",
            ])
            .env("ASCEND_QUANT_ACL_LIB", ascendcl_stub::library_path())
            .env("ASCEND_QUANT_ATC", &atc)
            .output()
            .unwrap()
    };
    let o = run("a");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["backend"], "npu (Ascend310P3, device 0)");
    assert_eq!(report["batches"], 5);
    // The stub's outputs are 0.5 everywhere, so every layer input spans [0, 0.5]:
    // asymmetric IFMR gives offset -128 and a scale near 0.5/255 (clip factor 0.7..1.3).
    // (The first layer reads the graph input itself, which is the real data.)
    for l in report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["name"] != "/0/Conv")
    {
        let s = l["scale_d"].as_f64().unwrap();
        assert!(s > 0.7 * 0.5 / 255.0 && s < 1.3 * 0.5 / 255.0 + 1e-9, "{l}");
        assert_eq!(l["offset_d"], -128);
    }
    let compiles = std::fs::read_to_string(dir.path().join("atc.log"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(compiles, 1, "one shape, one compilation");
    // The cache holds the compiled model under its content hash, and nothing half-written.
    let cached: Vec<String> = std::fs::read_dir(dir.path().join(".ascend-quant-cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let stem = cached[0].strip_suffix(".om").expect("an .om");
    assert!(
        stem.len() == 64 && stem.chars().all(|c| c.is_ascii_hexdigit()),
        "{stem}"
    );
    // A second run finds the compiled model in the cache.
    let o = run("b");
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("atc.log"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}

#[test]
fn npu_backend_without_a_runtime_exits_with_2_and_names_the_search() {
    let dir = tempfile::tempdir().unwrap();
    let atc = fake_atc(dir.path());
    let o = common::calibrate_digits(&dir.path().join("x"))
        .args(["--backend", "npu", "--quiet"])
        .env("ASCEND_QUANT_ACL_LIB", "/nonexistent/lib64")
        .env("ASCEND_QUANT_ATC", &atc)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no Ascend runtime found") && err.contains("/nonexistent/lib64"),
        "{err}"
    );
    // auto falls back to the simulator and says so.
    let o = common::calibrate_digits(&dir.path().join("y"))
        .args(["--json"])
        .env("ASCEND_QUANT_ACL_LIB", "/nonexistent/lib64")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        report["backend"]
            .as_str()
            .unwrap()
            .starts_with("cpu simulator"),
        "{report}"
    );
}
