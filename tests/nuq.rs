//! NUQ end to end on the digits CNN: few distinct int8 values per layer,
//! each the nearest kept level to the uniform weight, honest compression
//! figures, and the accuracy kept.

mod common;

use ascend_quant::onnx::{ModelProto, load_model, to_tensor};
use ascend_quant::tensor::Tensor;
use common::{calibrate_digits, digits};
use std::collections::BTreeMap;
use std::path::Path;

fn run(dir: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let prefix = dir.join(name);
    let o = calibrate_digits(&prefix)
        .args(["--quiet", "--batch-num", "64"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}_quant_report.json"))).unwrap(),
    )
    .unwrap()
}

fn int8_weights(model: &ModelProto) -> BTreeMap<String, Vec<i8>> {
    let g = model.graph.as_ref().unwrap();
    g.node
        .iter()
        .filter(|n| matches!(n.op_type(), "Conv" | "Gemm"))
        .map(|n| {
            let t = g
                .initializer
                .iter()
                .find(|t| t.name() == n.input[1])
                .unwrap();
            let Tensor::I8(a) = to_tensor(t).unwrap() else {
                panic!("int8 weight")
            };
            (n.name().to_string(), a.iter().copied().collect())
        })
        .collect()
}

fn top1(model: &ModelProto) -> f64 {
    common::digits_accuracy(&common::digits_logits(model))
}

fn entropy(v: &[i8]) -> f64 {
    let mut counts = BTreeMap::new();
    for x in v {
        *counts.entry(*x).or_insert(0usize) += 1;
    }
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / v.len() as f64;
            -p * p.log2()
        })
        .sum()
}

#[test]
fn nuq_keeps_few_levels_each_the_nearest_to_the_uniform_weight() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), "uniform", &[]);
    let cfg = dir.path().join("nuq.cfg");
    std::fs::write(
        &cfg,
        "nuq_config { nuq_quantize { num_steps: 16 num_of_iteration: 1 } }\n",
    )
    .unwrap();
    let report = run(
        dir.path(),
        "nuq",
        &["--simple-config", cfg.to_str().unwrap()],
    );
    let uniform = int8_weights(&load_model(&dir.path().join("uniform_deploy_model.onnx")).unwrap());
    let nuq_model = load_model(&dir.path().join("nuq_deploy_model.onnx")).unwrap();
    let nuq = int8_weights(&nuq_model);
    assert_eq!(uniform.len(), 4);
    for l in report["layers"].as_array().unwrap() {
        let name = l["name"].as_str().unwrap();
        let levels: Vec<i8> = l["nuq"]["levels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i8)
            .collect();
        assert_eq!(levels.len(), 16, "{name}");
        let (u, n) = (&uniform[name], &nuq[name]);
        for (&a, &b) in u.iter().zip(n) {
            // b is a kept level, and no kept level is nearer to a (ties go to the lower).
            assert!(levels.contains(&b), "{name}: {b} not a level");
            let d = (i32::from(a) - i32::from(b)).abs();
            for &l in &levels {
                let e = (i32::from(a) - i32::from(l)).abs();
                assert!(
                    e > d || (e == d && b <= l),
                    "{name}: {a} went to {b}, {l} is nearer"
                );
            }
        }
        let distinct: std::collections::BTreeSet<_> = n.iter().collect();
        assert!(distinct.len() <= 16);
        assert_eq!(
            l["nuq"]["distinct"][1].as_u64().unwrap() as usize,
            distinct.len()
        );
        let bits = l["nuq"]["bits_per_weight"].as_array().unwrap();
        assert!(
            (bits[0].as_f64().unwrap() - entropy(u)).abs() < 1e-9,
            "{name}"
        );
        assert!(
            (bits[1].as_f64().unwrap() - entropy(n)).abs() < 1e-9,
            "{name}"
        );
        assert!(entropy(n) < 4.0 + 1e-9 && entropy(n) < entropy(u), "{name}");
    }
    let listed = std::fs::read_to_string(dir.path().join("nuq_nuq_layer_record.txt")).unwrap();
    assert_eq!(listed.trim(), "/0/Conv;/3/Conv;/6/Conv;/10/Gemm");
    // The uniform run writes no such list.
    assert!(!dir.path().join("uniform_nuq_layer_record.txt").exists());
    let fake = |p: &str| top1(&load_model(&dir.path().join(p)).unwrap());
    let (float, u, n) = (
        top1(&load_model(&digits().join("digits_cnn.onnx")).unwrap()),
        fake("uniform_fake_quant_model.onnx"),
        fake("nuq_fake_quant_model.onnx"),
    );
    eprintln!("top-1 float {float}, uniform {u}, nuq16 {n}");
    assert!(n >= float - 1.0, "NUQ 16 levels: {n} vs float {float}");
    // The deploy model runs on the simulator and agrees with the fake-quant model.
    assert!((top1(&nuq_model) - n).abs() <= 0.4);
}
