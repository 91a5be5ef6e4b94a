//! Quantization-aware training end to end on the digits CNN: from a
//! deliberately bad start (one layer's input clipped to 2.5 % of its range)
//! the trained fake-quant and deploy models recover the float accuracy.

use ascend_quant::data::{read_npy, write_npy};
use ascend_quant::onnx::{ModelProto, load_model};
use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
use ascend_quant::tensor::Tensor;
use std::path::Path;

mod common;
use common::{bin, digits};

fn top1(model: &ModelProto, x: &Tensor, y: &[i64]) -> f64 {
    let s = CpuExecutor
        .prepare(
            model,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let out = s.run(&[("x", x)], &["logits"]).unwrap();
    let logits = out[0].as_f32().unwrap();
    let hits = logits
        .outer_iter()
        .zip(y)
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
            best.0 as i64 == **label
        })
        .count();
    100.0 * hits as f64 / y.len() as f64
}

fn split(dir: &Path) -> (Tensor, Vec<i64>) {
    let Tensor::F32(x) = read_npy(&digits().join("test_x.npy")).unwrap() else {
        panic!()
    };
    let Tensor::I64(y) = read_npy(&digits().join("test_y.npy")).unwrap() else {
        panic!()
    };
    let train_x = x.slice_axis(ndarray::Axis(0), (0..400).into()).to_owned();
    let train_y = y.slice_axis(ndarray::Axis(0), (0..400).into()).to_owned();
    write_npy(&dir.join("train_x.npy"), &Tensor::F32(train_x)).unwrap();
    write_npy(&dir.join("train_y.npy"), &Tensor::I64(train_y)).unwrap();
    let held_x = x.slice_axis(ndarray::Axis(0), (400..500).into()).to_owned();
    let held_y: Vec<i64> = y.iter().skip(400).copied().collect();
    write_npy(&dir.join("held_x.npy"), &Tensor::F32(held_x.clone())).unwrap();
    write_npy(
        &dir.join("held_y.npy"),
        &Tensor::I64(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[100]), held_y.clone()).unwrap(),
        ),
    )
    .unwrap();
    (Tensor::F32(held_x), held_y)
}

#[test]
fn qat_recovers_from_a_bad_clip() {
    let dir = tempfile::tempdir().unwrap();
    let (held_x, held_y) = split(dir.path());
    let cfg = dir.path().join("retrain.json");
    // /6/Conv's input spans about [0, 16]; start it at [0, 0.4].
    std::fs::write(
        &cfg,
        r#"{"version": 1, "batch_num": 4, "/6/Conv": {"retrain_data_config":
            {"algo": "ulq_quantize", "clip_max": 0.4, "clip_min": 0.0, "fixed_min": true}}}"#,
    )
    .unwrap();
    let run = |prefix: &Path, steps: &str| {
        let mut c = bin();
        c.args(["qat", "--quiet", "--json", "--model"])
            .arg(digits().join("digits_cnn.onnx"))
            .arg("--data")
            .arg(dir.path().join("train_x.npy"))
            .arg("--labels")
            .arg(dir.path().join("train_y.npy"))
            .arg("--config")
            .arg(&cfg)
            .args([
                "--steps",
                steps,
                "--batch-size",
                "20",
                "--lr",
                "1e-4",
                "--clip-lr",
                "0.05",
            ])
            .arg("--output")
            .arg(prefix);
        c
    };
    // No training: the models of the bad start.
    let o = run(&dir.path().join("start"), "0").output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let start = load_model(&dir.path().join("start_fake_quant_model.onnx")).unwrap();
    let prefix = dir.path().join("q");
    let o = run(&prefix, "160")
        .arg("--eval-data")
        .arg(dir.path().join("held_x.npy"))
        .arg("--eval-labels")
        .arg(dir.path().join("held_y.npy"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let losses = report["loss_per_step"].as_array().unwrap();
    let first = losses[0].as_f64().unwrap();
    let last = losses.last().unwrap().as_f64().unwrap();
    let float = load_model(&digits().join("digits_cnn.onnx")).unwrap();
    let fake = load_model(&dir.path().join("q_fake_quant_model.onnx")).unwrap();
    let deploy = load_model(&dir.path().join("q_deploy_model.onnx")).unwrap();
    let (f, q, d) = (
        top1(&float, &held_x, &held_y),
        top1(&fake, &held_x, &held_y),
        top1(&deploy, &held_x, &held_y),
    );
    let s = top1(&start, &held_x, &held_y);
    println!(
        "loss {first:.4} -> {last:.4}; held-out top-1: float {f}, bad start {s}, fake-quant {q}, deploy {d}"
    );
    println!("clips {}", report["clips"]);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(s <= f - 10.0, "the start must be bad: {s} vs float {f}");
    // Within 0.5 point of float on 100 held-out images (one image is 1 point).
    assert!(
        q >= f - 0.5 && d >= f - 0.5,
        "float {f}, fake-quant {q}, deploy {d}"
    );
}

#[test]
fn bad_qat_input_is_a_clear_error_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let qat = |extra: &[&str]| {
        bin()
            .args(["qat", "--quiet", "--model"])
            .arg(digits().join("digits_cnn.onnx"))
            .arg("--data")
            .arg(digits().join("calib_x.npy"))
            .arg("--output")
            .arg(dir.path().join("q"))
            .args(extra)
            .output()
            .unwrap()
    };
    let labels = digits().join("test_y.npy");
    for (extra, needle) in [
        (
            vec!["--labels", labels.to_str().unwrap()],
            "500 labels for 100 samples",
        ),
        (vec!["--lr", "0"], "--lr and --clip-lr must be positive"),
        (vec!["--loss", "ce"], "--loss ce needs --labels"),
    ] {
        let o = qat(&extra);
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{extra:?}"
        );
    }
}

/// Stopping after one epoch and resuming from its checkpoint ends where an
/// uninterrupted run ends: the same record and deploy model, byte for byte
/// (the training is deterministic on the CPU).
#[test]
fn resume_continues_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    split(dir.path());
    let qat = |prefix: &str, steps: &str, resume: Option<&Path>| {
        let mut c = bin();
        c.args(["qat", "--quiet", "--model"])
            .arg(digits().join("digits_cnn.onnx"))
            .arg("--data")
            .arg(dir.path().join("train_x.npy"))
            .arg("--labels")
            .arg(dir.path().join("train_y.npy"))
            .args([
                "--steps",
                steps,
                "--batch-size",
                "40",
                "--lr",
                "1e-4",
                "--clip-lr",
                "0.02",
            ])
            .arg("--output")
            .arg(dir.path().join(prefix));
        if let Some(r) = resume {
            c.arg("--resume").arg(r);
        }
        let o = c.output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    qat("whole", "20", None); // two epochs of 10 batches
    qat("half", "10", None); // one epoch, then stop
    let checkpoint = dir.path().join("half_qat_checkpoint");
    assert!(checkpoint.is_file());
    qat("resumed", "20", Some(&checkpoint));
    for suffix in [
        "_record.txt",
        "_deploy_model.onnx",
        "_fake_quant_model.onnx",
    ] {
        let read = |p: &str| std::fs::read(dir.path().join(format!("{p}{suffix}"))).unwrap();
        assert!(read("whole") == read("resumed"), "{suffix} differs");
        assert!(
            read("whole") != read("half"),
            "{suffix}: training must change it"
        );
    }
}

/// Ctrl-C (SIGINT) ends the current step, writes its checkpoint and exits
/// with 2; `--resume` continues from exactly that step.
#[test]
fn ctrl_c_writes_a_checkpoint_to_resume_from() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    split(dir.path());
    let command = |steps: &str| {
        let mut c = bin();
        c.args(["qat", "--model"])
            .arg(digits().join("digits_cnn.onnx"))
            .arg("--data")
            .arg(dir.path().join("train_x.npy"))
            .arg("--labels")
            .arg(dir.path().join("train_y.npy"))
            .args(["--steps", steps, "--batch-size", "20", "--lr", "1e-4"])
            .arg("--output")
            .arg(dir.path().join("q"));
        c
    };
    // So many steps that no machine finishes them before the signal lands:
    // whichever step it interrupts, the checks below hold.
    let mut child = command("100000000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Wait for the third step, then interrupt.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 3/") {
            break;
        }
    }
    // SAFETY: kill(2) on the child's pid, which has not been waited for.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "SIGINT could not be sent");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{rest:?}");
    let message = rest
        .iter()
        .find(|l| l.contains("interrupted after step"))
        .cloned();
    let message = message.unwrap_or_else(|| panic!("{rest:?}"));
    let step: usize = message
        .split("interrupted after step ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!((3..100_000_000).contains(&step), "{message}");
    assert!(!dir.path().join("q_deploy_model.onnx").exists());
    let checkpoint = dir.path().join("q_qat_checkpoint");
    let o = command(&(step + 2).to_string())
        .arg("--quiet")
        .arg("--json")
        .arg("--resume")
        .arg(&checkpoint)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["resumed_from_step"], step);
    assert_eq!(report["loss_per_step"].as_array().unwrap().len(), step + 2);
}

#[test]
fn qat_reads_amct_bin_folders() {
    let dir = tempfile::tempdir().unwrap();
    let bins = dir.path().join("bins");
    std::fs::create_dir(&bins).unwrap();
    let Tensor::F32(x) = read_npy(&digits().join("calib_x.npy")).unwrap() else {
        panic!()
    };
    let values: Vec<f32> = x.iter().copied().collect();
    for (k, batch) in values.chunks(20 * 64).take(3).enumerate() {
        let bytes: Vec<u8> = batch.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(bins.join(format!("{k}.bin")), bytes).unwrap();
    }
    let o = bin()
        .args(["qat", "--quiet", "--json", "--model"])
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--data-dir")
        .arg(&bins)
        .args([
            "--input-shape",
            "x:20,1,8,8",
            "--batch-size",
            "20",
            "--steps",
            "3",
        ])
        .arg("--output")
        .arg(dir.path().join("q"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["loss"], "kl");
    assert_eq!(report["loss_per_step"].as_array().unwrap().len(), 3);
}
