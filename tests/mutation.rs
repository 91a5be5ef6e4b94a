//! Bounded mutation testing on stable Rust: every parser of user files gets
//! a few thousand deterministic mutations of its seed files (the fuzz seeds
//! in `fuzz/seeds/<parser>/`) and must answer each with `Ok` or `Err`, never
//! a panic. The open-ended search is `scripts/fuzz.sh` (cargo-fuzz); this is
//! the part that runs in every `cargo test`.

mod parsers;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that tend to find size and sign mistakes.
const INTERESTING: [&[u8]; 8] = [
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
    &[0x00],
    &[0xff],
    b"1099511627776",
    b"-1",
    b"nan",
    b"1e39",
];

/// One mutation of `seed`: bit flips, byte sets, inserted or removed runs,
/// truncation, duplicated ranges or an interesting value spliced in.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = rng.next() as u8;
            }
            2 => {
                let run: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(at..at, run);
            }
            3 => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 => v.truncate(at),
            5 if !v.is_empty() => {
                let start = rng.below(v.len());
                let end = (start + 1 + rng.below(64)).min(v.len());
                let copy = v[start..end].to_vec();
                v.splice(at..at, copy);
            }
            _ => {
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let end = (at + value.len()).min(v.len());
                v.splice(at..end, value.iter().copied());
            }
        }
    }
    v
}

fn seeds(parser: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(parser);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Runs `parse` on every seed and on `count` mutations; fails naming the
/// first input that panicked (written beside the target folder to reproduce).
fn survive(parser: &str, count: usize, parse: fn(&[u8]) -> Result<(), String>) {
    let seeds = seeds(parser);
    for s in &seeds {
        parse(s).unwrap_or_else(|e| panic!("seed of {parser} must parse: {e}"));
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ parser.len() as u64);
    let mut errors = 0;
    for i in 0..count {
        let input = mutate(&seeds[i % seeds.len()], &mut rng);
        match catch_unwind(AssertUnwindSafe(|| parse(&input))) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => errors += 1,
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("ascend-quant-{parser}-panic-{i}"));
                let _ = std::fs::write(&keep, &input);
                panic!(
                    "{parser}: mutation {i} panicked; input saved to {}",
                    keep.display()
                );
            }
        }
    }
    // Most mutations of a structured file are invalid: the parsers must notice.
    assert!(errors > 0, "{parser}: no mutation was refused");
}

#[test]
fn model_parsing_never_panics() {
    survive("model", 3000, parsers::model);
}

#[test]
fn record_parsing_never_panics() {
    survive("record", 3000, parsers::record);
}

#[test]
fn json_config_parsing_never_panics() {
    survive("json_config", 3000, parsers::json_config);
}

#[test]
fn retrain_config_parsing_never_panics() {
    survive("retrain_config", 3000, parsers::retrain_config);
}

#[test]
fn retrain_simple_config_parsing_never_panics() {
    survive(
        "retrain_simple_config",
        3000,
        parsers::retrain_simple_config,
    );
}

#[test]
fn simple_config_parsing_never_panics() {
    survive("simple_config", 3000, parsers::simple_config);
}

#[test]
fn npy_parsing_never_panics() {
    survive("npy", 3000, parsers::npy);
}

#[test]
fn bin_folder_parsing_never_panics() {
    survive("bin_folder", 3000, parsers::bin_folder);
}

#[test]
fn image_folder_reading_never_panics() {
    survive("image_folder", 1500, parsers::image_folder);
}

#[test]
fn running_a_mutated_model_never_panics() {
    survive("model_run", 1500, parsers::model_run);
}

/// Structured mutations byte flips rarely make: on the digits model, each
/// input of each node emptied (ONNX's "omitted optional input") or
/// dropped, and each node's inputs cleared. Every one is run through the
/// executor every command uses and must end in `Ok` or `Err`.
#[test]
fn running_models_with_missing_inputs_never_panics() {
    use ascend_quant::onnx::{load_model_bytes, proto::ModelProto};
    use prost::Message;
    let digits = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits/digits_cnn.onnx"),
    )
    .unwrap();
    let model = load_model_bytes(&digits, Path::new("digits_cnn.onnx"), None).unwrap();
    let nodes = model.graph.as_ref().unwrap().node.len();
    let mut variants: Vec<(String, ModelProto)> = Vec::new();
    for n in 0..nodes {
        let inputs = model.graph.as_ref().unwrap().node[n].input.len();
        for k in 0..inputs {
            for drop in [false, true] {
                let mut m = model.clone();
                let node = &mut m.graph.as_mut().unwrap().node[n];
                if drop {
                    node.input.truncate(k);
                } else {
                    node.input[k] = String::new();
                }
                variants.push((format!("node {n} input {k} (drop: {drop})"), m));
            }
        }
        let mut m = model.clone();
        m.graph.as_mut().unwrap().node[n].input.clear();
        variants.push((format!("node {n} without inputs"), m));
    }
    let mut refused = 0;
    for (what, m) in &variants {
        let bytes = m.encode_to_vec();
        match catch_unwind(AssertUnwindSafe(|| parsers::model_run(&bytes))) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("{what}: running it panicked"),
        }
    }
    // Every first input of this model is required, so most variants fail.
    assert!(
        refused * 2 > variants.len(),
        "{refused} of {}",
        variants.len()
    );
    // The model really runs: the unchanged model succeeds, and one whose
    // classifier weight is too short for its input passes every check
    // before the run and fails in it, naming the node.
    parsers::model_run(&digits).unwrap();
    let mut short = model.clone();
    let g = short.graph.as_mut().unwrap();
    let gemm = g.node.iter().find(|n| n.op_type() == "Gemm").unwrap();
    let (name, weight) = (gemm.name().to_string(), gemm.input[1].clone());
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.name() == weight)
        .unwrap();
    let rows = t.dims[0] as usize;
    *t = ascend_quant::onnx::to_proto(
        &weight,
        &ascend_quant::tensor::Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[rows, 3]))),
        ascend_quant::onnx::Storage::Raw,
    );
    let e = parsers::model_run(&short.encode_to_vec()).unwrap_err();
    assert!(e.contains(&name), "{e}");
}

#[test]
fn text_file_reading_never_panics() {
    survive("text_file", 3000, parsers::text_file);
}
