//! Automatic quantization on the digits model: a deliberately destroyed layer
//! is found and kept in float, the reproduce-config regenerates the same
//! models, and external evaluators are run and checked.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{bin, digits};

/// A config that clips /6/Conv's input to 2-3 % of its range.
fn destroyed_config(dir: &Path) -> PathBuf {
    let cfg = dir.join("base.json");
    let o = bin()
        .args(["config", "--model"])
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--output")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["/6/Conv"]["activation_quant_params"] = serde_json::json!({"num_bits": 8, "act_algo": "ifmr", "search_range": [0.02, 0.03], "search_step": 0.005});
    let bad = dir.join("bad.json");
    std::fs::write(&bad, v.to_string()).unwrap();
    bad
}

fn auto(dir: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["auto", "--quiet", "--json", "--model"])
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--data")
        .arg(digits().join("calib_x.npy"))
        .args(["--batch-size", "4", "--batch-num", "25", "--config"])
        .arg(destroyed_config(dir))
        .arg("--output")
        .arg(dir.join("auto"))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn the_destroyed_layer_is_rolled_back_and_the_config_reproduces_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let o = auto(
        dir.path(),
        &[
            "--eval-data",
            digits().join("test_x.npy").to_str().unwrap(),
            "--labels",
            digits().join("test_y.npy").to_str().unwrap(),
            "--max-drop",
            "0.4",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["rolled_back"], serde_json::json!(["/6/Conv"]));
    assert_eq!(report["float_metric"], 98.6);
    assert!(report["final_metric"].as_f64().unwrap() >= 98.2, "{report}");
    let ranking: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("auto_auto_ranking.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ranking[0]["name"], "/6/Conv",
        "the destroyed layer ranks worst"
    );
    let history: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("auto_auto_history.json")).unwrap(),
    )
    .unwrap();
    let tries = history.as_array().unwrap();
    assert!(
        !tries[0]["passed"].as_bool().unwrap(),
        "all layers quantized must fail with the destroyed layer"
    );
    assert_eq!(report["configurations_evaluated"], tries.len());

    // calibrate with the written config gives the same models, byte for
    // byte, without repeating auto's --batch-size: the config holds it.
    let o = common::calibrate_digits(&dir.path().join("again"))
        .args(["--quiet", "--config"])
        .arg(dir.path().join("auto_auto_config.json"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for kind in ["deploy_model.onnx", "fake_quant_model.onnx", "record.txt"] {
        let a = std::fs::read(dir.path().join(format!("auto_{kind}"))).unwrap();
        let b = std::fs::read(dir.path().join(format!("again_{kind}"))).unwrap();
        assert!(a == b, "{kind} differs");
    }
}

#[test]
fn external_evaluator_number_garbage_failure_and_unreachable_target() {
    let dir = tempfile::tempdir().unwrap();
    // Scores the float model 100 and every candidate 99.8: the first try passes.
    let ok = "case {model} in *float*) echo log line; echo 100;; *) echo 99.8;; esac";
    let o = auto(dir.path(), &["--evaluator", ok]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["final_metric"], 99.8);
    assert_eq!(report["rolled_back"], serde_json::json!([]));

    let o = auto(dir.path(), &["--evaluator", "echo not-a-number"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("echo not-a-number") && err.contains("not a number"),
        "{err}"
    );

    let o = auto(dir.path(), &["--evaluator", "echo oops >&2; exit 4"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"));

    // A timed-out evaluator is ended with everything it started, and nothing else.
    let pidfile = dir.path().join("grandchild.pid");
    let slow = format!("sleep 600 & echo $! > '{}'; wait", pidfile.display());
    let o = auto(
        dir.path(),
        &["--evaluator", &slow, "--evaluator-timeout", "2"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("did not finish within 2 s"));
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap_or_else(|e| panic!("the evaluator never started its child within 2 s: {e}"))
        .trim()
        .to_string();
    // SIGKILL was sent before `auto` returned; the child is gone (or a
    // zombie) once the kernel has delivered it. Poll for that, up to 30 s.
    let gone = (0..300).any(|_| {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let done = state.is_empty() || state.contains(") Z");
        if !done {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        done
    });
    assert!(
        gone,
        "the evaluator's child {pid} still runs 30 s after the timeout"
    );

    // Nothing reaches the target: exit 3, the best configuration is still written.
    let never = "case {model} in *float*) echo 100;; *) echo 50;; esac";
    let o = auto(dir.path(), &["--evaluator", never]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("written anyway"));
    assert!(dir.path().join("auto_deploy_model.onnx").exists());
}

#[test]
fn a_verbose_evaluator_and_a_path_with_spaces_work() {
    let dir = tempfile::tempdir().unwrap();
    let spaced = dir.path().join("my models");
    std::fs::create_dir(&spaced).unwrap();
    // 300 kB of progress output (more than a pipe holds) before the number;
    // the model path arrives whole, as {model} and in the environment.
    let cmd = "test -f {model} && test -f \"$ASCEND_QUANT_MODEL\" || exit 9; \
               head -c 300000 /dev/zero | tr '\\0' '#'; echo; \
               case {model} in *float*) echo 100;; *) echo 99.9;; esac";
    let o = auto(&spaced, &["--evaluator", cmd, "--evaluator-timeout", "60"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["final_metric"], 99.9);
    // The evaluated models lived in a temporary folder that is gone now.
    let left: Vec<String> = std::fs::read_dir(&spaced)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A candidate that gets every sample wrong: scored in full it is at 0 %;
/// scored against a target of 99 % it stops after the first group of 8
/// samples and reports the best it could still have had, (0 + 56) / 64.
#[test]
fn a_hopeless_candidate_stops_early_with_its_best_reachable_score() {
    use ascend_quant::auto::{Evaluator, InternalEvaluator, Metric};
    use ascend_quant::data::Dataset;
    use ascend_quant::onnx::builder::node;
    use ascend_quant::sim::CpuExecutor;
    use ascend_quant::tensor::Tensor;
    use ndarray::{ArrayD, IxDyn};
    let scaled = |c: f32| {
        common::model_x_to_y(
            vec![node("Mul", "mul", &["x", "c"], &["y"], vec![])],
            vec![("c", ArrayD::from_elem(IxDyn(&[1]), c))],
            &[1, 2],
            &[1, 2],
        )
    };
    // Sample i: (i + 1, 0): class 0 for the float model, class 1 negated.
    let x = ArrayD::from_shape_fn(IxDyn(&[64, 2]), |i| {
        if i[1] == 0 { i[0] as f32 + 1.0 } else { 0.0 }
    });
    let data = Dataset::from_arrays(
        vec![("x".into(), Tensor::F32(x))],
        &["x".into()],
        "x".into(),
    )
    .unwrap();
    let mut e = InternalEvaluator::new(&CpuExecutor, &data, 1, false, Metric::Top1Agreement);
    assert_eq!(e.float_score(&scaled(1.0)).unwrap(), 100.0);
    assert_eq!(e.evaluate(&scaled(-1.0)).unwrap(), 0.0);
    assert_eq!(e.evaluate_against(&scaled(-1.0), 99.0).unwrap(), 87.5);
    // A candidate that reaches the target is scored in full.
    assert_eq!(e.evaluate_against(&scaled(2.0), 99.0).unwrap(), 100.0);
}
