//! Exact integer matrix product for deploy models: `C = A · B` with `A` the
//! int8 weight and `B` the activations minus their offset (`q − offset`,
//! within ±255), both widened to i16, accumulated in i32 with wrap-around,
//! as the device accumulates.
//!
//! Products are taken two at a time along the inner dimension (`vpmaddwd`
//! on AVX2: `a₀b₀ + a₁b₁` in i32, which cannot overflow since each product
//! is below 2^15), so both operands are stored in pairs: the weight as one
//! i32 word per pair of columns, the activations as [`PairedColumns`]. A
//! scalar loop computes the same sums where AVX2 is missing.

/// The weight `[m, k]`, packed as pairs `(a[r][2j], a[r][2j + 1])` per row.
pub struct PackedIntWeight {
    rows: usize,
    pairs: usize,
    /// `rows × pairs` words, each two i16 (low half: even column).
    words: Vec<i32>,
}

impl PackedIntWeight {
    /// Packs a row-major `[rows, k]` int8 matrix.
    pub fn new(a: &[i8], rows: usize, k: usize) -> PackedIntWeight {
        assert_eq!(a.len(), rows * k, "weight size");
        let pairs = k.div_ceil(2);
        let mut words = Vec::with_capacity(rows * pairs);
        for row in a.chunks_exact(k.max(1)).take(rows) {
            for j in 0..pairs {
                let lo = i16::from(row[2 * j]);
                let hi = row.get(2 * j + 1).map_or(0, |&v| i16::from(v));
                words.push(pair(lo, hi));
            }
        }
        PackedIntWeight { rows, pairs, words }
    }

    /// Rows of the weight (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Pairs along the inner dimension (`⌈k / 2⌉`).
    pub fn pairs(&self) -> usize {
        self.pairs
    }
}

fn pair(lo: i16, hi: i16) -> i32 {
    (i32::from(hi) << 16) | i32::from(lo as u16)
}

/// The right-hand matrix `[k, n]` stored as `⌈k / 2⌉` pair-rows of `n`
/// columns, each column's two values adjacent: element `(r, c)` is at
/// `((r / 2) · n + c) · 2 + r % 2`. An odd `k` leaves the last pair's
/// second values zero.
pub struct PairedColumns {
    /// Columns.
    pub n: usize,
    /// The values, `2 · ⌈k / 2⌉ · n` of them.
    pub data: Vec<i16>,
}

impl PairedColumns {
    /// Zeros for `k` rows of `n` columns.
    pub fn zeros(k: usize, n: usize) -> PairedColumns {
        PairedColumns {
            n,
            data: vec![0; k.div_ceil(2) * n * 2],
        }
    }

    /// Sets element `(r, c)`.
    #[inline]
    pub fn set(&mut self, r: usize, c: usize, v: i16) {
        self.data[((r / 2) * self.n + c) * 2 + r % 2] = v;
    }
}

/// `out[r · n + c] = Σ_k a[r][k] · b[k][c]` (wrapping i32) for every row of
/// `a` and column of `b`; `out` holds `a.rows() × b.n` values.
pub fn int_gemm(a: &PackedIntWeight, b: &PairedColumns, out: &mut [i32]) {
    assert_eq!(b.data.len(), a.pairs * b.n * 2, "inner dimensions differ");
    assert_eq!(out.len(), a.rows * b.n, "output size");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present, checked just above.
        unsafe {
            if b.n < avx2::NR {
                // Too few columns for a tile: one dot product per output.
                avx2::int_dots(a, b, out);
            } else {
                avx2::int_gemm(a, b, out);
            }
        }
        return;
    }
    scalar_gemm(a, b, out, 0);
}

/// The scalar loop, from column `from` on (the AVX2 path's remainder).
fn scalar_gemm(a: &PackedIntWeight, b: &PairedColumns, out: &mut [i32], from: usize) {
    let n = b.n;
    for r in 0..a.rows {
        let row = &a.words[r * a.pairs..(r + 1) * a.pairs];
        for c in from..n {
            let mut acc = 0i32;
            for (j, &w) in row.iter().enumerate() {
                let (w0, w1) = (i32::from(w as i16), w >> 16);
                let at = (j * n + c) * 2;
                acc = acc
                    .wrapping_add(w0 * i32::from(b.data[at]))
                    .wrapping_add(w1 * i32::from(b.data[at + 1]));
            }
            out[r * n + c] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PackedIntWeight, PairedColumns, scalar_gemm};
    use std::arch::x86_64::*;

    /// Rows per tile.
    const MR: usize = 4;
    /// Columns per tile (two vectors of eight i32).
    pub const NR: usize = 16;

    /// Each output as one dot product: a column of `b` gathered into the
    /// weight's pair order, then 16 products per `vpmaddwd` along a row.
    #[target_feature(enable = "avx2")]
    pub unsafe fn int_dots(a: &PackedIntWeight, b: &PairedColumns, out: &mut [i32]) {
        let n = b.n;
        let mut column = vec![0i32; a.pairs];
        let full = a.pairs - a.pairs % 8;
        for c in 0..n {
            for (j, word) in column.iter_mut().enumerate() {
                let at = (j * n + c) * 2;
                *word = super::pair(b.data[at], b.data[at + 1]);
            }
            for r in 0..a.rows {
                let row = &a.words[r * a.pairs..(r + 1) * a.pairs];
                let mut acc = _mm256_setzero_si256();
                for j in (0..full).step_by(8) {
                    // SAFETY: words j..j + 8 lie in both slices (j + 8 ≤ full ≤ pairs).
                    let (w, x) = unsafe {
                        (
                            _mm256_loadu_si256(row.as_ptr().add(j) as *const __m256i),
                            _mm256_loadu_si256(column.as_ptr().add(j) as *const __m256i),
                        )
                    };
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
                }
                let mut lanes = [0i32; 8];
                // SAFETY: `lanes` holds 8 i32.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc) };
                let mut sum = lanes.iter().fold(0i32, |s, &v| s.wrapping_add(v));
                for j in full..a.pairs {
                    let (w, x) = (row[j], column[j]);
                    sum = sum
                        .wrapping_add(i32::from(w as i16) * i32::from(x as i16))
                        .wrapping_add((w >> 16) * (x >> 16));
                }
                out[r * n + c] = sum;
            }
        }
    }

    /// The tiled product: `R × NR` accumulators in registers (`R` = 4 for
    /// whole row tiles, 1 for the rows left over), one pair-row of `b`
    /// loaded per step and multiplied by each row's broadcast pair.
    #[target_feature(enable = "avx2")]
    pub unsafe fn int_gemm(a: &PackedIntWeight, b: &PairedColumns, out: &mut [i32]) {
        let n = b.n;
        let full = n - n % NR;
        let whole_rows = a.rows - a.rows % MR;
        for r0 in (0..whole_rows).step_by(MR) {
            for c0 in (0..full).step_by(NR) {
                // SAFETY: rows r0..r0 + 4 and columns c0..c0 + 16 are in range.
                unsafe { tile::<MR>(a, b, out, r0, c0) };
            }
        }
        for r0 in whole_rows..a.rows {
            for c0 in (0..full).step_by(NR) {
                // SAFETY: row r0 and columns c0..c0 + 16 are in range.
                unsafe { tile::<1>(a, b, out, r0, c0) };
            }
        }
        if full < n {
            scalar_gemm(a, b, out, full);
        }
    }

    /// Rows `r0..r0 + R`, columns `c0..c0 + NR` of the product.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tile<const R: usize>(
        a: &PackedIntWeight,
        b: &PairedColumns,
        out: &mut [i32],
        r0: usize,
        c0: usize,
    ) {
        let n = b.n;
        let bp = b.data.as_ptr();
        let wp = a.words.as_ptr();
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for j in 0..a.pairs {
            // SAFETY: pair-row j, columns c0..c0 + 16, lies inside `b`, and
            // words (r0 + i, j) inside the weight (checked by the callers).
            unsafe {
                let p = bp.add((j * n + c0) * 2) as *const __m256i;
                let (b0, b1) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_epi32(*wp.add((r0 + i) * a.pairs + j));
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(w, b0));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(w, b1));
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let o = &mut out[(r0 + i) * n + c0..(r0 + i) * n + c0 + NR];
            // SAFETY: `o` holds exactly 16 i32.
            unsafe {
                _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, acc[0]);
                _mm256_storeu_si256(o.as_mut_ptr().add(8) as *mut __m256i, acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reproducible integers in `lo..=hi`.
    fn ints(seed: u64, n: usize, lo: i32, hi: i32) -> Vec<i32> {
        super::super::test_values(seed, n)
            .into_iter()
            .map(|v| lo + (((v + 1.0) / 2.0) * (hi - lo + 1) as f32).floor() as i32)
            .map(|v| v.clamp(lo, hi))
            .collect()
    }

    fn check(m: usize, k: usize, n: usize, seed: u64, extreme: bool) {
        let (a, b): (Vec<i8>, Vec<i16>) = if extreme {
            // The largest products, all of one sign: the sums that pass
            // 2^24 soonest (and the pairs vpmaddwd adds).
            (vec![-128; m * k], vec![-255; k * n])
        } else {
            (
                ints(seed, m * k, -128, 127)
                    .into_iter()
                    .map(|v| v as i8)
                    .collect(),
                ints(seed + 1, k * n, -255, 255)
                    .into_iter()
                    .map(|v| v as i16)
                    .collect(),
            )
        };
        let packed = PackedIntWeight::new(&a, m, k);
        let mut cols = PairedColumns::zeros(k, n);
        for r in 0..k {
            for c in 0..n {
                cols.set(r, c, b[r * n + c]);
            }
        }
        let mut got = vec![0; m * n];
        int_gemm(&packed, &cols, &mut got);
        for r in 0..m {
            for c in 0..n {
                let want: i64 = (0..k)
                    .map(|i| i64::from(a[r * k + i]) * i64::from(b[i * n + c]))
                    .sum();
                assert_eq!(
                    i64::from(got[r * n + c]),
                    want,
                    "m {m} k {k} n {n} at ({r}, {c})"
                );
            }
        }
    }

    #[test]
    fn products_equal_the_definition_on_random_shapes() {
        for (i, &(m, k, n)) in [
            (1, 1, 1),
            (3, 9, 17),
            (4, 16, 16),
            (5, 27, 33),
            (8, 144, 49),
            (13, 7, 100),
            (2, 1, 40),
            // Fewer columns than a tile: the dot-product path.
            (7, 300, 3),
            (2, 33, 1),
        ]
        .iter()
        .enumerate()
        {
            check(m, k, n, 10 + i as u64, false);
        }
    }

    #[test]
    fn sums_past_two_to_the_24_are_exact() {
        // 1200 × 128 × 255 = 39,168,000 > 2^24 = 16,777,216.
        check(5, 1200, 21, 0, true);
        check(5, 1200, 3, 0, true);
    }
}
