//! A fixed-size histogram whose range grows with the data: the bounded state
//! behind HFMG, percentile, KL and the memory-bounded IFMR.

/// Counts of values in `bins` equal-width bins spanning `[lo, hi]`.
#[derive(Clone, Debug)]
pub struct Histogram {
    lo: f32,
    hi: f32,
    counts: Vec<f64>,
    /// Integer tallies not yet added to `counts` (cheaper per value than
    /// float counts, and merged only when the range changes or the counts
    /// are read, not once per batch).
    pending: Vec<u32>,
    /// Values in `pending`.
    pending_total: u64,
    seen: bool,
    /// Widen by whole powers of two of the bin width, so old bins merge
    /// exactly into new ones instead of being split proportionally.
    aligned: bool,
}

impl Histogram {
    /// An empty histogram with `bins` bins.
    pub fn new(bins: usize) -> Histogram {
        Histogram {
            lo: 0.0,
            hi: 0.0,
            counts: vec![0.0; bins.max(1)],
            pending: vec![0; bins.max(1)],
            pending_total: 0,
            seen: false,
            aligned: false,
        }
    }

    /// An empty histogram that grows its range by merging whole bins: counts
    /// are never smeared across bin edges, however many times the range grows
    /// (AMCT's HFMG instead re-bins proportionally; see [`Histogram::new`]).
    pub fn aligned(bins: usize) -> Histogram {
        Histogram {
            aligned: true,
            ..Histogram::new(bins)
        }
    }

    /// Lower edge of the first bin.
    pub fn lo(&self) -> f32 {
        self.lo
    }

    /// Upper edge of the last bin.
    pub fn hi(&self) -> f32 {
        self.hi
    }

    /// The counts per bin.
    pub fn counts(&self) -> Vec<f64> {
        self.counts
            .iter()
            .zip(&self.pending)
            .map(|(c, p)| c + f64::from(*p))
            .collect()
    }

    /// Adds the pending tallies to the counts.
    fn flush(&mut self) {
        if self.pending_total == 0 {
            return;
        }
        for (c, t) in self.counts.iter_mut().zip(self.pending.iter_mut()) {
            *c += f64::from(*t);
            *t = 0;
        }
        self.pending_total = 0;
    }

    /// Width of one bin (0 when all data so far had one value).
    pub fn bin_width(&self) -> f64 {
        (f64::from(self.hi) - f64::from(self.lo)) / self.counts.len() as f64
    }

    /// Number of values counted.
    pub fn total(&self) -> f64 {
        self.counts.iter().sum::<f64>() + self.pending_total as f64
    }

    /// Adds a batch whose extremes are `min` and `max` (finite, computed by the caller).
    ///
    /// The first batch fixes the range to its own extremes; a later batch
    /// that falls outside widens it to the union, and the old counts are
    /// redistributed assuming a uniform density inside each old bin.
    pub fn add(&mut self, data: &[f32], min: f32, max: f32) {
        if data.is_empty() {
            return;
        }
        if !self.seen {
            self.lo = min;
            self.hi = max;
            self.seen = true;
        } else if min < self.lo || max > self.hi {
            self.flush();
            if self.aligned && self.bin_width() > 0.0 {
                self.grow_aligned(min, max);
            } else {
                self.rebin(min.min(self.lo), max.max(self.hi));
            }
        }
        let n = self.counts.len();
        let lo = f64::from(self.lo);
        let width = self.bin_width();
        if width <= 0.0 {
            self.counts[0] += data.len() as f64;
            return;
        }
        let (lo, inv) = (lo as f32, (1.0 / width) as f32);
        for chunk in data.chunks(u32::MAX as usize) {
            // No bin can overflow its u32 tally before the next flush.
            if self.pending_total + chunk.len() as u64 > u64::from(u32::MAX) {
                self.flush();
            }
            // Bin indices a block at a time (a loop that vectorises), then
            // the tallies.
            let top = (n - 1) as f32;
            let mut bins = [0u32; 256];
            for block in chunk.chunks(bins.len()) {
                for (b, &x) in bins.iter_mut().zip(block) {
                    let t = ((x - lo) * inv).max(0.0).min(top);
                    // SAFETY: `t` is in [0, n − 1] (`max` maps NaN to 0).
                    *b = unsafe { t.to_int_unchecked::<u32>() };
                }
                for &b in &bins[..block.len()] {
                    self.pending[b as usize] += 1;
                }
            }
            self.pending_total += chunk.len() as u64;
        }
    }

    /// Widens the range to cover `[min, max]` by a power-of-two factor `f` of
    /// the bin width, with the new lower edge `a * f` old bins below the old
    /// one, so every `f` consecutive old bins become exactly one new bin.
    fn grow_aligned(&mut self, min: f32, max: f32) {
        let n = self.counts.len();
        let w = self.bin_width();
        let (old_lo, min, max) = (
            f64::from(self.lo),
            f64::from(min.min(self.lo)),
            f64::from(max.max(self.hi)),
        );
        let mut f: usize = 2;
        let (a, new_lo) = loop {
            let a = ((old_lo - min) / (f as f64 * w)).ceil().max(0.0) as usize;
            let new_lo = old_lo - (a * f) as f64 * w;
            if new_lo + (n * f) as f64 * w >= max || f > (1 << 40) {
                break (a, new_lo);
            }
            f *= 2;
        };
        let mut fresh = vec![0.0; n];
        for (i, &c) in self.counts.iter().enumerate() {
            fresh[(i / f + a).min(n - 1)] += c;
        }
        self.counts = fresh;
        self.lo = new_lo as f32;
        self.hi = (new_lo + (n * f) as f64 * w) as f32;
    }

    /// Moves the counts onto the wider range `[lo, hi]`.
    fn rebin(&mut self, lo: f32, hi: f32) {
        let n = self.counts.len();
        let old_lo = f64::from(self.lo);
        let old_w = self.bin_width();
        let new_w = (f64::from(hi) - f64::from(lo)) / n as f64;
        let mut fresh = vec![0.0; n];
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0.0 {
                continue;
            }
            if old_w <= 0.0 {
                let j = ((old_lo - f64::from(lo)) / new_w) as usize;
                fresh[j.min(n - 1)] += c;
                continue;
            }
            let begin = old_lo + i as f64 * old_w - f64::from(lo);
            let end = begin + old_w;
            let first = ((begin / new_w) as usize).min(n - 1);
            let last = ((end / new_w) as usize).min(n - 1);
            if first == last {
                fresh[first] += c;
                continue;
            }
            for (j, slot) in fresh.iter_mut().enumerate().take(last + 1).skip(first) {
                let a = begin.max(j as f64 * new_w);
                let b = end.min((j + 1) as f64 * new_w);
                if b > a {
                    *slot += c * (b - a) / old_w;
                }
            }
        }
        self.counts = fresh;
        self.lo = lo;
        self.hi = hi;
    }

    /// The value below which a fraction `q` (0..=1) of the counts lie,
    /// interpolating linearly inside the bin where the fraction is reached.
    pub fn quantile(&self, q: f64) -> f32 {
        let total = self.total();
        if total == 0.0 {
            return 0.0;
        }
        let target = q.clamp(0.0, 1.0) * total;
        let width = self.bin_width();
        let mut acc = 0.0;
        for (i, c) in self.counts().into_iter().enumerate() {
            if acc + c >= target && c > 0.0 {
                let frac = ((target - acc) / c).clamp(0.0, 1.0);
                return (f64::from(self.lo) + (i as f64 + frac) * width) as f32;
            }
            acc += c;
        }
        self.hi
    }

    /// Centre of bin `i`.
    pub fn center(&self, i: usize) -> f64 {
        f64::from(self.lo) + (i as f64 + 0.5) * self.bin_width()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_the_right_bins() {
        let mut h = Histogram::new(4);
        h.add(&[0.0, 0.5, 1.0, 3.9, 4.0], 0.0, 4.0);
        assert_eq!(h.counts(), [2.0, 1.0, 0.0, 2.0]);
    }

    #[test]
    fn widening_keeps_the_total_and_spreads_uniformly() {
        let mut h = Histogram::new(4);
        h.add(&[0.5, 1.5], 0.0, 2.0); // bins of width 0.5: [0,0.5)...: 0.5 -> bin 1, 1.5 -> bin 3
        assert_eq!(h.counts(), [0.0, 1.0, 0.0, 1.0]);
        h.add(&[4.0], 4.0, 4.0); // range becomes [0, 4], width 1
        assert_eq!(h.total(), 3.0);
        // old bin [0.5,1) -> new bin 0; old [1.5,2) -> new bin 1; 4.0 -> last bin.
        assert_eq!(h.counts(), [1.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn aligned_growth_merges_whole_bins() {
        let mut h = Histogram::aligned(4);
        h.add(&[0.5, 1.5], 0.0, 2.0); // width 0.5: counts [0, 1, 0, 1]
        h.add(&[3.0], 3.0, 3.0); // needs [0, 3]: width 1 (f = 2), bins [0,1) [1,2) [2,3) [3,4)
        assert_eq!((h.lo(), h.hi()), (0.0, 4.0));
        assert_eq!(h.counts(), [1.0, 1.0, 0.0, 1.0]);
        h.add(&[-1.0], -1.0, -1.0); // width 2, one new bin below: [-2,0) [0,2) [2,4) [4,6)
        assert_eq!((h.lo(), h.hi()), (-2.0, 6.0));
        assert_eq!(h.counts(), [1.0, 2.0, 1.0, 0.0]);
    }

    #[test]
    fn quantiles_interpolate() {
        let mut h = Histogram::new(10);
        let data: Vec<f32> = (0..1000).map(|i| i as f32 / 100.0).collect();
        h.add(&data, 0.0, 9.99);
        assert!((h.quantile(0.5) - 5.0).abs() < 0.02, "{}", h.quantile(0.5));
        assert!((h.quantile(0.999) - 9.98).abs() < 0.02);
    }
}
