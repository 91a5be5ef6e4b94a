//! How close each quantized layer's output stays to the float model's: the
//! float and the fake-quant model run side by side on the same samples and
//! each layer's two outputs are compared as soon as both exist.

use super::emit::LayerFactors;
use super::error::QuantError;
use super::run_settings::RunSettings;
use crate::data::Dataset;
use crate::onnx::ModelProto;
use crate::sim::{Executor, Session, SessionOptions};
use crate::similarity::Similarity;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::Mutex;

/// Per layer, the cosine similarity of its output in the float and the
/// fake-quant model over the first `run.similarity_samples` samples of the
/// first `batches` batches (accumulated, so one pass; NaN when none are
/// measured). The fake-quant model is dropped once its session exists.
pub fn layer_cosines(
    executor: &dyn Executor,
    float: &ModelProto,
    fake: ModelProto,
    factors: &[LayerFactors],
    data: &Dataset,
    run: &RunSettings,
    batches: usize,
) -> Result<HashMap<String, f64>, QuantError> {
    let outs: Vec<String> = factors.iter().map(|f| f.layer.output.clone()).collect();
    let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
    let opts = SessionOptions {
        keep: outs.clone(),
        dynamic_batch: run.dynamic_batch,
        optimize: true,
    };
    let fs = executor.prepare(float, &opts)?;
    let qs = executor.prepare(&fake, &opts)?;
    drop(fake);
    let pairs = Pairs::new(outs.len());
    let mut seen = 0;
    for b in 0..batches {
        if seen >= run.similarity_samples {
            break;
        }
        let mut batch = data.batch(run.batch_size, b)?;
        let n = batch.first().map(|(_, t)| t.shape()[0]).unwrap_or(0);
        let take = n.min(run.similarity_samples - seen);
        if take < n {
            batch = batch
                .into_iter()
                .map(|(name, t)| (name, t.slice_axis0(0..take)))
                .collect();
        }
        seen += take;
        let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
        // Two batch-1 runs share the cores better side by side than in turn.
        let (f, q) = rayon::join(
            || side(fs.as_ref(), &feeds, &refs, &pairs, Side::Float),
            || side(qs.as_ref(), &feeds, &refs, &pairs, Side::Quant),
        );
        f?;
        q?;
    }
    let sums = pairs.sums.into_inner().expect("no visitor panicked");
    Ok(factors
        .iter()
        .zip(sums)
        .map(|(f, a)| {
            (
                f.layer.name.clone(),
                if seen == 0 { f64::NAN } else { a.cosine() },
            )
        })
        .collect())
}

/// Which model a value comes from.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Float,
    Quant,
}

/// The meeting point of the two runs: the first output of a layer to be
/// computed waits here (a copy) until its twin arrives, which compares the
/// two and frees the copy. Only the values one run is ahead by are held.
struct Pairs {
    waiting: Mutex<Vec<Option<(Side, Tensor)>>>,
    sums: Mutex<Vec<Similarity>>,
}

impl Pairs {
    fn new(layers: usize) -> Pairs {
        Pairs {
            waiting: Mutex::new(vec![None; layers]),
            sums: Mutex::new(vec![Similarity::default(); layers]),
        }
    }

    /// Takes output `k` of `side`: compares it with its twin if that is
    /// waiting, else leaves a copy to wait for it.
    fn meet(&self, k: usize, side: Side, value: &Tensor) {
        let twin = {
            let mut waiting = self.waiting.lock().expect("no visitor panicked");
            match waiting[k].take() {
                Some((s, twin)) if s != side => Some(twin),
                _ => {
                    waiting[k] = Some((side, value.clone()));
                    None
                }
            }
        };
        let Some(twin) = twin else { return };
        let (f, q) = match side {
            Side::Float => (value, &twin),
            Side::Quant => (&twin, value),
        };
        let mut s = Similarity::default();
        if let (Some(f), Some(q)) = (f.as_f32(), q.as_f32()) {
            match (f.as_slice(), q.as_slice()) {
                (Some(f), Some(q)) => s.add_slices(f, q),
                _ => s.add(f.iter(), q.iter()),
            }
        }
        self.sums.lock().expect("no visitor panicked")[k].merge(&s);
    }
}

/// One model's run, each fetched output handed to the meeting point.
fn side(
    session: &dyn Session,
    feeds: &[(&str, &Tensor)],
    fetch: &[&str],
    pairs: &Pairs,
    side: Side,
) -> Result<(), QuantError> {
    Ok(session.run_visiting(feeds, fetch, &mut |k, value| pairs.meet(k, side, value))?)
}
