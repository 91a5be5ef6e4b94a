//! The DMQ strength of a Gemm / MatMul layer chosen from its own data
//! (`dmq_search`, on under `--optimize`): every candidate α (and no
//! balancing at all) quantizes a sample of the layer's calibration input and
//! its weight exactly as calibration will (the layer's calibrator, ARQ per
//! tensor or per column), and the one whose int8 product is closest to the
//! float product wins. Transformer layers differ: the inputs of attention's
//! projections carry a few huge channels after LayerNorm and want most of
//! their range moved into the weight, a GELU output does not.
//! `docs/algorithms.md` (DMQ balancing).

use super::dmq::{ChannelAxes, balance_factors, balance_weight};
use super::observe::{ActAlgo, finite_extremes};
use super::params::{ActParams, int_range};
use super::weights::{ChannelLayout, arq_scales, dequantize_weight, quantize_weight};
use ndarray::{Array2, ArrayD, ArrayView2};

/// The strengths tried: AMCT's range [0.2, 0.8], and no balancing (`None`).
pub const CANDIDATES: [Option<f32>; 6] = [
    None,
    Some(0.2),
    Some(0.35),
    Some(0.5),
    Some(0.65),
    Some(0.8),
];

/// Input rows a layer keeps for the search (memory: rows × K floats).
pub const SAMPLE_ROWS: usize = 512;

/// An evenly strided sample of a layer's input rows (the last axis is the
/// row), taken while the calibration batches stream by.
#[derive(Clone, Debug)]
pub struct RowSample {
    k: usize,
    cap: usize,
    stride: usize,
    seen: usize,
    rows: Vec<f32>,
}

impl RowSample {
    /// An empty sample of rows of `k` values, at most `cap` of them.
    pub fn new(k: usize, cap: usize) -> RowSample {
        RowSample {
            k: k.max(1),
            cap,
            stride: 0,
            seen: 0,
            rows: Vec::new(),
        }
    }

    /// Adds one batch; `batches` is how many the pass will see, so the
    /// stride spreads the sample over all of them.
    pub fn observe(&mut self, x: &[f32], batches: usize) {
        let rows = x.len() / self.k;
        if self.stride == 0 {
            self.stride = (rows * batches.max(1)).div_ceil(self.cap.max(1)).max(1);
        }
        for r in 0..rows {
            if (self.seen + r).is_multiple_of(self.stride) && self.len() < self.cap {
                self.rows
                    .extend_from_slice(&x[r * self.k..(r + 1) * self.k]);
            }
        }
        self.seen += rows;
    }

    /// Rows kept.
    pub fn len(&self) -> usize {
        self.rows.len() / self.k
    }

    /// Whether no row was kept.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn view(&self) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((self.len(), self.k), &self.rows).expect("whole rows")
    }
}

/// How a layer's quantization is set up, as calibration will do it.
#[derive(Clone, Debug)]
pub struct SearchSettings<'a> {
    /// The layer's activation calibrator.
    pub algo: &'a ActAlgo,
    /// Asymmetric activations.
    pub asymmetric: bool,
    /// Activation bits.
    pub act_bits: u32,
    /// Weight bits.
    pub wts_bits: u32,
    /// The weight's scales: per tensor or per output column.
    pub layout: ChannelLayout,
}

/// What the search found for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The winning strength (`None`: no balancing).
    pub alpha: Option<f32>,
    /// Each candidate's squared error of the product, summed over the sample.
    pub errors: Vec<(Option<f32>, f64)>,
}

/// Chooses the strength for a layer with input maxima `x_max` and a 2-D
/// weight `w` `[K, N]`; `None` when the sample is empty or the weight not 2-D.
///
/// The error is each sampled row's squared error relative to that row's
/// float product, summed: a token whose activations are a hundred times
/// larger is normalised by the LayerNorm after it, and the plain squared
/// error let such rows choose for all (on MiniLM-L3 it kept the first FFN
/// output unbalanced, embedding cosine 0.9986 against 0.9993).
pub fn choose(
    layer: &str,
    sample: &RowSample,
    x_max: &[f32],
    w: &ArrayD<f32>,
    settings: &SearchSettings,
) -> Option<Choice> {
    let w2 = w.view().into_dimensionality::<ndarray::Ix2>().ok()?;
    let (k, _) = w2.dim();
    if sample.is_empty() || sample.k != k || x_max.len() != k {
        return None;
    }
    let x = sample.view();
    let reference = x.dot(&w2);
    let axes = ChannelAxes::LastAxis { k };
    let errors: Vec<(Option<f32>, f64)> = CANDIDATES
        .iter()
        .filter_map(|&alpha| {
            let s = match alpha {
                Some(a) => balance_factors(x_max, w, axes, a),
                None => vec![1.0; k],
            };
            let xs = Array2::from_shape_fn(x.dim(), |(r, c)| x[[r, c]] / s[c]);
            let xq = fake_quantize(xs.as_slice()?, settings)?;
            let xq = ArrayView2::from_shape(x.dim(), &xq).ok()?;
            let ws = balance_weight(w, &s, axes);
            let scales = arq_scales(layer, &ws, settings.layout, settings.wts_bits).ok()?;
            let wq = dequantize_weight(
                &quantize_weight(&ws, &scales, settings.layout, settings.wts_bits),
                &scales,
                settings.layout,
            );
            let wq = wq.into_dimensionality::<ndarray::Ix2>().ok()?;
            let product = xq.dot(&wq);
            let error = product
                .outer_iter()
                .zip(reference.outer_iter())
                .map(|(q, f)| {
                    let e: f64 = q
                        .iter()
                        .zip(f)
                        .map(|(&a, &b)| f64::from(a - b).powi(2))
                        .sum();
                    let norm: f64 = f.iter().map(|&b| f64::from(b).powi(2)).sum();
                    if norm > 0.0 { e / norm } else { 0.0 }
                })
                .sum::<f64>();
            error.is_finite().then_some((alpha, error))
        })
        .collect();
    let best = errors
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|&(a, _)| a)?;
    Some(Choice {
        alpha: best,
        errors,
    })
}

/// The values through the layer's activation quantization, its factors
/// found by its own calibrator on these values.
fn fake_quantize(x: &[f32], settings: &SearchSettings) -> Option<Vec<f32>> {
    let (min, max) = finite_extremes(x).ok()?;
    let mut observer = settings.algo.observer();
    observer.observe(x, min, max);
    let ActParams { scale, offset } = observer
        .params(settings.asymmetric, settings.act_bits)
        .ok()?;
    let (lo, hi) = int_range(settings.act_bits);
    Some(
        x.iter()
            .map(|&v| {
                let q = ((v / scale).round_ties_even() + offset as f32).clamp(lo as f32, hi as f32);
                (q - offset as f32) * scale
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A brute-force check: one input channel 50 times wider than the others
    /// and a weight that reads it weakly. Without balancing the wide channel
    /// takes the whole int8 grid; the search must prefer some balancing, and
    /// its errors must be the ones computed here by hand for "none" (each
    /// row's squared error over its squared float product, summed).
    #[test]
    fn an_outlier_channel_is_balanced_and_errors_are_exact() {
        let (rows, k, n) = (64, 8, 4);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| {
                let (r, c) = (i / k, i % k);
                let v = ((r * 7 + c * 3) % 11) as f32 / 11.0 - 0.45;
                if c == 0 { v * 50.0 } else { v }
            })
            .collect();
        let w = ArrayD::from_shape_fn(ndarray::IxDyn(&[k, n]), |ix| {
            let (r, c) = (ix[0], ix[1]);
            let v = ((r * 5 + c * 2) % 7) as f32 / 7.0 - 0.4;
            if r == 0 { v * 0.02 } else { v }
        });
        let mut sample = RowSample::new(k, 1000);
        sample.observe(&x, 1);
        assert_eq!(sample.len(), rows);
        let x_max: Vec<f32> = (0..k)
            .map(|c| (0..rows).map(|r| x[r * k + c].abs()).fold(0.0, f32::max))
            .collect();
        let algo = ActAlgo::Minmax;
        let settings = SearchSettings {
            algo: &algo,
            asymmetric: false,
            act_bits: 8,
            wts_bits: 8,
            layout: ChannelLayout::LastAxis { channels: n },
        };
        let choice = choose("l", &sample, &x_max, &w, &settings).unwrap();
        assert!(choice.alpha.is_some(), "{choice:?}");
        // "None" by hand: symmetric min-max grid over x, per-column weights.
        let xmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let xmin = x.iter().fold(0f32, |m, &v| m.min(v));
        let levels = if -xmin > xmax { 128.0 } else { 127.0 };
        let sx = xmax.max(-xmin) / levels;
        let xq: Vec<f32> = x
            .iter()
            .map(|&v| (v / sx).round_ties_even().clamp(-128.0, 127.0) * sx)
            .collect();
        let mut error = 0f64;
        for r in 0..rows {
            let (mut row_error, mut row_norm) = (0f64, 0f64);
            for j in 0..n {
                let col: Vec<f32> = (0..k).map(|i| w[[i, j]]).collect();
                let (lo, hi) = col
                    .iter()
                    .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                let sw = if -lo > hi { -lo / 128.0 } else { hi / 127.0 };
                let (mut y, mut yq) = (0f64, 0f64);
                for i in 0..k {
                    let wq = (col[i] / sw).round_ties_even().clamp(-128.0, 127.0) * sw;
                    y += f64::from(x[r * k + i] * col[i]);
                    yq += f64::from(xq[r * k + i] * wq);
                }
                row_error += (yq - y).powi(2);
                row_norm += y * y;
            }
            if row_norm > 0.0 {
                error += row_error / row_norm;
            }
        }
        let none = choice.errors.iter().find(|(a, _)| a.is_none()).unwrap().1;
        assert!((none - error).abs() <= 1e-3 * error, "{none} vs {error}");
        let best = choice
            .errors
            .iter()
            .map(|e| e.1)
            .fold(f64::INFINITY, f64::min);
        assert!(best < 0.5 * none, "{:?}", choice.errors);
    }

    #[test]
    fn the_sample_is_strided_over_every_batch() {
        let mut s = RowSample::new(2, 4);
        // 2 batches of 4 rows: stride 2, rows 0, 2 of each batch.
        s.observe(&[0., 0., 1., 1., 2., 2., 3., 3.], 2);
        s.observe(&[4., 4., 5., 5., 6., 6., 7., 7.], 2);
        assert_eq!(s.rows, vec![0., 0., 2., 2., 4., 4., 6., 6.]);
    }
}
