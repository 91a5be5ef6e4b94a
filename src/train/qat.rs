//! The QAT training loop: batches through the fake-quantized graph, a loss
//! (cross-entropy on labels, or distillation from the float model), the
//! backward pass, and Adam on the float weights and the learnable clips.

use super::checkpoint::{AdamState, Checkpoint};
use super::graph::{TrainError, TrainGraph};
use super::optim::Adam;
use crate::data::Dataset;
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set to stop training at the end of the current step (Ctrl-C): the run
/// writes a checkpoint of that step and returns [`TrainError::Interrupted`].
static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every running training loop to stop after its current step.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// What the loss compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    /// Softmax cross-entropy of the output against integer labels.
    CrossEntropy,
    /// KL divergence of the student's softmax from the float teacher's.
    Distillation,
    /// Mean squared error to the float teacher's outputs.
    Mse,
    /// One minus the cosine of each sample's output with the teacher's
    /// (embeddings), averaged over the samples.
    Cosine,
}

impl LossKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::CrossEntropy => "ce",
            LossKind::Distillation => "kl",
            LossKind::Mse => "mse",
            LossKind::Cosine => "cosine",
        }
    }
}

/// How to train.
#[derive(Clone, Debug)]
pub struct QatSettings {
    /// Optimizer steps (one batch each).
    pub steps: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Learning rate of the weights and biases.
    pub lr: f32,
    /// Learning rate of the clips.
    pub clip_lr: f32,
    /// The loss.
    pub loss: LossKind,
    /// Seed of the batch order (a new permutation of the batches every epoch).
    pub seed: u64,
    /// The output the loss reads (default: the graph's first output).
    pub output: Option<String>,
}

/// The batch that step `step` trains on: the batches of each epoch in an
/// order drawn from `seed` and the epoch (Fisher-Yates over a xorshift64*
/// stream), so a resumed run sees the same order as an uninterrupted one.
pub fn batch_of_step(step: usize, batches: usize, seed: u64) -> usize {
    let epoch = (step / batches) as u64;
    let mut state = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ epoch.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    if state == 0 {
        state = 0x2545_F491_4F6C_DD1D;
    }
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut order: Vec<usize> = (0..batches).collect();
    for i in (1..batches).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order[step % batches]
}

/// The layers being trained quantized and whether their clip_min is pinned.
#[derive(Clone, Debug)]
pub struct TrainedLayer {
    /// The layer (node) name.
    pub name: String,
    /// clip_min stays 0.
    pub fixed_min: bool,
}

/// The output `name` of `graph` (default: its first) over every batch of
/// `data`, samples on axis 0.
pub fn outputs_over(
    graph: &TrainGraph,
    data: &Dataset,
    batch_size: usize,
    name: Option<&str>,
) -> Result<ArrayD<f32>, TrainError> {
    let output = output_of(graph, name)?;
    let mut parts = Vec::new();
    for b in 0..data.batch_count(batch_size) {
        let batch = data
            .batch(batch_size, b)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let refs: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let acts = graph.forward_tensors(&refs)?;
        let y = acts
            .get(graph, &output)
            .ok_or_else(|| TrainError::Invalid(format!("output '{output}' was not computed")))?;
        parts.push(y.clone());
    }
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(0), &views).map_err(|e| TrainError::Invalid(e.to_string()))
}

/// The output called `name`, else the graph's first.
fn output_of(graph: &TrainGraph, name: Option<&str>) -> Result<String, TrainError> {
    match name {
        Some(n) => Ok(n.to_string()),
        None => graph
            .output_names()
            .first()
            .map(|s| s.to_string())
            .ok_or_else(|| TrainError::Invalid("the model has no output".into())),
    }
}

/// The loss of one step and the gradient of the output that produces it.
pub fn loss_and_seed(
    kind: LossKind,
    output: &ArrayD<f32>,
    labels: Option<&[i64]>,
    teacher: Option<&ArrayD<f32>>,
) -> Result<(f64, ArrayD<f32>), TrainError> {
    let n = output.shape().first().copied().unwrap_or(1).max(1);
    let softmax = |a: &ArrayD<f32>| -> Vec<Vec<f64>> {
        a.outer_iter()
            .map(|row| {
                let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let e: Vec<f64> = row.iter().map(|&v| f64::from(v - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(|v| v / s).collect()
            })
            .collect()
    };
    match kind {
        LossKind::CrossEntropy => {
            let labels =
                labels.ok_or_else(|| TrainError::Invalid("cross-entropy needs labels".into()))?;
            let p = softmax(output);
            let classes = p.first().map_or(0, Vec::len);
            let mut loss = 0f64;
            let mut seed = ArrayD::<f32>::zeros(output.raw_dim());
            for (i, (row, &y)) in p.iter().zip(labels).enumerate() {
                let y = usize::try_from(y)
                    .ok()
                    .filter(|&y| y < classes)
                    .ok_or_else(|| {
                        TrainError::Invalid(format!(
                            "label {y} is outside the model's {classes} classes"
                        ))
                    })?;
                loss -= row[y].max(1e-30).ln();
                for (c, &pc) in row.iter().enumerate() {
                    let t = if c == y { 1.0 } else { 0.0 };
                    seed[[i, c]] = ((pc - t) / n as f64) as f32;
                }
            }
            Ok((loss / n as f64, seed))
        }
        LossKind::Distillation => {
            let t = teacher
                .ok_or_else(|| TrainError::Invalid("distillation needs the teacher".into()))?;
            let (p, q) = (softmax(t), softmax(output));
            let mut loss = 0f64;
            let mut seed = ArrayD::<f32>::zeros(output.raw_dim());
            for (i, (pr, qr)) in p.iter().zip(&q).enumerate() {
                for (c, (&pc, &qc)) in pr.iter().zip(qr).enumerate() {
                    if pc > 0.0 {
                        loss += pc * (pc / qc.max(1e-30)).ln();
                    }
                    seed[[i, c]] = ((qc - pc) / n as f64) as f32;
                }
            }
            Ok((loss / n as f64, seed))
        }
        LossKind::Mse => {
            let t = teacher.ok_or_else(|| TrainError::Invalid("MSE needs the teacher".into()))?;
            let count = output.len().max(1) as f64;
            let diff = output - t;
            let loss = diff
                .iter()
                .map(|&d| f64::from(d) * f64::from(d))
                .sum::<f64>()
                / count;
            Ok((loss, diff.mapv(|d| (2.0 * f64::from(d) / count) as f32)))
        }
        LossKind::Cosine => {
            let t =
                teacher.ok_or_else(|| TrainError::Invalid("cosine needs the teacher".into()))?;
            if t.shape() != output.shape() {
                return Err(TrainError::Invalid(format!(
                    "the teacher's output is {:?}, the student's {:?}",
                    t.shape(),
                    output.shape()
                )));
            }
            let per = output.len() / n;
            let (ys, ts) = (output.as_standard_layout(), t.as_standard_layout());
            let (ys, ts) = (
                ys.as_slice().expect("standard"),
                ts.as_slice().expect("standard"),
            );
            let mut seed = vec![0f32; output.len()];
            let mut loss = 0f64;
            for ((y, t), g) in ys
                .chunks(per.max(1))
                .zip(ts.chunks(per.max(1)))
                .zip(seed.chunks_mut(per.max(1)))
            {
                let dot: f64 = y
                    .iter()
                    .zip(t)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let yy: f64 = y.iter().map(|&a| f64::from(a).powi(2)).sum();
                let tt: f64 = t.iter().map(|&b| f64::from(b).powi(2)).sum();
                let (ny, nt) = (yy.sqrt().max(1e-12), tt.sqrt().max(1e-12));
                let cos = dot / (ny * nt);
                loss += 1.0 - cos;
                // d(1 − cos)/dy = −(t / (|y||t|) − cos · y / |y|²).
                for ((gi, &a), &b) in g.iter_mut().zip(y).zip(t) {
                    let d = f64::from(b) / (ny * nt) - cos * f64::from(a) / (ny * ny);
                    *gi = (-d / n as f64) as f32;
                }
            }
            Ok((
                loss / n as f64,
                ArrayD::from_shape_vec(output.raw_dim(), seed)
                    .map_err(|e| TrainError::Invalid(e.to_string()))?,
            ))
        }
    }
}

/// The state of a run, for a checkpoint.
fn snapshot(
    student: &mut TrainGraph,
    layers: &[TrainedLayer],
    trainable: &[String],
    losses: &[f64],
    opts: (&Adam, &Adam),
) -> Checkpoint {
    let constants = trainable
        .iter()
        .filter_map(|n| {
            student
                .constant_mut(n)
                .map(|a| (n.clone(), a.shape().to_vec(), a.iter().copied().collect()))
        })
        .collect();
    let clips = layers
        .iter()
        .filter_map(|l| {
            student
                .quant_mut(&l.name)
                .map(|q| (l.name.clone(), q.clip_min, q.clip_max))
        })
        .collect();
    let state = |a: &Adam| {
        let (step, moments) = a.state();
        AdamState {
            step,
            moments: moments.to_vec(),
        }
    };
    Checkpoint {
        step: losses.len(),
        losses: losses.to_vec(),
        constants,
        clips,
        weights_opt: state(opts.0),
        clips_opt: state(opts.1),
    }
}

/// Puts a checkpoint's weights and clips into `student`.
fn restore(student: &mut TrainGraph, c: &Checkpoint) -> Result<(), TrainError> {
    for (name, shape, values) in &c.constants {
        let a = student.constant_mut(name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "the checkpoint holds '{name}', which the model lacks"
            ))
        })?;
        if a.shape() != shape.as_slice() {
            return Err(TrainError::Invalid(format!(
                "the checkpoint's '{name}' has shape {shape:?}, the model's {:?}",
                a.shape()
            )));
        }
        for (dst, src) in a.iter_mut().zip(values) {
            *dst = *src;
        }
    }
    for (name, lo, hi) in &c.clips {
        let q = student.quant_mut(name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "the checkpoint's layer '{name}' is not quantized here"
            ))
        })?;
        q.clip_min = *lo;
        q.clip_max = *hi;
    }
    Ok(())
}

/// The float model's outputs for a batch (distillation's teacher): the
/// caller runs it on the inference engine, which keeps no activations.
pub type Teacher<'a> = dyn Fn(&[(&str, &Tensor)]) -> Result<ArrayD<f32>, TrainError> + 'a;

/// Trains `student` (already fake-quantized on `layers`) up to
/// `settings.steps` batches, starting from `start` when given; `teacher` is
/// the float model for distillation. `checkpoint` receives the state (and
/// the graph, to evaluate) at the end of every epoch and of the run. Returns the loss of every step (those
/// of `start` included). `progress` is called after each step with (step, loss).
#[allow(clippy::too_many_arguments)]
pub fn train(
    student: &mut TrainGraph,
    teacher: Option<&Teacher<'_>>,
    layers: &[TrainedLayer],
    trainable: &[String],
    data: &Dataset,
    labels: Option<&[i64]>,
    settings: &QatSettings,
    start: Option<&Checkpoint>,
    checkpoint: &mut dyn FnMut(&Checkpoint, &TrainGraph) -> Result<(), TrainError>,
    progress: &dyn Fn(usize, f64),
) -> Result<Vec<f64>, TrainError> {
    let output = output_of(student, settings.output.as_deref())?;
    let batches = data.batch_count(settings.batch_size).max(1);
    let mut weights_opt = Adam::new(settings.lr);
    let mut clips_opt = Adam::new(settings.clip_lr);
    let mut losses = Vec::with_capacity(settings.steps);
    if let Some(c) = start {
        restore(student, c)?;
        weights_opt.restore(c.weights_opt.step, c.weights_opt.moments.clone());
        clips_opt.restore(c.clips_opt.step, c.clips_opt.moments.clone());
        losses = c.losses.clone();
    }
    for step in losses.len()..settings.steps {
        let b = batch_of_step(step, batches, settings.seed);
        let batch = data
            .batch(settings.batch_size, b)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let refs: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let acts = student.forward_tensors(&refs)?;
        let y = acts
            .get(student, &output)
            .ok_or_else(|| TrainError::Invalid(format!("output '{output}' was not computed")))?;
        let teacher_y = teacher.map(|t| t(&refs)).transpose()?;
        let batch_labels = labels.map(|l| {
            let start = b * settings.batch_size;
            &l[start.min(l.len())..(start + y.len_of(Axis(0))).min(l.len())]
        });
        let (loss, seed) = loss_and_seed(settings.loss, y, batch_labels, teacher_y.as_ref())?;
        if y.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged(format!(
                "the loss is not finite at step {}: the model's outputs overflowed; lower --lr or --clip-lr (the last checkpoint is kept)",
                step + 1
            )));
        }
        if !loss.is_finite() {
            return Err(TrainError::Diverged(format!(
                "the loss is {loss} at step {}; lower --lr or --clip-lr (the last checkpoint is kept)",
                step + 1
            )));
        }
        let grads = student.backward(&acts, &[(output.as_str(), seed)])?;
        // Weights and biases, updated in place.
        let mut grads = grads;
        let owned: Vec<(String, ArrayD<f32>)> = trainable
            .iter()
            .filter_map(|n| grads.take(student, n).map(|g| (n.clone(), g)))
            .collect();
        let names: Vec<String> = owned.iter().map(|(n, _)| n.clone()).collect();
        let mut views: Vec<(&mut [f32], &[f32])> = student
            .constants_mut(&names)
            .into_iter()
            .zip(&owned)
            .filter_map(|(p, (_, g))| Some((p?.as_slice_mut()?, g.as_slice()?)))
            .collect();
        weights_opt.step(&mut views);
        // Clips: one (min, max) pair per quantized layer.
        let mut clip_values: Vec<[f32; 2]> = Vec::new();
        let mut clip_grads: Vec<[f32; 2]> = Vec::new();
        for l in layers {
            let (gmin, gmax) = grads.clips(&l.name).unwrap_or((0.0, 0.0));
            let q = student.quant_mut(&l.name).ok_or_else(|| {
                TrainError::Invalid(format!("layer '{}' is not quantized", l.name))
            })?;
            clip_values.push([q.clip_min, q.clip_max]);
            clip_grads.push([if l.fixed_min { 0.0 } else { gmin as f32 }, gmax as f32]);
        }
        {
            let mut views: Vec<(&mut [f32], &[f32])> = clip_values
                .iter_mut()
                .zip(&clip_grads)
                .map(|(v, g)| (v.as_mut_slice(), g.as_slice()))
                .collect();
            clips_opt.step(&mut views);
        }
        for (l, v) in layers.iter().zip(&clip_values) {
            if let Some(q) = student.quant_mut(&l.name) {
                q.clip_min = if l.fixed_min { 0.0 } else { v[0].min(0.0) };
                // Keep a usable range: the upper clip stays above the lower one.
                q.clip_max = v[1].max(q.clip_min + 1e-6).max(1e-6);
            }
        }
        losses.push(loss);
        progress(step + 1, loss);
        let stop = STOP.swap(false, Ordering::SeqCst);
        if stop || (step + 1) % batches == 0 || step + 1 == settings.steps {
            let c = snapshot(
                student,
                layers,
                trainable,
                &losses,
                (&weights_opt, &clips_opt),
            );
            checkpoint(&c, student)?;
        }
        if stop && step + 1 < settings.steps {
            return Err(TrainError::Interrupted(step + 1));
        }
    }
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn every_epoch_visits_every_batch_once_in_a_seeded_order() {
        for seed in [0, 7] {
            for epoch in 0..3 {
                let mut seen: Vec<usize> = (0..10)
                    .map(|k| batch_of_step(epoch * 10 + k, 10, seed))
                    .collect();
                let order = seen.clone();
                seen.sort();
                assert_eq!(seen, (0..10).collect::<Vec<_>>());
                assert_ne!(order, (0..10).collect::<Vec<_>>(), "shuffled");
            }
        }
        let a: Vec<usize> = (0..10).map(|k| batch_of_step(k, 10, 0)).collect();
        let b: Vec<usize> = (0..10).map(|k| batch_of_step(k, 10, 1)).collect();
        assert_ne!(a, b, "the seed matters");
        let next_epoch: Vec<usize> = (10..20).map(|k| batch_of_step(k, 10, 0)).collect();
        assert_ne!(a, next_epoch, "each epoch its own order");
    }

    #[test]
    fn cross_entropy_and_its_gradient_by_hand() {
        // Logits [0, ln 3]: softmax [1/4, 3/4]; label 1: loss −ln(3/4); seed [1/4, −1/4].
        let y = ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![0.0, 3f32.ln()]).unwrap();
        let (loss, seed) = loss_and_seed(LossKind::CrossEntropy, &y, Some(&[1]), None).unwrap();
        assert!((loss + (0.75f64).ln()).abs() < 1e-6);
        assert!((seed[[0, 0]] - 0.25).abs() < 1e-6 && (seed[[0, 1]] + 0.25).abs() < 1e-6);
        assert!(loss_and_seed(LossKind::CrossEntropy, &y, Some(&[2]), None).is_err());
    }

    #[test]
    fn distillation_is_zero_when_student_equals_teacher() {
        let y =
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0]).unwrap();
        let (loss, seed) = loss_and_seed(LossKind::Distillation, &y, None, Some(&y)).unwrap();
        assert!(loss.abs() < 1e-9 && seed.iter().all(|v| v.abs() < 1e-7));
        let (mse, _) = loss_and_seed(LossKind::Mse, &y, None, Some(&y.mapv(|v| v + 1.0))).unwrap();
        assert!((mse - 1.0).abs() < 1e-9);
    }

    /// The cosine loss by hand, and its gradient against central finite
    /// differences of the loss.
    #[test]
    fn cosine_loss_and_its_gradient() {
        // [3, 4] against [4, 3]: cos = 24/25, loss 1/25; [1, 0] vs [0, 1]: loss 1.
        let y = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![3.0, 4.0, 1.0, 0.0]).unwrap();
        let t = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![4.0, 3.0, 0.0, 1.0]).unwrap();
        let (loss, seed) = loss_and_seed(LossKind::Cosine, &y, None, Some(&t)).unwrap();
        assert!((loss - (1.0 / 25.0 + 1.0) / 2.0).abs() < 1e-9, "{loss}");
        for k in 0..4 {
            let h = 1e-3f32;
            let at = |d: f32| {
                let mut y2 = y.clone();
                y2.as_slice_mut().unwrap()[k] += d;
                loss_and_seed(LossKind::Cosine, &y2, None, Some(&t))
                    .unwrap()
                    .0
            };
            let fd = (at(h) - at(-h)) / (2.0 * f64::from(h));
            let g = f64::from(seed.as_slice().unwrap()[k]);
            assert!((fd - g).abs() < 1e-4, "element {k}: {g} vs {fd}");
        }
    }
}
