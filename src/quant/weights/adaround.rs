//! AdaRound (`ada_quantize`): instead of rounding every weight to the
//! nearest int8 value, learn for each weight whether to round down or up so
//! that the layer's output (after its activation) on real inputs stays
//! closest to the float layer's. The rounding is relaxed to
//! `h(α) = clamp(sigmoid(α)·(ζ − γ) + γ, 0, 1)` (ζ = 1.1, γ = −0.1), the
//! weight to `s·clamp(floor(w/s) + h(α), q_min, q_max)`, and the loss is
//! `mean((f(W̃x + b) − f(Wx + b))²) + λ·Σ(1 − |2h − 1|^β)` with β annealed
//! from `beta_range[0]` to `beta_range[1]` (cosine) after a warm-up of
//! `warm_start · num_iteration` steps without the rounding term; Adam on α.
//! `docs/algorithms.md` (AdaRound).

use ndarray::{Array2, ArrayView2, Axis};

const ZETA: f32 = 1.1;
const GAMMA: f32 = -0.1;

/// AdaRound's settings (AMCT's keys).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaSettings {
    /// Optimisation steps per layer.
    pub num_iteration: usize,
    /// λ, the weight of the rounding regulariser.
    pub reg_param: f32,
    /// β at the start and the end of the annealing.
    pub beta_range: [f32; 2],
    /// Fraction of the steps without the regulariser.
    pub warm_start: f32,
}

impl Default for AdaSettings {
    /// AMCT's defaults but for the step count: 10000 steps per layer take
    /// MobileNetV2 past ten minutes on 2 cores; 300 keep it near a minute
    /// (see `docs/algorithms.md`).
    fn default() -> Self {
        AdaSettings {
            num_iteration: 300,
            reg_param: 0.01,
            beta_range: [20.0, 2.0],
            warm_start: 0.2,
        }
    }
}

/// The activation that follows a layer, optimised together with it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// None (or one AdaRound does not model).
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `clamp(x, lo, hi)` (ReLU6 and friends).
    Clip(f32, f32),
}

impl Activation {
    /// The activation of `x`.
    pub fn apply(&self, x: f32) -> f32 {
        match *self {
            Activation::Identity => x,
            Activation::Relu => x.max(0.0),
            Activation::Clip(lo, hi) => x.clamp(lo, hi),
        }
    }

    fn passes(&self, x: f32) -> bool {
        match *self {
            Activation::Identity => true,
            Activation::Relu => x > 0.0,
            Activation::Clip(lo, hi) => x > lo && x < hi,
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `h(α)` and `dh/dα`.
fn rect(alpha: f32) -> (f32, f32) {
    let s = sigmoid(alpha);
    let h = s * (ZETA - GAMMA) + GAMMA;
    if h <= 0.0 {
        (0.0, 0.0)
    } else if h >= 1.0 {
        (1.0, 0.0)
    } else {
        (h, s * (1.0 - s) * (ZETA - GAMMA))
    }
}

/// One layer's AdaRound problem: `W` `[M, K]` (rows = outputs), one scale
/// per row, inputs `X` `[K, P]` (P sampled positions), bias `[M]`, targets
/// `T` `[M, P]` (the float layer's output after `activation`).
pub struct Problem<'a> {
    /// Float weight.
    pub w: ArrayView2<'a, f32>,
    /// Weight scale of each row.
    pub scale: &'a [f32],
    /// Inputs, one column per sample.
    pub x: ArrayView2<'a, f32>,
    /// Bias per row.
    pub bias: &'a [f32],
    /// Targets.
    pub target: ArrayView2<'a, f32>,
    /// The following activation.
    pub activation: Activation,
    /// Integer range of the weights.
    pub range: (f32, f32),
}

/// The state of the optimisation: the floor of `w/s` and the α per weight.
struct State {
    floor: Array2<f32>,
    alpha: Array2<f32>,
}

impl Problem<'_> {
    fn state(&self) -> State {
        let mut floor = Array2::zeros(self.w.raw_dim());
        let mut alpha = Array2::zeros(self.w.raw_dim());
        for ((r, c), &w) in self.w.indexed_iter() {
            let v = w / self.scale[r];
            let f = v.floor();
            floor[[r, c]] = f;
            // Start where h(α) equals the fractional part: the float weight.
            let rest = (v - f).clamp(0.01, 0.99);
            alpha[[r, c]] = -((ZETA - GAMMA) / (rest - GAMMA) - 1.0).ln();
        }
        State { floor, alpha }
    }

    /// The soft (or, with `hard`, rounded) quantized weight in float units, and `dW̃/dα`.
    fn weight(&self, st: &State, hard: bool) -> (Array2<f32>, Array2<f32>) {
        let (lo, hi) = self.range;
        let mut w = Array2::zeros(self.w.raw_dim());
        let mut d = Array2::zeros(self.w.raw_dim());
        for ((r, c), &a) in st.alpha.indexed_iter() {
            let (h, dh) = rect(a);
            let h = if hard {
                f32::from(u8::from(h >= 0.5))
            } else {
                h
            };
            let q = st.floor[[r, c]] + h;
            let s = self.scale[r];
            w[[r, c]] = q.clamp(lo, hi) * s;
            d[[r, c]] = if q > lo && q < hi { s * dh } else { 0.0 };
        }
        (w, d)
    }

    /// The output loss `mean((f(W̃X + b) − T)²)` and its gradient in `W̃`.
    fn output_loss(&self, w: &Array2<f32>) -> (f32, Array2<f32>) {
        let mut pre = w.dot(&self.x);
        for (mut row, &b) in pre.axis_iter_mut(Axis(0)).zip(self.bias) {
            row.mapv_inplace(|v| v + b);
        }
        let n = pre.len().max(1) as f32;
        let mut loss = 0.0f32;
        let mut grad_out = Array2::zeros(pre.raw_dim());
        for ((idx, &p), &t) in pre.indexed_iter().zip(self.target.iter()) {
            let e = self.activation.apply(p) - t;
            loss += e * e;
            if self.activation.passes(p) {
                grad_out[idx] = 2.0 * e / n;
            }
        }
        (loss / n, grad_out.dot(&self.x.t()))
    }

    /// The loss (output term + `λ` times the rounding term at `β`) and `dL/dα`.
    fn loss_and_grad(&self, st: &State, lambda: f32, beta: f32) -> (f32, Array2<f32>) {
        let (w, dw_da) = self.weight(st, false);
        let (out, gw) = self.output_loss(&w);
        let mut grad = gw * &dw_da;
        let mut reg = 0.0f32;
        if lambda > 0.0 {
            for (&a, g) in st.alpha.iter().zip(grad.iter_mut()) {
                let (h, dh) = rect(a);
                let u = 2.0 * h - 1.0;
                reg += 1.0 - u.abs().powf(beta);
                if dh != 0.0 && u != 0.0 {
                    let dreg_dh = -beta * u.abs().powf(beta - 1.0) * u.signum() * 2.0;
                    *g += lambda * dreg_dh * dh;
                }
            }
        }
        (out + lambda * reg, grad)
    }

    /// Runs AdaRound; returns the int8 weight `[M, K]` and the output loss
    /// of nearest rounding and of the learned rounding on these samples.
    pub fn solve(&self, settings: &AdaSettings) -> (Array2<i8>, [f32; 2]) {
        let mut st = self.state();
        let nearest = {
            let (lo, hi) = self.range;
            let mut w = Array2::zeros(self.w.raw_dim());
            for ((r, c), &v) in self.w.indexed_iter() {
                let s = self.scale[r];
                w[[r, c]] = (v / s).round_ties_even().clamp(lo, hi) * s;
            }
            self.output_loss(&w).0
        };
        let (mut m, mut v) = (
            Array2::<f32>::zeros(st.alpha.raw_dim()),
            Array2::<f32>::zeros(st.alpha.raw_dim()),
        );
        let (lr, b1, b2, eps) = (0.01f32, 0.9f32, 0.999f32, 1e-8f32);
        let iters = settings.num_iteration.max(1);
        let warm = (settings.warm_start * iters as f32) as usize;
        for t in 0..iters {
            let (lambda, beta) = if t < warm {
                (0.0, settings.beta_range[0])
            } else {
                let p = (t - warm) as f32 / (iters - warm).max(1) as f32;
                let [start, end] = settings.beta_range;
                let beta = end + 0.5 * (start - end) * (1.0 + (std::f32::consts::PI * p).cos());
                (settings.reg_param, beta)
            };
            let (_, g) = self.loss_and_grad(&st, lambda, beta);
            let k = (t + 1) as i32;
            for ((a, &g), (m, v)) in st
                .alpha
                .iter_mut()
                .zip(g.iter())
                .zip(m.iter_mut().zip(v.iter_mut()))
            {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let mh = *m / (1.0 - b1.powi(k));
                let vh = *v / (1.0 - b2.powi(k));
                *a -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let (w, _) = self.weight(&st, true);
        let learned = self.output_loss(&w).0;
        let (lo, hi) = self.range;
        let q = Array2::from_shape_fn(self.w.raw_dim(), |(r, c)| {
            (w[[r, c]] / self.scale[r]).round().clamp(lo, hi) as i8
        });
        (q, [nearest, learned])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn problem_data() -> (Array2<f32>, Vec<f32>, Array2<f32>, Vec<f32>) {
        let w = Array2::from_shape_vec((3, 8), values(1, 24)).unwrap();
        let scale = vec![0.05f32, 0.08, 0.03];
        // Correlated inputs: nearest rounding is not optimal for the output.
        let base = Array2::from_shape_vec((4, 64), values(2, 256)).unwrap();
        let mix = Array2::from_shape_vec((8, 4), values(3, 32)).unwrap();
        let x = mix.dot(&base);
        (w, scale, x, vec![0.1, -0.2, 0.05])
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let (w, scale, x, bias) = problem_data();
        let mut target = w.dot(&x);
        for (mut row, &b) in target.axis_iter_mut(Axis(0)).zip(&bias) {
            row.mapv_inplace(|v| (v + b).clamp(0.0, 0.5));
        }
        let p = Problem {
            w: w.view(),
            scale: &scale,
            x: x.view(),
            bias: &bias,
            target: target.view(),
            activation: Activation::Clip(0.0, 0.5),
            range: (-128.0, 127.0),
        };
        let mut st = p.state();
        // Move α away from the start so h is inside (0, 1) with varied slopes.
        for (i, a) in st.alpha.iter_mut().enumerate() {
            *a += 0.3 * ((i % 5) as f32 - 2.0);
        }
        let (_, g) = p.loss_and_grad(&st, 0.01, 4.0);
        let eps = 1e-2f32;
        let mut checked = 0;
        for idx in [(0, 0), (1, 3), (2, 7), (0, 5)] {
            let (h, _) = rect(st.alpha[idx]);
            if !(0.05..0.95).contains(&h) {
                continue;
            }
            let orig = st.alpha[idx];
            st.alpha[idx] = orig + eps;
            let (up, _) = p.loss_and_grad(&st, 0.01, 4.0);
            st.alpha[idx] = orig - eps;
            let (down, _) = p.loss_and_grad(&st, 0.01, 4.0);
            st.alpha[idx] = orig;
            let fd = (up - down) / (2.0 * eps);
            assert!(
                (fd - g[idx]).abs() <= 0.05 * fd.abs().max(g[idx].abs()) + 1e-5,
                "{idx:?}: finite difference {fd} vs gradient {}",
                g[idx]
            );
            checked += 1;
        }
        assert!(checked >= 2);
    }

    #[test]
    fn learned_rounding_beats_nearest_rounding_on_the_output() {
        let (w, scale, x, bias) = problem_data();
        let mut target = w.dot(&x);
        for (mut row, &b) in target.axis_iter_mut(Axis(0)).zip(&bias) {
            row.mapv_inplace(|v| v + b);
        }
        let p = Problem {
            w: w.view(),
            scale: &scale,
            x: x.view(),
            bias: &bias,
            target: target.view(),
            activation: Activation::Identity,
            range: (-128.0, 127.0),
        };
        let (q, [nearest, learned]) = p.solve(&AdaSettings {
            num_iteration: 500,
            ..Default::default()
        });
        // The output errors measured here, from the integer weights alone
        // (not the figures `solve` reports about itself).
        let error_of = |q: &Array2<f32>| -> f64 {
            let mut wq = q.clone();
            for (mut row, &s) in wq.axis_iter_mut(Axis(0)).zip(&scale) {
                row.mapv_inplace(|v| v * s);
            }
            let mut y = wq.dot(&x);
            for (mut row, &b) in y.axis_iter_mut(Axis(0)).zip(&bias) {
                row.mapv_inplace(|v| v + b);
            }
            y.iter()
                .zip(target.iter())
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                / y.len() as f64
        };
        let mut nearest_q = w.clone();
        for (mut row, &s) in nearest_q.axis_iter_mut(Axis(0)).zip(&scale) {
            row.mapv_inplace(|v| (v / s).round_ties_even().clamp(-128.0, 127.0));
        }
        let learned_q = q.mapv(f32::from);
        let (measured_nearest, measured_learned) = (error_of(&nearest_q), error_of(&learned_q));
        assert!(
            measured_learned < 0.8 * measured_nearest,
            "nearest {measured_nearest}, learned {measured_learned}"
        );
        // What it reports is what it did.
        for (reported, measured) in [(nearest, measured_nearest), (learned, measured_learned)] {
            assert!(
                (f64::from(reported) - measured).abs() <= 1e-3 * measured,
                "reported {reported}, measured {measured}"
            );
        }
        // Every weight is rounded down or up from w/s, never further.
        for ((r, c), &v) in w.indexed_iter() {
            let f = (v / scale[r]).floor();
            let qv = f32::from(q[[r, c]]);
            assert!(qv == f || qv == f + 1.0, "{v} / {} -> {qv}", scale[r]);
        }
    }
}
