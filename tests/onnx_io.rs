//! Model I/O: lossless round trips, external data, and clear errors on bad files.

use ascend_quant::onnx::proto::tensor_proto::DataLocation;
use ascend_quant::onnx::proto::{
    FunctionProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
};
use ascend_quant::onnx::{SaveOptions, load_model, load_model_bytes, save_model, save_model_with};
use prost::Message;
use std::path::{Path, PathBuf};

fn fixture_models() -> Vec<PathBuf> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = vec![base.join("digits/digits_cnn.onnx")];
    for e in std::fs::read_dir(base.join("node")).unwrap() {
        let p = e.unwrap().path().join("model.onnx");
        if p.exists() {
            out.push(p);
        }
    }
    out
}

fn digits() -> ModelProto {
    load_model(&fixture_models()[0]).unwrap()
}

#[test]
fn every_fixture_model_round_trips_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let models = fixture_models();
    assert!(models.len() > 200);
    for path in &models {
        let first = load_model(path).unwrap();
        let out = dir.path().join("m.onnx");
        save_model(&first, &out).unwrap();
        let second = load_model(&out).unwrap();
        assert_eq!(first, second, "{}", path.display());
        // The bytes we write decode to the same message as the original file's.
        let original = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
        assert_eq!(original, second, "{}", path.display());
    }
}

#[test]
fn fields_prost_would_drop_if_undeclared_survive() {
    let mut m = digits();
    m.metadata_props.push(StringStringEntryProto {
        key: Some("author".into()),
        value: Some("me".into()),
    });
    m.functions.push(FunctionProto {
        name: Some("MyRelu".into()),
        domain: Some("custom".into()),
        input: vec!["x".into()],
        output: vec!["y".into()],
        node: vec![NodeProto {
            op_type: Some("Relu".into()),
            input: vec!["x".into()],
            output: vec!["y".into()],
            ..Default::default()
        }],
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        ..Default::default()
    });
    let g = m.graph.as_mut().unwrap();
    g.metadata_props.push(StringStringEntryProto {
        key: Some("k".into()),
        value: Some("v".into()),
    });
    g.node[0].metadata_props.push(StringStringEntryProto {
        key: Some("nk".into()),
        value: Some("nv".into()),
    });
    g.doc_string = Some("graph doc".into());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.onnx");
    save_model(&m, &p).unwrap();
    let back = load_model(&p).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.functions[0].name(), "MyRelu");
    assert_eq!(
        back.graph.as_ref().unwrap().node[0].metadata_props[0].value(),
        "nv"
    );
}

#[test]
fn large_models_spill_to_external_data_and_load_back() {
    let m = digits();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.onnx");
    // A tiny inline limit forces the spilling path the 2 GB limit would take.
    save_model_with(
        &m,
        &p,
        &SaveOptions {
            inline_limit: 10_000,
            min_external_bytes: 1024,
        },
    )
    .unwrap();
    let data = dir.path().join("big.onnx.data");
    assert!(data.exists());
    let raw = ModelProto::decode(std::fs::read(&p).unwrap().as_slice()).unwrap();
    let external: Vec<&TensorProto> = raw
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter(|t| t.data_location() == DataLocation::External)
        .collect();
    assert!(!external.is_empty());
    assert!(std::fs::metadata(&p).unwrap().len() < 10_000);
    assert_eq!(load_model(&p).unwrap(), m);
}

/// Builds a model whose first initializer is external with the given entries.
fn with_external(
    dir: &Path,
    location: &str,
    offset: usize,
    length: usize,
    file_bytes: usize,
) -> PathBuf {
    let mut m = digits();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.raw_data = None;
    t.float_data.clear();
    t.data_location = Some(DataLocation::External as i32);
    let e = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    t.external_data = vec![
        e("location", location.into()),
        e("offset", offset.to_string()),
        e("length", length.to_string()),
    ];
    std::fs::write(dir.join("w.bin"), vec![0u8; file_bytes]).unwrap();
    let p = dir.join("m.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

#[test]
fn external_data_is_read_from_the_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let m = digits();
    let n = m.graph.as_ref().unwrap().initializer[0]
        .raw_data
        .as_ref()
        .unwrap()
        .len();
    let p = with_external(dir.path(), "w.bin", 0, n, n);
    let loaded = load_model(&p).unwrap();
    assert_eq!(
        loaded.graph.unwrap().initializer[0]
            .raw_data
            .as_ref()
            .unwrap(),
        &vec![0u8; n]
    );
}

#[test]
fn external_data_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("model");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(dir.path().join("secret.bin"), [0u8; 64]).unwrap();
    for location in ["../secret.bin", "/etc/passwd"] {
        let p = with_external(&sub, location, 0, 16, 16);
        let msg = load_model(&p).unwrap_err().to_string();
        assert!(
            msg.contains("m.onnx") && msg.contains("outside")
                || msg.contains("not a relative path"),
            "{msg}"
        );
        assert!(msg.contains(location), "{msg}");
    }
    // A symbolic link that leads out of the folder is refused too.
    std::os::unix::fs::symlink(dir.path().join("secret.bin"), sub.join("link.bin")).unwrap();
    let p = with_external(&sub, "link.bin", 0, 16, 16);
    let msg = load_model(&p).unwrap_err().to_string();
    assert!(msg.contains("outside the model's folder"), "{msg}");
}

#[test]
fn external_data_past_the_end_of_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_external(dir.path(), "w.bin", 100, 1000, 500);
    let msg = load_model(&p).unwrap_err().to_string();
    let tensor = digits().graph.unwrap().initializer[0].name().to_string();
    assert!(
        msg.contains("past the end") && msg.contains(&format!("tensor '{tensor}'")),
        "the message names the tensor: {msg}"
    );
    assert!(msg.contains("m.onnx"), "{msg}");
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() {
    let bytes = std::fs::read(&fixture_models()[0]).unwrap();
    for (what, data) in [
        ("truncated", &bytes[..bytes.len() / 2]),
        ("foreign", b"\x89PNG\r\n\x1a\n not a model".as_slice()),
    ] {
        let err = load_model_bytes(data, Path::new("broken.onnx"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.onnx") && err.contains("not a valid ONNX model"),
            "{what}: {err}"
        );
    }
    let err = load_model(Path::new("/nonexistent/model.onnx"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/model.onnx"), "{err}");
}

#[test]
fn a_model_without_a_graph_is_an_error() {
    let m = ModelProto {
        ir_version: Some(8),
        ..Default::default()
    };
    let err = load_model_bytes(&m.encode_to_vec(), Path::new("empty.onnx"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.onnx") && err.contains("no graph"),
        "{err}"
    );
}

#[test]
fn a_failed_save_leaves_the_old_file_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.onnx");
    std::fs::write(&p, b"old").unwrap();
    // Saving into a folder that does not exist fails without touching anything.
    let err = save_model(&digits(), &dir.path().join("missing/m.onnx"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing/m.onnx"), "{err}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        b"old",
        "the old file is left alone"
    );
    save_model(&digits(), &p).unwrap();
    assert_eq!(
        load_model(&p).unwrap(),
        digits(),
        "a successful save replaces it whole"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["m.onnx".to_string()]);
}

#[test]
fn raw_data_of_the_wrong_length_is_caught_at_load() {
    let mut m = digits();
    let t = &mut m.graph.as_mut().unwrap().initializer[1];
    let name = t.name().to_string();
    t.raw_data.as_mut().unwrap().truncate(3);
    let err = load_model_bytes(&m.encode_to_vec(), Path::new("corrupt.onnx"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&name) && err.contains("3 bytes"), "{err}");
}
