//! Optimizers over flat `f32` parameter buffers: Adam and SGD with momentum.
//! Each keeps its state per parameter buffer, in the order the buffers are
//! given at every step.

/// The (first, second) moments of one parameter buffer.
pub type Moments = (Vec<f32>, Vec<f32>);

/// Adam (Kingma & Ba) with bias correction.
#[derive(Clone, Debug)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
    step: i32,
    moments: Vec<Moments>,
}

impl Adam {
    /// Adam with the usual defaults (β1 0.9, β2 0.999, ε 1e-8).
    pub fn new(lr: f32) -> Adam {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            moments: Vec::new(),
        }
    }

    /// The state to save: steps taken and the (first, second) moments per buffer.
    pub fn state(&self) -> (i32, &[Moments]) {
        (self.step, &self.moments)
    }

    /// Restores a saved state.
    pub fn restore(&mut self, step: i32, moments: Vec<Moments>) {
        self.step = step;
        self.moments = moments;
    }

    /// One update of every `(parameter, gradient)` pair.
    pub fn step(&mut self, params: &mut [(&mut [f32], &[f32])]) {
        self.step += 1;
        if self.moments.len() != params.len() {
            self.moments = params
                .iter()
                .map(|(p, _)| (vec![0.0; p.len()], vec![0.0; p.len()]))
                .collect();
        }
        let c1 = 1.0 - self.beta1.powi(self.step);
        let c2 = 1.0 - self.beta2.powi(self.step);
        for ((p, g), (m, v)) in params.iter_mut().zip(&mut self.moments) {
            for i in 0..p.len() {
                m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g[i];
                v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g[i] * g[i];
                let m_hat = m[i] / c1;
                let v_hat = v[i] / c2;
                p[i] -= self.lr * m_hat / (v_hat.sqrt() + self.eps);
            }
        }
    }
}

/// Stochastic gradient descent with (heavy-ball) momentum.
#[derive(Clone, Debug)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum (0 for plain SGD).
    pub momentum: f32,
    velocity: Vec<Vec<f32>>,
}

impl Sgd {
    /// SGD with `momentum`.
    pub fn new(lr: f32, momentum: f32) -> Sgd {
        Sgd {
            lr,
            momentum,
            velocity: Vec::new(),
        }
    }

    /// One update: `v = μ·v + g`, `p −= lr·v`.
    pub fn step(&mut self, params: &mut [(&mut [f32], &[f32])]) {
        if self.velocity.len() != params.len() {
            self.velocity = params.iter().map(|(p, _)| vec![0.0; p.len()]).collect();
        }
        for ((p, g), v) in params.iter_mut().zip(&mut self.velocity) {
            for i in 0..p.len() {
                v[i] = self.momentum * v[i] + g[i];
                p[i] -= self.lr * v[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_first_steps_match_a_hand_computation() {
        // Step 1: m = 0.1 g, v = 0.001 g², m̂ = g, v̂ = g², so p -= lr · g/(|g| + ε) = lr·sign(g).
        let mut p = vec![1.0f32, -2.0];
        let g = vec![0.5f32, -4.0];
        let mut adam = Adam::new(0.1);
        adam.step(&mut [(&mut p, &g)]);
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6,
            "{p:?}"
        );
        // Step 2 with the same gradient: m̂ = g and v̂ = g² again, so another lr·sign(g).
        adam.step(&mut [(&mut p, &g)]);
        assert!(
            (p[0] - 0.8).abs() < 1e-5 && (p[1] + 1.8).abs() < 1e-5,
            "{p:?}"
        );
    }

    #[test]
    fn sgd_momentum_matches_a_hand_computation() {
        let mut p = vec![1.0f32];
        let mut sgd = Sgd::new(0.1, 0.9);
        sgd.step(&mut [(&mut p, &[2.0])]); // v = 2, p = 1 − 0.2 = 0.8
        sgd.step(&mut [(&mut p, &[2.0])]); // v = 1.8 + 2 = 3.8, p = 0.8 − 0.38 = 0.42
        assert!((p[0] - 0.42).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn both_minimise_a_quadratic() {
        // f(p) = Σ (p_i − t_i)², gradient 2(p − t).
        let t = [3.0f32, -1.0, 0.5];
        for use_adam in [true, false] {
            let mut p = vec![0.0f32; 3];
            let mut adam = Adam::new(0.05);
            let mut sgd = Sgd::new(0.05, 0.9);
            for _ in 0..2000 {
                let g: Vec<f32> = p.iter().zip(&t).map(|(a, b)| 2.0 * (a - b)).collect();
                if use_adam {
                    adam.step(&mut [(&mut p, &g)]);
                } else {
                    sgd.step(&mut [(&mut p, &g)]);
                }
            }
            for (a, b) in p.iter().zip(&t) {
                assert!((a - b).abs() < 1e-2, "adam {use_adam}: {p:?}");
            }
        }
    }
}
