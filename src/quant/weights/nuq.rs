//! NUQ: non-uniform weight quantization on the int8 grid. A layer keeps only
//! `num_steps` of the 256 int8 levels; every int8 weight is snapped to its
//! nearest kept level (ties to the lower one), so the deploy model keeps the
//! uniform format and scales while ATC's weight compression sees few distinct
//! values. `docs/algorithms.md` (NUQ) explains the search:
//!
//! 1. weight-only: the level set minimising `Σ (w − s·L(q))²`, found exactly
//!    by dynamic programming over the sorted int8 values;
//! 2. with calibration data (`num_of_iteration ≥ 1`): the same search with
//!    each weight's error weighted by the mean square of the input channel it
//!    multiplies (the diagonal of the layer's input second moments), then
//!    `num_of_iteration` passes of coordinate descent on the full output
//!    error `Σ_rows Δᵀ H Δ`, which also counts the correlation between input
//!    channels (exact for 1×1 convolutions and Gemm; kernel taps of larger
//!    convolutions are treated as uncorrelated).

use super::arq::ChannelLayout;
use ndarray::ArrayD;
use rayon::prelude::*;

/// NUQ's settings (AMCT's keys and ranges).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NuqSettings {
    /// Levels kept per layer: 16 or 32.
    pub num_steps: usize,
    /// Output-error refinement passes, 0 to 5 (0: weight error only).
    pub num_of_iteration: u32,
}

impl Default for NuqSettings {
    fn default() -> Self {
        NuqSettings {
            num_steps: 32,
            num_of_iteration: 1,
        }
    }
}

/// How a layer's weight elements meet its input channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputMap {
    /// Conv weight `[Cout, Cin, k...]` (group 1): a row is one output channel
    /// at one kernel tap, running over the input channels.
    Conv {
        /// Input channels.
        cin: usize,
        /// Kernel taps (product of the kernel dims).
        taps: usize,
    },
    /// Gemm/MatMul weight `[K, N]`: a row is one output, running over the K inputs.
    KByN {
        /// Inputs.
        k: usize,
        /// Outputs.
        n: usize,
    },
}

impl InputMap {
    /// Number of input channels.
    pub fn channels(&self) -> usize {
        match *self {
            InputMap::Conv { cin, .. } => cin,
            InputMap::KByN { k, .. } => k,
        }
    }

    fn rows(&self, len: usize) -> usize {
        len / self.channels().max(1)
    }

    /// Flat index of element `c` (input channel) of row `r`.
    fn element(&self, r: usize, c: usize) -> usize {
        match *self {
            InputMap::Conv { cin, taps } => {
                let (co, tap) = (r / taps, r % taps);
                (co * cin + c) * taps + tap
            }
            InputMap::KByN { n, .. } => c * n + r,
        }
    }

    fn channel_of(&self, flat: usize) -> usize {
        match *self {
            InputMap::Conv { cin, taps } => (flat / taps) % cin,
            InputMap::KByN { n, .. } => flat / n,
        }
    }
}

/// Second moments `E[x_c x_d]` of a layer's input over its channels (axis 1),
/// accumulated over calibration batches without keeping them.
#[derive(Clone, Debug)]
pub struct InputMoments {
    channels: usize,
    sum: Vec<f64>,
    count: u64,
}

impl InputMoments {
    /// Empty moments of `channels` input channels.
    pub fn new(channels: usize) -> InputMoments {
        InputMoments {
            channels,
            sum: vec![0.0; channels * channels],
            count: 0,
        }
    }

    /// Adds a batch `[N, C, ...]` (or `[N, C]`); other channel counts are ignored.
    pub fn observe(&mut self, x: &[f32], shape: &[usize]) {
        let c = self.channels;
        if shape.len() < 2 || shape[1] != c || c == 0 {
            return;
        }
        let inner: usize = shape[2..].iter().product();
        let n = shape[0];
        if x.len() != n * c * inner {
            return;
        }
        for b in 0..n {
            let block = &x[b * c * inner..(b + 1) * c * inner];
            let m = ndarray::ArrayView2::from_shape((c, inner), block).expect("sizes checked");
            let g = m.dot(&m.t());
            for (acc, v) in self.sum.iter_mut().zip(g.iter()) {
                *acc += f64::from(*v);
            }
        }
        self.count += (n * inner) as u64;
    }

    /// The mean `E[x xᵀ]`, row-major `C × C` (zeros before any data).
    pub fn mean(&self) -> Vec<f64> {
        let d = self.count.max(1) as f64;
        self.sum.iter().map(|v| v / d).collect()
    }
}

/// What NUQ did to one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct NuqResult {
    /// The snapped int8 weight.
    pub weight_q: ArrayD<i8>,
    /// The figures for the report.
    pub summary: NuqSummary,
}

/// NUQ's figures for one layer (the report's `nuq` entry).
#[derive(Clone, Debug, PartialEq, Default, serde::Serialize)]
pub struct NuqSummary {
    /// Number of weights.
    pub weights: usize,
    /// The kept levels, ascending.
    pub levels: Vec<i8>,
    /// Distinct int8 values before (uniform) and after NUQ.
    pub distinct: [usize; 2],
    /// Entropy of the int8 values in bits per weight, before and after: the
    /// size an ideal entropy coder reaches.
    pub bits_per_weight: [f64; 2],
    /// The layer's output error `Σ ΔᵀHΔ` relative to its output energy
    /// `Σ wᵀHw` on the calibration data, uniform and after NUQ (when input
    /// moments were given).
    pub output_error: Option<[f64; 2]>,
    /// Why the layer stayed uniform although NUQ was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

const LEVELS: usize = 256;

fn bucket(q: i8) -> usize {
    (i32::from(q) + 128) as usize
}

/// Entropy in bits per symbol of an int8 tensor.
pub fn entropy_bits(q: &ArrayD<i8>) -> f64 {
    let mut counts = [0u64; LEVELS];
    for &v in q {
        counts[bucket(v)] += 1;
    }
    let n = q.len().max(1) as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Snaps bucket `v` (an int8 value) to its nearest level (ties to the lower).
fn snap(levels: &[i32], v: i32) -> i32 {
    match levels.binary_search(&v) {
        Ok(_) => v,
        Err(0) => levels[0],
        Err(i) if i == levels.len() => levels[i - 1],
        Err(i) => {
            let (lo, hi) = (levels[i - 1], levels[i]);
            if v - lo <= hi - v { lo } else { hi }
        }
    }
}

/// Per-bucket sums of a weighted squared error `Σ a (w − s·L)²`:
/// `A = Σ a s²`, `B = Σ a s w`, `C = Σ a w²`.
#[derive(Clone)]
struct Buckets {
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
}

impl Buckets {
    /// Prefix sums over buckets `0..=i` at `i + 1`.
    fn prefix(&self) -> [Vec<f64>; 3] {
        let p = |x: &[f64]| {
            let mut out = vec![0.0; x.len() + 1];
            for (i, v) in x.iter().enumerate() {
                out[i + 1] = out[i] + v;
            }
            out
        };
        [p(&self.a), p(&self.b), p(&self.c)]
    }
}

/// The `k` integer levels within `[lo, hi]` (bucket indices) minimising the
/// bucketed error when every bucket goes to its nearest level, by dynamic
/// programming over the last level chosen.
fn best_levels(buckets: &Buckets, k: usize, lo: usize, hi: usize) -> Vec<usize> {
    let [pa, pb, pc] = buckets.prefix();
    // Error of mapping buckets x..=y to level l (empty when x > y).
    let cost = |x: usize, y: usize, l: usize| -> f64 {
        if x > y {
            return 0.0;
        }
        let (a, b, c) = (pa[y + 1] - pa[x], pb[y + 1] - pb[x], pc[y + 1] - pc[x]);
        let lv = l as f64 - 128.0;
        (a * lv * lv - 2.0 * b * lv + c).max(0.0)
    };
    let r = hi - lo + 1;
    let k = k.min(r);
    let mut f = vec![f64::INFINITY; r];
    for l in lo..=hi {
        f[l - lo] = cost(lo, l, l);
    }
    let mut back = vec![vec![usize::MAX; r]; k];
    for (j, back_j) in back.iter_mut().enumerate().skip(1) {
        let mut g = vec![f64::INFINITY; r];
        for l in lo + j..=hi {
            let mut best = (f64::INFINITY, usize::MAX);
            for p in lo + j - 1..l {
                if !f[p - lo].is_finite() {
                    continue;
                }
                let mid = (p + l) / 2; // buckets p+1..=mid go to p (ties to the lower)
                let v = f[p - lo] + cost(p + 1, mid, p) + cost(mid + 1, l - 1, l);
                if v < best.0 {
                    best = (v, p);
                }
            }
            g[l - lo] = best.0 + cost(l, l, l);
            back_j[l - lo] = best.1;
        }
        f = g;
    }
    let last = (lo + k - 1..=hi)
        .min_by(|&x, &y| {
            let fx = f[x - lo] + cost(x + 1, hi, x);
            let fy = f[y - lo] + cost(y + 1, hi, y);
            fx.total_cmp(&fy)
        })
        .expect("k <= r");
    let mut levels = vec![last];
    let mut l = last;
    for j in (1..k).rev() {
        l = back[j][l - lo];
        levels.push(l);
    }
    levels.reverse();
    levels
}

/// Statistics of the full output error, over the buckets in use:
/// `error(L) = E0 + 2 Σ_u N_u d_u + Σ_uv M_uv d_u d_v`, `d_u = u − L(u)`.
struct OutputError {
    used: Vec<usize>,
    n: Vec<f64>,
    m: Vec<f64>,
    e0: f64,
    /// `Σ wᵀHw`: the output's energy.
    energy: f64,
}

impl OutputError {
    fn new(
        w: &[f32],
        q: &[i8],
        scale: &(dyn Fn(usize) -> f32 + Sync),
        map: InputMap,
        h: &[f64],
    ) -> OutputError {
        let c = map.channels();
        let rows = map.rows(w.len());
        let zero = || {
            (
                vec![0.0f64; LEVELS],
                vec![0.0f64; LEVELS * LEVELS],
                0.0f64,
                0.0f64,
            )
        };
        let (n, m, e0, energy) = (0..rows)
            .into_par_iter()
            .fold(zero, |(mut n, mut m, mut e0, mut energy), r| {
                let idx: Vec<usize> = (0..c).map(|ch| map.element(r, ch)).collect();
                let s = f64::from(scale(idx[0]));
                let e: Vec<f64> = idx
                    .iter()
                    .map(|&i| f64::from(w[i]) - s * f64::from(q[i]))
                    .collect();
                let b: Vec<usize> = idx.iter().map(|&i| bucket(q[i])).collect();
                let wr: Vec<f64> = idx.iter().map(|&i| f64::from(w[i])).collect();
                for i in 0..c {
                    let hrow = &h[i * c..(i + 1) * c];
                    let he: f64 = hrow.iter().zip(&e).map(|(x, y)| x * y).sum();
                    energy += wr[i] * hrow.iter().zip(&wr).map(|(x, y)| x * y).sum::<f64>();
                    n[b[i]] += s * he;
                    e0 += e[i] * he;
                    let mrow = &mut m[b[i] * LEVELS..(b[i] + 1) * LEVELS];
                    for (j, &hv) in hrow.iter().enumerate() {
                        mrow[b[j]] += s * s * hv;
                    }
                }
                (n, m, e0, energy)
            })
            .reduce(zero, |(mut n, mut m, e0, en0), (n2, m2, e1, en1)| {
                n.iter_mut().zip(&n2).for_each(|(x, y)| *x += y);
                m.iter_mut().zip(&m2).for_each(|(x, y)| *x += y);
                (n, m, e0 + e1, en0 + en1)
            });
        let used: Vec<usize> = (0..LEVELS)
            .filter(|&u| m[u * LEVELS + u] != 0.0 || n[u] != 0.0)
            .collect();
        let mut mc = vec![0.0; used.len() * used.len()];
        for (a, &u) in used.iter().enumerate() {
            for (b, &v) in used.iter().enumerate() {
                mc[a * used.len() + b] = m[u * LEVELS + v];
            }
        }
        OutputError {
            n: used.iter().map(|&u| n[u]).collect(),
            m: mc,
            used,
            e0,
            energy,
        }
    }

    fn error(&self, levels: &[i32]) -> f64 {
        let d: Vec<f64> = self
            .used
            .iter()
            .map(|&u| {
                let v = u as i32 - 128;
                f64::from(v - snap(levels, v))
            })
            .collect();
        let k = d.len();
        let mut quad = 0.0;
        for a in 0..k {
            if d[a] == 0.0 {
                continue;
            }
            let row = &self.m[a * k..(a + 1) * k];
            quad += d[a] * row.iter().zip(&d).map(|(x, y)| x * y).sum::<f64>();
        }
        self.e0 + 2.0 * self.n.iter().zip(&d).map(|(x, y)| x * y).sum::<f64>() + quad
    }

    /// One pass of coordinate descent: each level in turn moves to the
    /// integer between its neighbours that lowers the error most.
    fn refine(&self, levels: &mut [i32]) {
        let mut current = self.error(levels);
        for j in 0..levels.len() {
            let lo = if j == 0 { -128 } else { levels[j - 1] + 1 };
            let hi = if j + 1 == levels.len() {
                127
            } else {
                levels[j + 1] - 1
            };
            let original = levels[j];
            let mut best = (current, original);
            for cand in lo..=hi {
                if cand == original {
                    continue;
                }
                levels[j] = cand;
                let e = self.error(levels);
                if e < best.0 {
                    best = (e, cand);
                }
            }
            levels[j] = best.1;
            current = best.0;
        }
    }
}

/// Applies NUQ to one layer: `w` the float weight, `q` its uniform int8
/// weight with `scales` laid out as `layout`, `map` how elements meet input
/// channels, `moments` the input's `E[x xᵀ]` (`C × C`) when calibration
/// data was observed.
pub fn nuq_quantize(
    w: &ArrayD<f32>,
    q: &ArrayD<i8>,
    scales: &[f32],
    layout: ChannelLayout,
    map: InputMap,
    moments: Option<&[f64]>,
    settings: NuqSettings,
) -> NuqResult {
    let len = w.len();
    let wv: Vec<f32> = w.iter().copied().collect();
    let qv: Vec<i8> = q.iter().copied().collect();
    let scale = |flat: usize| scales[layout.channel_of(flat, len)];
    let diag: Option<Vec<f64>> = moments.filter(|_| settings.num_of_iteration > 0).map(|h| {
        let c = map.channels();
        (0..c).map(|i| h[i * c + i]).collect()
    });
    let mut buckets = Buckets {
        a: vec![0.0; LEVELS],
        b: vec![0.0; LEVELS],
        c: vec![0.0; LEVELS],
    };
    for (flat, (&wf, &qi)) in wv.iter().zip(&qv).enumerate() {
        let imp = diag.as_ref().map_or(1.0, |d| d[map.channel_of(flat)]);
        let (s, wf) = (f64::from(scale(flat)), f64::from(wf));
        let k = bucket(qi);
        buckets.a[k] += imp * s * s;
        buckets.b[k] += imp * s * wf;
        buckets.c[k] += imp * wf * wf;
    }
    let mut present = [false; LEVELS];
    for &v in &qv {
        present[bucket(v)] = true;
    }
    let used: Vec<usize> = (0..LEVELS).filter(|&u| present[u]).collect();
    let mut levels: Vec<i32> = if used.len() <= settings.num_steps {
        used.iter().map(|&u| u as i32 - 128).collect()
    } else {
        let (lo, hi) = (used[0], *used.last().expect("non-empty"));
        best_levels(&buckets, settings.num_steps, lo, hi)
            .into_iter()
            .map(|u| u as i32 - 128)
            .collect()
    };
    let refined = moments.filter(|_| settings.num_of_iteration > 0).map(|h| {
        let oe = OutputError::new(&wv, &qv, &scale, map, h);
        let uniform = oe.e0;
        if used.len() > settings.num_steps {
            for _ in 0..settings.num_of_iteration {
                oe.refine(&mut levels);
            }
        }
        (oe.energy.max(f64::MIN_POSITIVE), uniform, oe.error(&levels))
    });
    let snapped: Vec<i8> = qv
        .iter()
        .map(|&v| snap(&levels, i32::from(v)) as i8)
        .collect();
    let weight_q = ArrayD::from_shape_vec(q.raw_dim(), snapped).expect("same number of elements");
    let mut after = [false; LEVELS];
    for &v in &weight_q {
        after[bucket(v)] = true;
    }
    let summary = NuqSummary {
        weights: len,
        distinct: [used.len(), after.iter().filter(|&&x| x).count()],
        bits_per_weight: [entropy_bits(q), entropy_bits(&weight_q)],
        levels: levels.iter().map(|&l| l as i8).collect(),
        output_error: refined.map(|(energy, u, a)| [u / energy, a / energy]),
        note: None,
    };
    NuqResult { weight_q, summary }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every set of `k` levels out of `lo..=hi`, by brute force.
    fn all_sets(lo: i32, hi: i32, k: usize) -> Vec<Vec<i32>> {
        if k == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for first in lo..=hi {
            for mut rest in all_sets(first + 1, hi, k - 1) {
                rest.insert(0, first);
                out.push(rest);
            }
        }
        out
    }

    fn weight_error(w: &[f32], s: f32, q: &[i8], levels: &[i32]) -> f64 {
        w.iter()
            .zip(q)
            .map(|(&x, &v)| {
                let l = snap(levels, i32::from(v));
                (f64::from(x) - f64::from(s) * f64::from(l)).powi(2)
            })
            .sum()
    }

    #[test]
    fn the_level_search_finds_the_brute_force_optimum() {
        // 60 weights on a grid of scale 0.1 spread over -9..=9, 4 levels.
        let mut seed = 7u64;
        let w: Vec<f32> = (0..60)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (seed >> 33) as f32 / (1u64 << 31) as f32; // [0, 1)
                u * u * if seed & 1 == 0 { 0.9 } else { -0.9 }
            })
            .collect();
        let s = 0.1f32;
        let q: Vec<i8> = w.iter().map(|x| (x / s).round_ties_even() as i8).collect();
        let (lo, hi) = (
            i32::from(*q.iter().min().unwrap()),
            i32::from(*q.iter().max().unwrap()),
        );
        let brute = all_sets(lo, hi, 4)
            .into_iter()
            .map(|l| weight_error(&w, s, &q, &l))
            .fold(f64::INFINITY, f64::min);
        let wa = ArrayD::from_shape_vec(ndarray::IxDyn(&[60]), w.clone()).unwrap();
        let qa = ArrayD::from_shape_vec(ndarray::IxDyn(&[60]), q.clone()).unwrap();
        let r = nuq_quantize(
            &wa,
            &qa,
            &[s],
            ChannelLayout::PerTensor,
            InputMap::KByN { k: 60, n: 1 },
            None,
            NuqSettings {
                num_steps: 4,
                num_of_iteration: 0,
            },
        );
        let levels: Vec<i32> = r.summary.levels.iter().map(|&l| i32::from(l)).collect();
        let got = weight_error(&w, s, &q, &levels);
        assert_eq!(levels.len(), 4);
        assert!(
            (got - brute).abs() <= 1e-9 * brute.max(1.0),
            "{got} vs {brute}"
        );
        // Every snapped weight is one of the levels, and its nearest.
        for (&v, &out) in q.iter().zip(r.weight_q.iter()) {
            assert!(levels.contains(&i32::from(out)));
            let d = (i32::from(v) - i32::from(out)).abs();
            assert!(levels.iter().all(|&l| (i32::from(v) - l).abs() >= d));
        }
    }

    #[test]
    fn few_distinct_values_are_kept_exactly() {
        let w = ArrayD::from_shape_vec(ndarray::IxDyn(&[4]), vec![0.1f32, -0.2, 0.1, 0.3]).unwrap();
        let q = w.mapv(|x| (x / 0.1f32).round() as i8);
        let r = nuq_quantize(
            &w,
            &q,
            &[0.1],
            ChannelLayout::PerTensor,
            InputMap::KByN { k: 4, n: 1 },
            None,
            NuqSettings::default(),
        );
        assert_eq!(r.weight_q, q);
        assert_eq!(r.summary.levels, vec![-2, 1, 3]);
        // Entropy of {1: 2, -2: 1, 3: 1} = 1.5 bits.
        assert!((r.summary.bits_per_weight[0] - 1.5).abs() < 1e-12);
    }

    #[test]
    fn moments_are_the_mean_outer_product_over_positions() {
        // One sample, 2 channels, 3 positions: x0 = [1, 2, 3], x1 = [0, 1, -1].
        let mut m = InputMoments::new(2);
        m.observe(&[1.0, 2.0, 3.0, 0.0, 1.0, -1.0], &[1, 2, 3]);
        let h = m.mean();
        // E[x0²] = 14/3, E[x0 x1] = (0 + 2 - 3)/3, E[x1²] = 2/3.
        let want = [14.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 2.0 / 3.0];
        for (a, b) in h.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{h:?}");
        }
    }

    #[test]
    fn the_output_error_statistics_match_a_direct_computation() {
        // Gemm weight [K=3, N=2], correlated inputs.
        let w = ArrayD::from_shape_vec(
            ndarray::IxDyn(&[3, 2]),
            vec![0.31f32, -0.52, 0.07, 0.44, -0.29, 0.18],
        )
        .unwrap();
        let s = 0.05f32;
        let q = w.mapv(|x| (x / s).round_ties_even() as i8);
        let h = [2.0, 0.5, -0.3, 0.5, 1.0, 0.2, -0.3, 0.2, 0.7];
        let map = InputMap::KByN { k: 3, n: 2 };
        let wv: Vec<f32> = w.iter().copied().collect();
        let qv: Vec<i8> = q.iter().copied().collect();
        let oe = OutputError::new(&wv, &qv, &|_| s, map, &h);
        let levels = vec![-10, -6, 0, 6];
        // Direct: Σ over outputs n of Δ[:, n]ᵀ H Δ[:, n].
        let mut direct = 0.0;
        for n in 0..2 {
            let d: Vec<f64> = (0..3)
                .map(|k| {
                    let l = snap(&levels, i32::from(qv[k * 2 + n]));
                    f64::from(wv[k * 2 + n]) - f64::from(s) * f64::from(l)
                })
                .collect();
            for i in 0..3 {
                for j in 0..3 {
                    direct += d[i] * h[i * 3 + j] * d[j];
                }
            }
        }
        assert!(
            (oe.error(&levels) - direct).abs() < 1e-9,
            "{} vs {direct}",
            oe.error(&levels)
        );
    }
}
