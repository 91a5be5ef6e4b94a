//! The `ascend-quant` command end to end: output, machine-readable output and exit codes.

mod common;

use ascend_quant::data::{read_npy, write_npy};
use ascend_quant::onnx::proto::{ModelProto, NodeProto};
use ascend_quant::onnx::{load_model, save_model};
use ascend_quant::tensor::Tensor;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary with CANN's environment and the stub runtime's knobs cleared:
/// on a machine with CANN, `calibrate` would otherwise pick the NPU.
fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ascend-quant"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ASCEND_") {
            c.env_remove(key);
        }
    }
    c
}

fn digits_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn inspect_lists_io_operators_and_quantizable_layers() {
    let o = bin()
        .arg("inspect")
        .arg(digits_dir().join("digits_cnn.onnx"))
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("ai.onnx 17"), "{out}");
    assert!(
        out.contains("x ") && out.contains("[1, 1, 8, 8]") && out.contains("logits"),
        "{out}"
    );
    assert!(out.contains("quantizable layers (4 of 4"), "{out}");
}

#[test]
fn inspect_json_is_machine_readable() {
    let o = bin()
        .args(["inspect", "--json"])
        .arg(digits_dir().join("digits_cnn.onnx"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["opsets"]["ai.onnx"], 17);
    assert_eq!(v["inputs"][0]["name"], "x");
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!([1, 1, 8, 8]));
    assert_eq!(v["operators"]["Conv"], 3);
    assert_eq!(v["operators"]["Relu"], 3);
    let layers = v["layers"].as_array().unwrap();
    let ops: Vec<&str> = layers
        .iter()
        .map(|l| l["op_type"].as_str().unwrap())
        .collect();
    assert_eq!(ops, vec!["Conv", "Conv", "Conv", "Gemm"]);
    assert!(layers.iter().all(|l| l["quantizable"] == true));
}

#[test]
fn run_writes_outputs_matching_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let x = read_npy(&digits_dir().join("ort_x16.npy")).unwrap();
    let input = dir.path().join("x.npy");
    write_npy(&input, &x).unwrap();
    let out = dir.path().join("out");
    let o = bin()
        .arg("run")
        .arg(digits_dir().join("digits_cnn.onnx"))
        .arg("--input")
        .arg(format!("x={}", input.display()))
        .arg("--output-dir")
        .arg(&out)
        .arg("--json")
        .output()
        .unwrap();
    let (stdout, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v[0]["shape"], serde_json::json!([16, 10]));
    let got = read_npy(&out.join("logits.npy")).unwrap();
    let reference = read_npy(&digits_dir().join("ort_logits16.npy")).unwrap();
    let worst = got
        .to_f64_vec()
        .iter()
        .zip(reference.to_f64_vec())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "max abs difference to onnxruntime {worst}");
}

fn run_with(model: &Path, input: &Tensor) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    write_npy(&x, input).unwrap();
    let o = bin()
        .arg("run")
        .arg(model)
        .arg("-i")
        .arg(&x)
        .arg("--output-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    (o.status.code(), text(&o).1)
}

fn digits_input(shape: &[usize]) -> Tensor {
    Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(shape)))
}

#[test]
fn wrong_rank_and_dtype_are_input_errors() {
    let model = digits_dir().join("digits_cnn.onnx");
    let (code, err) = run_with(&model, &digits_input(&[1, 8, 8]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("input 'x'") && err.contains("rank 3") && err.contains("rank 4"),
        "{err}"
    );
    let (code, err) = run_with(
        &model,
        &Tensor::I64(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 1, 8, 8]))),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("int64") && err.contains("float32"), "{err}");
    let (code, err) = run_with(&model, &digits_input(&[1, 1, 9, 8]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("axis 2 has size 9"), "{err}");
}

fn altered_digits(alter: impl FnOnce(&mut ModelProto)) -> (tempfile::TempDir, PathBuf) {
    let mut m = load_model(&digits_dir().join("digits_cnn.onnx")).unwrap();
    alter(&mut m);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("altered.onnx");
    save_model(&m, &p).unwrap();
    (dir, p)
}

#[test]
fn an_unsupported_operator_is_named_with_its_node() {
    let mut name = String::new();
    let (_d, p) = altered_digits(|m| {
        let n: &mut NodeProto = &mut m.graph.as_mut().unwrap().node[1];
        n.op_type = Some("FancyActivation".into());
        name = n.name().to_string();
    });
    let (code, err) = run_with(&p, &digits_input(&[1, 1, 8, 8]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("FancyActivation") && err.contains(&format!("\"{name}\"")),
        "{err}"
    );
}

#[test]
fn a_cycle_is_reported_not_hung_on() {
    let (_d, p) = altered_digits(|m| {
        let g = m.graph.as_mut().unwrap();
        let last = g.node.last().unwrap().output[0].clone();
        g.node[1].input[0] = last; // the first ReLU now reads the logits
    });
    let (code, err) = run_with(&p, &digits_input(&[1, 1, 8, 8]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cycle"), "{err}");
    let o = bin().arg("inspect").arg(&p).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("cycle"));
}

#[test]
fn usage_errors_and_bad_files_exit_with_1() {
    let o = bin().args(["run"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let o = bin().args(["frobnicate"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let o = bin().args(["--help"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"definitely not protobuf \xff\xff\xff").unwrap();
    let o = bin().arg("inspect").arg(&junk).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o).1;
    assert!(
        err.contains("junk.onnx") && err.contains("not a valid ONNX model"),
        "{err}"
    );
    let o = bin()
        .arg("run")
        .arg(digits_dir().join("digits_cnn.onnx"))
        .args(["-i", "/nonexistent/x.npy"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("/nonexistent/x.npy"));
}

/// The digits model with the pads of the first node `pick` selects set to
/// `pads`; the node's name and the altered model.
fn digits_padded(
    pick: impl Fn(&NodeProto) -> bool,
    pads: &[i64],
) -> (String, tempfile::TempDir, PathBuf) {
    let mut name = String::new();
    let (d, p) = altered_digits(|m| {
        let n = m
            .graph
            .as_mut()
            .unwrap()
            .node
            .iter_mut()
            .find(|n| pick(n))
            .unwrap();
        name = n.name().to_string();
        n.attribute.retain(|a| a.name() != "pads");
        n.attribute
            .push(ascend_quant::onnx::attr::attr_ints("pads", pads));
    });
    (name, d, p)
}

#[test]
fn a_model_needing_absurd_memory_is_refused_before_running() {
    // The first Conv padded by a million on every side: whatever the plane,
    // at least (1,000,000 + 1,000,000 + 1)^2 positions.
    let (conv, _d, p) = digits_padded(
        |n| n.op_type() == "Conv",
        &[1_000_000, 1_000_000, 1_000_000, 1_000_000],
    );
    let (code, err) = run_with(&p, &digits_input(&[1, 1, 8, 8]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("'{conv}' (Conv)"))
            && err.contains(&format!("{} elements", 2_000_001u64 * 2_000_001)),
        "{err}"
    );
}

/// `calibrate` on `model` with the digits data into a fresh folder: the
/// exit code, stderr, and the files the folder holds afterwards.
fn calibrate_into_fresh_folder(model: &Path) -> (Option<i32>, String, Vec<PathBuf>) {
    let out = tempfile::tempdir().unwrap();
    let o = bin()
        .arg("calibrate")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(digits_dir().join("calib_x.npy"))
        .arg("--output")
        .arg(out.path().join("q"))
        .output()
        .unwrap();
    let left = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    (o.status.code(), text(&o).1, left)
}

/// A pad of a million rows on one side only passes the size checks (the
/// padded window is 3 million positions) but makes the second Conv compute
/// ~10^10 multiply-adds per sample (79 s of calibration before this
/// check): refused at once, naming the node and how much the pad grows its
/// plane, nothing written.
#[test]
fn a_model_needing_absurd_work_is_refused_before_calibrating() {
    let (_, _d, p) = digits_padded(|n| n.name() == "/3/Conv", &[1_000_000, 1, 1, 1]);
    let (code, err, left) = calibrate_into_fresh_folder(&p);
    assert_eq!(code, Some(1), "{err}");
    // /3/Conv reads 8×8 planes: (8 + 1,000,001) × (8 + 2) / 64.
    let growth = (8 + 1_000_001) * (8 + 2) / 64;
    assert!(
        err.contains("node '/3/Conv'")
            && err.contains(&format!("8×8 plane {growth}-fold"))
            && err.contains("ASCEND_QUANT_NO_WORK_LIMIT"),
        "{err}"
    );
    assert_eq!(err.matches("/3/Conv").count(), 1, "said once: {err}");
    assert!(left.is_empty(), "{left:?}");
}

/// A node whose input is the empty name (an omitted optional input, where
/// the operator needs one) is an error naming it, not a panic.
#[test]
fn an_empty_input_name_is_an_error_naming_the_node() {
    let (_d, p) = altered_digits(|m| {
        let g = m.graph.as_mut().unwrap();
        let flatten = g
            .node
            .iter_mut()
            .find(|n| n.op_type() == "Flatten")
            .unwrap();
        flatten.input[0] = String::new();
        flatten.name = Some("/9/Flatten".into());
    });
    let (code, err, left) = calibrate_into_fresh_folder(&p);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("node '/9/Flatten'") && err.contains("Flatten needs it"),
        "{err}"
    );
    assert!(left.is_empty(), "{left:?}");
    let (code, err) = run_with(&p, &digits_input(&[1, 1, 8, 8]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("node '/9/Flatten'"), "{err}");
}

#[test]
fn config_qat_writes_the_retrain_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("retrain.json");
    let o = bin()
        .args(["config", "--qat", "--model"])
        .arg(digits_dir().join("digits_cnn.onnx"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for layer in ["/0/Conv", "/3/Conv", "/6/Conv", "/10/Gemm"] {
        assert_eq!(v[layer]["retrain_enable"], true, "{layer}");
        assert_eq!(v[layer]["retrain_data_config"]["algo"], "ulq_quantize");
        assert_eq!(v[layer]["retrain_weight_config"]["algo"], "arq_retrain");
    }
    assert_eq!(
        v["/10/Gemm"]["retrain_weight_config"]["channel_wise"],
        false
    );
}

#[test]
fn each_cause_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.onnx");
    let not_onnx = dir.path().join("notes.onnx");
    std::fs::write(&not_onnx, b"\x0e\x0e\x0e not a model").unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("a.png"), b"\x89PNG\r\n\x1a\n cut short").unwrap();
    let digits = digits_dir().join("digits_cnn.onnx");
    let missing_npy = dir.path().join("missing.npy");
    // (model, data arguments, the cause that must appear exactly once)
    let cases: [(&Path, Vec<&OsStr>, &str); 4] = [
        (&missing, vec![], "No such file or directory"),
        (&not_onnx, vec![], "failed to decode Protobuf message"),
        (
            &digits,
            vec!["--data".as_ref(), missing_npy.as_os_str()],
            "No such file or directory",
        ),
        // An image that does not decode is named, with the fix.
        (
            &digits,
            vec!["--images".as_ref(), images.as_os_str()],
            "a.png",
        ),
    ];
    for (model, data, cause) in cases {
        let o = bin()
            .arg("calibrate")
            .arg("--model")
            .arg(model)
            .args(&data)
            .arg("--output")
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.matches(cause).count(), 1, "{err}");
        assert!(
            !dir.path().join("out_record.txt").exists(),
            "a failed run writes nothing"
        );
    }
}

#[test]
fn version_names_the_commit_built() {
    let o = bin().arg("--version").output().unwrap();
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        out.starts_with(&format!(
            "ascend-quant {} (commit ",
            env!("CARGO_PKG_VERSION")
        )),
        "{out}"
    );
    // Built from a git checkout (as CI builds), the commit is HEAD's.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(hash) => assert!(out.contains(&hash), "{out} should name {hash}"),
        None => assert!(out.contains("(commit unknown)"), "{out}"),
    }
}

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    let o = bin().args(["completions", "bash"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("ascend-quant.bash");
    std::fs::write(&script, &o.stdout).unwrap();
    // What bash offers after `ascend-quant cal<TAB>` and `ascend-quant calibrate --ima<TAB>`.
    let complete = |words: &str| {
        let run = format!(
            "source '{}'; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _ascend__quant ascend-quant \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let o = Command::new("bash").args(["-c", &run]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(complete("ascend-quant cal"), "calibrate");
    assert!(complete("ascend-quant calibrate --ima").contains("--images"));
    for shell in ["zsh", "fish"] {
        let o = bin().args(["completions", shell]).output().unwrap();
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(
            script.contains("calibrate") && script.contains("skip-bad-images"),
            "{shell}"
        );
    }
}

/// `run --input FILE.npz` feeds the archive's arrays by name (as
/// `calibrate --data` does); an array named after no input is refused.
#[test]
fn run_takes_an_npz_of_the_inputs_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let x = read_npy(&digits_dir().join("ort_x16.npy")).unwrap();
    let npz = dir.path().join("inputs.npz");
    common::write_npz(&npz, &[("x", &x)]);
    let out = dir.path().join("out");
    let o = bin()
        .arg("run")
        .arg(digits_dir().join("digits_cnn.onnx"))
        .arg("--input")
        .arg(&npz)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let got = read_npy(&out.join("logits.npy")).unwrap().to_f64_vec();
    let reference = read_npy(&digits_dir().join("ort_logits16.npy")).unwrap();
    let worst = got
        .iter()
        .zip(reference.to_f64_vec())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "max abs difference to onnxruntime {worst}");
    common::write_npz(&npz, &[("x", &x), ("mask", &x)]);
    let o = bin()
        .arg("run")
        .arg(digits_dir().join("digits_cnn.onnx"))
        .arg("--input")
        .arg(&npz)
        .arg("--output-dir")
        .arg(dir.path().join("out2"))
        .output()
        .unwrap();
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(1), "a usage error: {err}");
    assert!(err.contains("'mask' is not an input"), "{err}");
    assert!(!dir.path().join("out2").exists(), "nothing is written");
}
