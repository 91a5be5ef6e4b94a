//! The metrics automatic quantization can hold: all "higher is better",
//! expressed in points so one `--max-drop` reads the same for each.

use crate::similarity::Similarity;
use ndarray::{ArrayD, Axis};

/// The metric choices of `auto --metric`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricName {
    /// Top-1 accuracy against --labels.
    Top1,
    /// Agreement of the top-1 class with the float model.
    Top1Agreement,
    /// Mean cosine similarity of the outputs with the float model's (x100).
    Cosine,
    /// Mean squared error relative to the float outputs' power (x100, negated).
    Mse,
    /// Nearest-neighbour agreement of the outputs as embeddings (x100).
    NnAgreement,
}

impl crate::choice::Choice for MetricName {
    const ALL: &'static [Self] = &[
        MetricName::Top1,
        MetricName::Top1Agreement,
        MetricName::Cosine,
        MetricName::Mse,
        MetricName::NnAgreement,
    ];

    fn name(self) -> &'static str {
        match self {
            MetricName::Top1 => "top1",
            MetricName::Top1Agreement => "top1-agreement",
            MetricName::Cosine => "cosine",
            MetricName::Mse => "mse",
            MetricName::NnAgreement => "nn-agreement",
        }
    }

    fn help(self) -> &'static str {
        match self {
            MetricName::Top1 => "Top-1 accuracy against --labels",
            MetricName::Top1Agreement => "Agreement of the top-1 class with the float model",
            MetricName::Cosine => {
                "Mean cosine similarity of the outputs with the float model's (x100)"
            }
            MetricName::Mse => {
                "Mean squared error relative to the float outputs' power (x100, negated)"
            }
            MetricName::NnAgreement => {
                "Embeddings: share of samples whose most similar other sample (cosine) is the float model's (x100)"
            }
        }
    }
}

/// How a quantized model's outputs are scored against the float model's (or labels).
#[derive(Clone, Debug, PartialEq)]
pub enum Metric {
    /// Top-1 accuracy against labels, in percent.
    Top1(Vec<i64>),
    /// Percentage of samples whose top-1 class equals the float model's.
    Top1Agreement,
    /// Mean cosine similarity of the outputs with the float outputs, times 100.
    Cosine,
    /// Negative mean squared error relative to the float outputs' mean square,
    /// times 100 (0 for the float model; a drop of 1 point = 1 % relative MSE).
    Mse,
    /// Percentage of samples whose nearest other sample (cosine of the
    /// outputs as embeddings) is the one the float outputs give.
    NnAgreement,
}

impl Metric {
    /// The metric's name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Top1(_) => "top1",
            Metric::Top1Agreement => "top1-agreement",
            Metric::Cosine => "cosine",
            Metric::Mse => "mse",
            Metric::NnAgreement => "nn-agreement",
        }
    }

    /// Scores `outputs` (samples on axis 0) against the float model's `reference`.
    pub fn score(&self, outputs: &ArrayD<f32>, reference: &ArrayD<f32>) -> f64 {
        self.best_reachable(outputs, reference)
    }

    /// The highest score the whole set can still reach when `outputs` holds
    /// the first samples of `reference`'s (the rest unknown): every unseen
    /// sample counted as perfect (top-1 right, cosine 1, no squared error).
    /// With every sample seen it is the score itself.
    pub fn best_reachable(&self, outputs: &ArrayD<f32>, reference: &ArrayD<f32>) -> f64 {
        let rows = outputs.shape()[0];
        let total = reference.shape()[0].max(rows).max(1);
        let unseen = (total - rows) as f64;
        let argmax = |a: &ArrayD<f32>, i: usize| -> usize {
            let row = a.index_axis(Axis(0), i);
            let mut best = (0, f32::NEG_INFINITY);
            for (j, &v) in row.iter().enumerate() {
                if v > best.1 {
                    best = (j, v);
                }
            }
            best.0
        };
        match self {
            // A neighbour may be among the unseen samples: no bound short of all.
            Metric::NnAgreement if rows < total => 100.0,
            Metric::NnAgreement => 100.0 * neighbour_agreement(outputs, reference),
            Metric::Top1(labels) => {
                100.0
                    * ((0..rows)
                        .filter(|&i| argmax(outputs, i) as i64 == labels[i])
                        .count() as f64
                        + unseen)
                    / total as f64
            }
            Metric::Top1Agreement => {
                100.0
                    * ((0..rows)
                        .filter(|&i| argmax(outputs, i) == argmax(reference, i))
                        .count() as f64
                        + unseen)
                    / total as f64
            }
            Metric::Cosine => {
                let sum: f64 = (0..rows)
                    .map(|i| {
                        let (a, b) = (
                            outputs.index_axis(Axis(0), i),
                            reference.index_axis(Axis(0), i),
                        );
                        let mut sim = Similarity::default();
                        sim.add(b.iter(), a.iter());
                        sim.cosine()
                    })
                    .sum();
                100.0 * (sum + unseen) / total as f64
            }
            Metric::Mse => {
                // The error so far over the power of the whole reference.
                let err: f64 = outputs
                    .iter()
                    .zip(reference.iter())
                    .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
                    .sum();
                let power: f64 = reference
                    .iter()
                    .map(|y| f64::from(*y).powi(2))
                    .sum::<f64>()
                    .max(f64::MIN_POSITIVE);
                -100.0 * err / power
            }
        }
    }
}

/// Each row's nearest other row by cosine similarity (itself when alone).
pub fn nearest_neighbours(a: &ArrayD<f32>) -> Vec<usize> {
    let rows = a.shape().first().copied().unwrap_or(0);
    let unit: Vec<Vec<f64>> = (0..rows)
        .map(|i| {
            let r: Vec<f64> = a
                .index_axis(Axis(0), i)
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let norm = r
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt()
                .max(f64::MIN_POSITIVE);
            r.into_iter().map(|v| v / norm).collect()
        })
        .collect();
    (0..rows)
        .map(|i| {
            let mut best = (i, f64::NEG_INFINITY);
            for (j, u) in unit.iter().enumerate() {
                if j == i {
                    continue;
                }
                let sim: f64 = unit[i].iter().zip(u).map(|(x, y)| x * y).sum();
                if sim > best.1 {
                    best = (j, sim);
                }
            }
            best.0
        })
        .collect()
}

/// The share of rows (samples) of `outputs` whose nearest other row is the
/// same as in `reference`: how far a retrieval over these embeddings keeps
/// its answers.
pub fn neighbour_agreement(outputs: &ArrayD<f32>, reference: &ArrayD<f32>) -> f64 {
    let (a, b) = (nearest_neighbours(outputs), nearest_neighbours(reference));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn scores_by_hand() {
        let reference = array![[1.0f32, 0.0], [0.0, 1.0]].into_dyn();
        let out = array![[0.9f32, 0.1], [0.6, 0.4]].into_dyn();
        assert_eq!(Metric::Top1Agreement.score(&out, &reference), 50.0);
        assert_eq!(Metric::Top1(vec![0, 0]).score(&out, &reference), 100.0);
        assert_eq!(Metric::Cosine.score(&reference, &reference), 100.0);
        assert_eq!(Metric::Mse.score(&reference, &reference), 0.0);
        // err = 0.01+0.01+0.36+0.36 = 0.74, power = 2 -> -37
        assert!((Metric::Mse.score(&out, &reference) + 37.0).abs() < 1e-4);
    }

    #[test]
    fn neighbour_agreement_by_hand() {
        // Four embeddings: 0 and 1 close, 2 and 3 close.
        let reference = array![[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]].into_dyn();
        assert_eq!(nearest_neighbours(&reference), vec![1, 0, 3, 2]);
        assert_eq!(Metric::NnAgreement.score(&reference, &reference), 100.0);
        // Sample 3 moves towards 0 and 1: its neighbour becomes 1
        // (cosine 0.957 against 0.919 for 0); 2 still has 3 as its nearest.
        let moved = array![[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.3]].into_dyn();
        assert_eq!(nearest_neighbours(&moved), vec![1, 0, 3, 1]);
        assert_eq!(Metric::NnAgreement.score(&moved, &reference), 75.0);
        // A prefix cannot be bounded.
        let first = array![[1.0f32, 0.0]].into_dyn();
        assert_eq!(
            Metric::NnAgreement.best_reachable(&first, &reference),
            100.0
        );
    }

    #[test]
    fn the_best_reachable_score_of_a_prefix_counts_the_rest_as_perfect() {
        let reference = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]].into_dyn();
        // The first sample seen, and wrong: at best 3 of 4 right.
        let first = array![[0.1f32, 0.9]].into_dyn();
        assert_eq!(
            Metric::Top1Agreement.best_reachable(&first, &reference),
            75.0
        );
        assert_eq!(
            Metric::Top1(vec![0, 1, 0, 1]).best_reachable(&first, &reference),
            75.0
        );
        // cosine of (0.1, 0.9) with (1, 0) = 0.1 / |(0.1, 0.9)|; the other three at 1.
        let c = 0.1 / (0.1f64.powi(2) + 0.9f64.powi(2)).sqrt();
        let got = Metric::Cosine.best_reachable(&first, &reference);
        assert!((got - 100.0 * (c + 3.0) / 4.0).abs() < 1e-4, "{got}");
        // Squared error so far (0.81 + 0.81) over the whole reference's power (4).
        let got = Metric::Mse.best_reachable(&first, &reference);
        assert!((got + 100.0 * 1.62 / 4.0).abs() < 1e-4, "{got}");
    }
}
