//! 2-D convolution (NCHW). Where the CPU has AVX-512, layers of one group
//! with columns of at least [`channel_tiles::MIN_DEPTH`] values, output
//! channels in multiples of 16 and strides of at most 2 run on
//! [`super::channel_tiles`], other layers of one group on [`super::tiled`]
//! (pointwise layers, and im2col layers of at most 512 values per column);
//! the others on a GEMM: the weight, packed once,
//! times the input's columns (the input itself for a 1×1 convolution with
//! stride 1 and no padding, else a virtual im2col matrix the GEMM packs from
//! the image), bias and activation (clamp or SiLU) fused after. Depthwise
//! layers go to [`super::depthwise`]; other grouped layers run one GEMM per
//! group. A residual to add after the activation is taken by every path.

use super::activation::Activation;
use super::channel_tiles::{self, ChannelTiles};
use super::depthwise::{DepthwiseShape, depthwise};
use super::tiled::{Patches, TiledConv, shifted_windows};
use super::written_by;
use rayon::prelude::*;
use rten_gemm::{
    BiasVector, ColOffsets, GemmExecutor, GemmInputA, GemmInputB, GemmUninitOptions, Im2Col,
    PackedAMatrix, RowOffsets,
};
use rten_tensor::NdTensorView;
use std::mem::MaybeUninit;

/// A convolution's attributes, after `auto_pad` is resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvGeometry {
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Vertical and horizontal stride.
    pub stride: (usize, usize),
    /// Vertical and horizontal dilation.
    pub dilation: (usize, usize),
    /// Padding: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Groups.
    pub group: usize,
}

impl ConvGeometry {
    /// The depthwise kernel's description of this geometry on an `h × w` input.
    pub fn depthwise_shape(&self, h: usize, w: usize) -> DepthwiseShape {
        DepthwiseShape {
            h,
            w,
            kh: self.kernel.0,
            kw: self.kernel.1,
            stride: self.stride,
            dilation: self.dilation,
            pads: self.pads,
        }
    }

    /// Output height and width for an input of `h × w`, or `None` when the
    /// kernel does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let g = self;
        let size = |n: usize, pads: usize, k: usize, s: usize, d: usize| {
            let span = d * (k - 1) + 1;
            (n + pads >= span).then(|| (n + pads - span) / s + 1)
        };
        Some((
            size(
                h,
                g.pads[0] + g.pads[2],
                g.kernel.0,
                g.stride.0,
                g.dilation.0,
            )?,
            size(
                w,
                g.pads[1] + g.pads[3],
                g.kernel.1,
                g.stride.1,
                g.dilation.1,
            )?,
        ))
    }
}

/// A convolution ready to run: weights packed for the GEMM.
pub struct Conv {
    geometry: ConvGeometry,
    c_in: usize,
    c_out: usize,
    weights: Weights,
    bias: Option<Vec<f32>>,
    /// Applied to every output.
    pub activation: Activation,
}

/// A convolution's weight, in the form its kernel reads.
enum Weights {
    /// Depthwise layers: `[C_out, kh · kw]` as given.
    Depthwise(Vec<f32>),
    /// Layers of one group with deep columns, output channels in multiples
    /// of 16 and strides of at most 2, on CPUs with AVX-512: packed for
    /// [`ChannelTiles`].
    Channels(ChannelTiles),
    /// Layers of one group on CPUs with AVX-512: packed for [`TiledConv`].
    Tiled(TiledConv),
    /// Everything else: one packed block per group for the GEMM.
    Gemm(Vec<PackedAMatrix<f32>>),
}

thread_local! {
    /// The GEMM for this thread (the executor is not `Send`; making one only
    /// picks the kernel for the CPU, and packed matrices work with any).
    static GEMM: GemmExecutor<f32> = GemmExecutor::new();
}

fn with_gemm<R>(f: impl FnOnce(&GemmExecutor<f32>) -> R) -> R {
    GEMM.with(f)
}

/// The product of a row-major `[m, k]` matrix `a` and a row-major `[k, n]`
/// matrix `b` (neither packed ahead: both are values of this run), on the
/// GEMM the dense layers use.
pub fn matrix_product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let fill = |out: &mut [MaybeUninit<f32>]| {
        with_gemm(|e| {
            e.gemm_uninit(
                out,
                GemmInputA::Unpacked(NdTensorView::from_data([m, k], a)),
                GemmInputB::Unpacked(NdTensorView::from_data([k, n], b)),
                GemmUninitOptions::default(),
            )
            .map(|_| ())
            .expect("shapes agree by construction")
        })
    };
    // SAFETY: the GEMM writes all of its `m × n` output.
    unsafe { written_by(m * n, fill) }
}

impl Conv {
    /// A convolution with weight `[C_out, C_in/group, kh, kw]` (flattened).
    pub fn new(
        geometry: ConvGeometry,
        c_in: usize,
        c_out: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Conv {
        Conv::with_kernels(geometry, c_in, c_out, weight, bias, true)
    }

    /// `new`, with the tiled kernel allowed or not (the tests run the
    /// general GEMM too, as CPUs without AVX-512 do).
    fn with_kernels(
        geometry: ConvGeometry,
        c_in: usize,
        c_out: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        allow_tiled: bool,
    ) -> Conv {
        let g = geometry.group;
        let k = c_in / g * geometry.kernel.0 * geometry.kernel.1;
        let m = c_out / g;
        let weights = if is_depthwise(&geometry, c_in, c_out) {
            Weights::Depthwise(weight)
        } else if let Some(t) = (g == 1 && allow_tiled)
            .then(|| channel_tiles(&weight, c_out, c_in, &geometry))
            .flatten()
        {
            Weights::Channels(t)
        } else if let Some(t) = (g == 1 && allow_tiled)
            .then(|| tiled(&weight, c_out, c_in, &geometry))
            .flatten()
        {
            Weights::Tiled(t)
        } else {
            Weights::Gemm(
                (0..g)
                    .map(|i| {
                        let block = &weight[i * m * k..(i + 1) * m * k];
                        with_gemm(|e| e.prepack_a(NdTensorView::from_data([m, k], block)))
                    })
                    .collect(),
            )
        };
        Conv {
            geometry,
            c_in,
            c_out,
            weights,
            bias,
            activation: Activation::None,
        }
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// Output height and width for an input of `h × w`, or `None` when the
    /// kernel does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        self.geometry.out_hw(h, w)
    }

    /// Runs on `x` of shape `[n, C_in, h, w]`; returns `[n, C_out, oh, ow]`
    /// values and `(oh, ow)`, or `None` when the kernel does not fit.
    pub fn run(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Option<(Vec<f32>, (usize, usize))> {
        self.run_adding(x, n, h, w, None)
    }

    /// `run`, with `residual` (`[n, C_out, oh, ow]`, when given) added to
    /// every output after the activation: a residual block's Add, fused.
    pub fn run_adding(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        residual: Option<&[f32]>,
    ) -> Option<(Vec<f32>, (usize, usize))> {
        let (oh, ow) = self.out_hw(h, w)?;
        let len = n * self.c_out * oh * ow;
        if let Some(r) = residual {
            assert_eq!(r.len(), len, "the residual has the output's shape");
        }
        if len == 0 {
            return Some((Vec::new(), (oh, ow)));
        }
        let add = |mut out: Vec<f32>| {
            if let Some(r) = residual {
                out.par_chunks_mut(1 << 14)
                    .zip(r.par_chunks(1 << 14))
                    .for_each(|(o, r)| o.iter_mut().zip(r).for_each(|(o, r)| *o += r));
            }
            out
        };
        let g = &self.geometry;
        if let Weights::Depthwise(weight) = &self.weights {
            let shape = g.depthwise_shape(h, w);
            let clamp = match self.activation {
                Activation::Clamp(lo, hi) => (lo, hi),
                _ => (f32::NEG_INFINITY, f32::INFINITY),
            };
            let planes = n * self.c_out;
            let bias = self.bias.as_deref();
            let mut out = depthwise(&shape, planes, self.c_out, x, weight, bias, clamp);
            if self.activation == Activation::Silu {
                out.par_chunks_mut(1 << 14)
                    .for_each(|c| Activation::Silu.apply(c));
            }
            return Some((add(out), (oh, ow)));
        }
        let (bias, act) = (self.bias.as_deref(), self.activation);
        match &self.weights {
            Weights::Channels(t) => {
                let out = self.per_sample(x, n, (h, w), (oh, ow), residual, |xs, r, os| {
                    t.run(xs, (h, w), (oh, ow), bias, act, r, os)
                });
                return Some((out, (oh, ow)));
            }
            Weights::Tiled(t) => {
                let out = self.per_sample(x, n, (h, w), (oh, ow), residual, |xs, r, os| {
                    t.run(xs, (h, w), (oh, ow), bias, act, r, os)
                });
                return Some((out, (oh, ow)));
            }
            _ => {}
        }
        // SAFETY: the groups' GEMMs below write every output of every sample.
        let out = unsafe { written_by(len, |out| self.gemms(x, n, (h, w), (oh, ow), out)) };
        Some((add(out), (oh, ow)))
    }

    /// The output of a kernel that runs one sample at a time: `run(x, r,
    /// out)` for each of the `n` samples' input `[c_in, h, w]`, residual and output
    /// `[c_out, oh, ow]`, writing every value of `out`.
    fn per_sample(
        &self,
        x: &[f32],
        n: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        residual: Option<&[f32]>,
        run: impl Fn(&[f32], Option<&[f32]>, &mut [MaybeUninit<f32>]),
    ) -> Vec<f32> {
        let (per_in, per_out) = (self.c_in * h * w, self.c_out * oh * ow);
        assert_eq!(x.len(), n * per_in, "the input is [n, c_in, h, w]");
        let fill = |out: &mut [MaybeUninit<f32>]| {
            for (s, (xs, os)) in x
                .chunks_exact(per_in)
                .zip(out.chunks_exact_mut(per_out))
                .enumerate()
            {
                run(xs, residual.map(|r| &r[s * per_out..][..per_out]), os);
            }
        };
        // SAFETY: `run` writes all of each sample's outputs (its contract).
        unsafe { written_by(n * per_out, fill) }
    }

    /// The GEMM of every sample and group, into `out` (`[n, C_out, oh, ow]`).
    fn gemms(
        &self,
        x: &[f32],
        n: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        out: &mut [MaybeUninit<f32>],
    ) {
        let g = &self.geometry;
        let groups = g.group;
        let cg = self.c_in / groups;
        let m = self.c_out / groups;
        let k = cg * g.kernel.0 * g.kernel.1;
        let cols = oh * ow;
        let direct = is_direct(g);
        for s in 0..n {
            for gi in 0..groups {
                let xin =
                    &x[(s * self.c_in + gi * cg) * h * w..(s * self.c_in + (gi + 1) * cg) * h * w];
                let b = if direct {
                    Columns::Direct(xin)
                } else {
                    Columns::Patches {
                        x: xin,
                        cg,
                        h,
                        w,
                        ow,
                    }
                };
                let out_block = &mut out
                    [(s * self.c_out + gi * m) * cols..(s * self.c_out + (gi + 1) * m) * cols];
                let bias = self.bias.as_ref().map(|b| &b[gi * m..(gi + 1) * m]);
                self.gemm_activated(gi, b, k, cols, bias, out_block);
            }
        }
    }
}

/// The right-hand matrix of a convolution's GEMM, `[k, cols]`.
#[derive(Clone, Copy)]
enum Columns<'a> {
    /// The input itself (1×1, stride 1, no padding), row-major.
    Direct(&'a [f32]),
    /// The im2col matrix of one group's `[cg, h, w]` input, never
    /// materialised: the GEMM packs its blocks straight from the image.
    Patches {
        x: &'a [f32],
        cg: usize,
        h: usize,
        w: usize,
        ow: usize,
    },
}

impl Conv {
    /// `out = act(W_group · b + bias)` for the `[k, cols]` matrix `b`
    /// (every value of `out` written). With an activation, wide outputs are
    /// computed in blocks of columns, in parallel, each block activated while
    /// in cache and written once.
    fn gemm_activated(
        &self,
        group: usize,
        b: Columns<'_>,
        k: usize,
        cols: usize,
        bias: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let m = out.len() / cols.max(1);
        let Weights::Gemm(packed) = &self.weights else {
            unreachable!("only GEMM layers come here")
        };
        // One GEMM over output columns `range` into `dst` (`m × range.len()`),
        // which it writes entirely.
        let run = |dst: &mut [MaybeUninit<f32>], range: std::ops::Range<usize>| {
            with_gemm(|e| {
                let opts = GemmUninitOptions {
                    bias: bias.map(BiasVector::Column),
                    ..Default::default()
                };
                let a = GemmInputA::Packed(&packed[group]);
                let result = match b {
                    Columns::Direct(data) => {
                        let view = NdTensorView::from_data_with_strides(
                            [k, range.len()],
                            &data[range.start..],
                            [cols, 1],
                        )
                        .expect("the view lies inside the input");
                        e.gemm_uninit(dst, a, GemmInputB::Unpacked(view), opts)
                    }
                    Columns::Patches { x, cg, h, w, ow } => {
                        let patches = self.patches(x, (cg, h, w), ow, range, e);
                        e.gemm_uninit(dst, a, GemmInputB::Im2Col(&patches), opts)
                    }
                };
                result.map(|_| ()).expect("shapes agree by construction")
            })
        };
        if self.activation == Activation::None || cols <= COLUMN_BLOCK {
            run(out, 0..cols);
            if self.activation != Activation::None {
                // SAFETY: the GEMM wrote every value of `out`.
                let out = unsafe { out.assume_init_mut() };
                // Narrow outputs: one GEMM (parallel inside), then the
                // activation over the whole output, in parallel too.
                out.par_chunks_mut(1 << 14)
                    .for_each(|c| self.activation.apply(c));
            }
            return;
        }
        let dst = SharedOut::new(out);
        let blocks: Vec<usize> = (0..cols).step_by(COLUMN_BLOCK).collect();
        blocks.par_iter().for_each_init(Vec::new, |block, &c0| {
            let width = COLUMN_BLOCK.min(cols - c0);
            block.resize(m * width, MaybeUninit::uninit());
            let block = &mut block[..m * width];
            run(block, c0..c0 + width);
            // SAFETY: the GEMM wrote every value of the block.
            let block = unsafe { block.assume_init_ref() };
            for (row, src) in block.chunks_exact(width).enumerate() {
                // SAFETY: the blocks' column ranges [c0, c0 + width) are
                // disjoint, so no two threads write the same values.
                let row_out = unsafe { dst.slice(row * cols + c0, width) };
                self.activation.apply(row_out.write_copy_of_slice(src));
            }
        });
    }

    /// The virtual im2col matrix of one group's `[cg, h, w]` input for the
    /// output columns `range`: for each row (channel, tap) and each column
    /// (output position), where in the image the value comes from; offsets
    /// outside `[0, max]` are padding. Row and column counts are rounded up
    /// to the GEMM kernel's steps with entries that read as padding.
    fn patches<'a>(
        &self,
        x: &'a [f32],
        (cg, h, w): (usize, usize, usize),
        ow: usize,
        range: std::ops::Range<usize>,
        e: &GemmExecutor<f32>,
    ) -> Im2Col<'a, f32> {
        let g = &self.geometry;
        let (kh, kw) = g.kernel;
        let (sy, sx) = g.stride;
        let (dy, dx) = g.dilation;
        let (max_y, max_x) = (((h - 1) * w) as i32, (w - 1) as i32);
        let rows = cg * kh * kw;
        let rows_padded = rows.next_multiple_of(e.im2col_row_count_step());
        let mut chan = Vec::with_capacity(rows_padded);
        let mut ys = Vec::with_capacity(rows_padded);
        let mut xs = Vec::with_capacity(rows_padded);
        for c in 0..cg {
            for ky in 0..kh {
                for kx in 0..kw {
                    chan.push((c * h * w) as i32);
                    ys.push((ky * dy * w) as i32);
                    xs.push((kx * dx) as i32);
                }
            }
        }
        chan.resize(rows_padded, 0);
        ys.resize(rows_padded, max_y + 1);
        xs.resize(rows_padded, max_x + 1);
        let n_cols = range.len();
        let cols_padded = n_cols.next_multiple_of(e.im2col_col_count_step());
        let (mut col_y, mut col_x) = (
            Vec::with_capacity(cols_padded),
            Vec::with_capacity(cols_padded),
        );
        for col in range.start..range.start + cols_padded {
            let (oy, ox) = (col / ow, col % ow);
            col_y.push((oy * sy) as i32 * w as i32 - (g.pads[0] * w) as i32);
            col_x.push((ox * sx) as i32 - g.pads[1] as i32);
        }
        Im2Col {
            image: NdTensorView::from_data([cg, h, w], x),
            row_offsets: RowOffsets { chan, y: ys, x: xs },
            col_offsets: ColOffsets { y: col_y, x: col_x },
            n_cols,
            n_rows: rows,
            max_y_offset: max_y,
            max_x_offset: max_x,
        }
    }
}

/// The deepest im2col column (input channels × kernel taps) the tiled
/// kernel runs (see [`tiled`]).
const TILED_IM2COL_DEPTH: usize = 512;

/// Output columns an activated GEMM computes at a time.
const COLUMN_BLOCK: usize = 2048;

/// An output written by parallel tasks in disjoint parts.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(*mut MaybeUninit<f32>, usize);

impl SharedOut {
    /// Shares `out` between tasks.
    pub(super) fn new(out: &mut [MaybeUninit<f32>]) -> SharedOut {
        SharedOut(out.as_mut_ptr(), out.len())
    }

    /// `len` values from `start`.
    ///
    /// # Safety
    /// No other live slice may overlap this one, and the buffer must outlive it.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice(&self, start: usize, len: usize) -> &mut [MaybeUninit<f32>] {
        assert!(start + len <= self.1, "inside the output");
        // SAFETY: in bounds (checked above); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}
// SAFETY: the blocks written through the pointer are disjoint (see the use).
unsafe impl Send for SharedOut {}
// SAFETY: as above; the pointer is only read to derive disjoint slices.
unsafe impl Sync for SharedOut {}

/// The channel-lane kernel for a layer of one group whose columns hold at
/// least [`channel_tiles::MIN_DEPTH`] values and whose output channels come
/// in multiples of 16: on the input itself when pointwise, else on shifted
/// windows (strides 1 and 2); `None` otherwise or without AVX-512F.
fn channel_tiles(
    weight: &[f32],
    c_out: usize,
    c_in: usize,
    g: &ConvGeometry,
) -> Option<ChannelTiles> {
    if c_in * g.kernel.0 * g.kernel.1 < channel_tiles::MIN_DEPTH {
        return None;
    }
    if is_direct(g) {
        return ChannelTiles::pointwise(weight, c_out, c_in);
    }
    ChannelTiles::patches(
        weight,
        c_out,
        Patches {
            c_in,
            kernel: g.kernel,
            stride: g.stride,
            dilation: g.dilation,
            pads: (g.pads[0], g.pads[1]),
        },
    )
}

/// The tiled kernel for a layer of one group: on the input itself when
/// pointwise, else on shifted windows or im2col blocks (see [`tiled`]) when
/// a column holds at most [`TILED_IM2COL_DEPTH`] values, or more at stride 1
/// (shifted windows); `None` without AVX-512F and for the other deep
/// layers, where the general GEMM measured faster. On the detector, 1 / 2
/// threads: its 3×3 stride-1 layers of 64 channels took 0.79 / 0.90× the
/// GEMM's time, those of 128 0.88 / 0.61×; the stride-2 ones of 64 and 128
/// channels 1.07 / 1.24× and 1.07 / 0.86×.
fn tiled(weight: &[f32], c_out: usize, c_in: usize, g: &ConvGeometry) -> Option<TiledConv> {
    if is_direct(g) {
        return TiledConv::pointwise(weight, c_out, c_in);
    }
    let patches = Patches {
        c_in,
        kernel: g.kernel,
        stride: g.stride,
        dilation: g.dilation,
        pads: (g.pads[0], g.pads[1]),
    };
    let depth = c_in * g.kernel.0 * g.kernel.1;
    let shifted_stride_1 = g.stride == (1, 1) && shifted_windows(&patches, c_out);
    if depth > TILED_IM2COL_DEPTH && !shifted_stride_1 {
        return None;
    }
    TiledConv::patches(weight, c_out, patches)
}

/// Whether the layer's GEMM input is the image itself (1×1, stride 1, no padding).
fn is_direct(g: &ConvGeometry) -> bool {
    g.kernel == (1, 1) && g.stride == (1, 1) && g.pads == [0; 4]
}

/// Whether the layer is depthwise (one input and one output channel per group).
pub fn is_depthwise(g: &ConvGeometry, c_in: usize, c_out: usize) -> bool {
    g.group > 1 && g.group == c_in && c_out == c_in
}

/// Input rows up to which a dense layer multiplies by the unpacked weight.
const FEW_ROWS: usize = 4;

/// `y = x · Wᵀ + bias` for `x` `[n, k]` and `W` `[m, k]` (ONNX Gemm with
/// `transB = 1`, or `W` given as `[k, m]` with `transB = 0`).
pub struct Dense {
    packed: rten_gemm::PackedBMatrix<f32>,
    /// The weight as a row-major `[k, m]` matrix, for few input rows (the
    /// GEMM's vector path is faster than a packed tile mostly left empty).
    plain: Vec<f32>,
    k: usize,
    m: usize,
    bias: Option<Vec<f32>>,
}

impl Dense {
    /// `weight` is `[m, k]` when `trans_b`, else `[k, m]`.
    pub fn new(weight: &[f32], k: usize, m: usize, trans_b: bool, bias: Option<Vec<f32>>) -> Dense {
        let plain: Vec<f32> = if trans_b {
            let mut t = vec![0f32; k * m];
            for j in 0..m {
                for i in 0..k {
                    t[i * m + j] = weight[j * k + i];
                }
            }
            t
        } else {
            weight.to_vec()
        };
        let packed = with_gemm(|e| e.prepack_b(NdTensorView::from_data([k, m], plain.as_slice())));
        Dense {
            packed,
            plain,
            k,
            m,
            bias,
        }
    }

    /// Whether a bias is added.
    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// Adds `bias` (one value per output) to every row from now on.
    pub fn set_bias(&mut self, bias: Vec<f32>) {
        self.bias = Some(bias);
    }

    /// Inner and output sizes.
    pub fn sizes(&self) -> (usize, usize) {
        (self.k, self.m)
    }

    /// Runs on `n` rows of `k` values.
    pub fn run(&self, x: &[f32], n: usize) -> Vec<f32> {
        let fill = |out: &mut [MaybeUninit<f32>]| {
            with_gemm(|e| {
                e.gemm_uninit(
                    out,
                    GemmInputA::Unpacked(NdTensorView::from_data([n, self.k], x)),
                    if n <= FEW_ROWS {
                        GemmInputB::Unpacked(NdTensorView::from_data(
                            [self.k, self.m],
                            self.plain.as_slice(),
                        ))
                    } else {
                        GemmInputB::Packed(&self.packed)
                    },
                    GemmUninitOptions {
                        bias: self.bias.as_deref().map(BiasVector::Row),
                        ..Default::default()
                    },
                )
                .map(|_| ())
                .expect("shapes agree by construction")
            })
        };
        // SAFETY: the GEMM writes all of its `n × m` output.
        unsafe { written_by(n * self.m, fill) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::kernels::test_values as values;

    /// The definition of a grouped convolution, in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        g: &ConvGeometry,
        n: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        x: &[f32],
        wt: &[f32],
        b: &[f32],
    ) -> Vec<f32> {
        let (oh, ow) = super::super::counted_out_hw(g, h, w);
        let (cg, mg) = (c_in / g.group, c_out / g.group);
        let (kh, kw) = g.kernel;
        let mut out = vec![0f32; n * c_out * oh * ow];
        for s in 0..n {
            for co in 0..c_out {
                let gi = co / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = f64::from(b[co]);
                        for ci in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * g.stride.0 + ky * g.dilation.0) as isize
                                        - g.pads[0] as isize;
                                    let ix = (ox * g.stride.1 + kx * g.dilation.1) as isize
                                        - g.pads[1] as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                        continue;
                                    }
                                    let xv = x[((s * c_in + gi * cg + ci) * h + iy as usize) * w
                                        + ix as usize];
                                    let wv = wt[((co * cg + ci) * kh + ky) * kw + kx];
                                    acc += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        out[((s * c_out + co) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_random_shapes() {
        let cases = [
            // (n, c_in, c_out, h, w, kernel, stride, dilation, pads, group)
            (2, 16, 24, 9, 11, (1, 1), (1, 1), (1, 1), [0, 0, 0, 0], 1),
            (1, 3, 32, 17, 17, (3, 3), (2, 2), (1, 1), [1, 1, 1, 1], 1),
            (2, 8, 8, 10, 7, (3, 3), (1, 1), (2, 2), [2, 1, 0, 2], 1),
            (1, 12, 6, 8, 8, (3, 1), (1, 2), (1, 1), [1, 0, 1, 0], 3),
            (3, 8, 8, 12, 12, (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 8),
            (1, 6, 6, 9, 13, (5, 5), (2, 2), (1, 1), [2, 2, 2, 2], 6),
            (1, 40, 10, 5, 5, (1, 1), (2, 2), (1, 1), [0, 0, 0, 0], 1),
            // Wider than one column block (1440 and 2500 outputs per channel).
            (2, 8, 16, 40, 36, (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1),
            // Deeper columns than the tiled kernel takes (576).
            (1, 64, 8, 6, 6, (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1),
            (1, 16, 24, 50, 50, (1, 1), (1, 1), (1, 1), [0, 0, 0, 0], 1),
            // Pointwise with deep columns: output channels in the lanes
            // (`channel_tiles`), two samples.
            (2, 96, 48, 7, 9, (1, 1), (1, 1), (1, 1), [0, 0, 0, 0], 1),
            // And 3×3 on shifted windows, strides 2 and 1, asymmetric pads.
            (2, 16, 32, 9, 11, (3, 3), (2, 2), (1, 1), [1, 1, 1, 1], 1),
            (1, 24, 16, 8, 6, (3, 3), (1, 1), (1, 1), [1, 0, 2, 1], 1),
        ];
        // Both kernels of layers of one group: tiled (with AVX-512) and the
        // general GEMM. Without AVX-512F "tiled" falls back to the GEMM, which
        // would be tested twice: the tiled half is recorded as skipped.
        let kernels: &[bool] = if super::super::avx512_or_record_skip("conv::tiled_cases") {
            &[true, false]
        } else {
            &[false]
        };
        for (i, &(n, c_in, c_out, h, w, kernel, stride, dilation, pads, group)) in
            cases.iter().enumerate()
        {
            let g = ConvGeometry {
                kernel,
                stride,
                dilation,
                pads,
                group,
            };
            let x = values(i as u64, n * c_in * h * w);
            let wt = values(100 + i as u64, c_out * c_in / group * kernel.0 * kernel.1);
            let b = values(200 + i as u64, c_out);
            let want = naive(&g, n, c_in, c_out, h, w, &x, &wt, &b);
            for &tiled in kernels {
                let mut conv =
                    Conv::with_kernels(g.clone(), c_in, c_out, wt.clone(), Some(b.clone()), tiled);
                let (got, _) = conv.run(&x, n, h, w).unwrap();
                assert_eq!(got.len(), want.len());
                for (j, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "case {i} at {j}: {a} vs {e}"
                    );
                }
                conv.activation = Activation::Clamp(0.0, 6.0);
                let (got, _) = conv.run(&x, n, h, w).unwrap();
                for (a, e) in got.iter().zip(&want) {
                    assert!(
                        (a - e.clamp(0.0, 6.0)).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{a} vs {e}"
                    );
                }
                conv.activation = Activation::Silu;
                let (got, _) = conv.run(&x, n, h, w).unwrap();
                for (a, e) in got.iter().zip(&want) {
                    let silu = e / (1.0 + (-e).exp());
                    assert!((a - silu).abs() <= 1e-4 * (1.0 + e.abs()), "{a} vs {silu}");
                }
                // A residual is added after the activation, on every path.
                conv.activation = Activation::Clamp(0.0, 6.0);
                let r = values(300 + i as u64, want.len());
                let (got, _) = conv.run_adding(&x, n, h, w, Some(&r)).unwrap();
                for ((a, e), r) in got.iter().zip(&want).zip(&r) {
                    let e = e.clamp(0.0, 6.0) + r;
                    assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "{a} vs {e}");
                }
            }
        }
    }

    #[test]
    fn dense_matches_the_definition() {
        let (n, k, m) = (5, 37, 11);
        let x = values(1, n * k);
        let w = values(2, m * k);
        let b = values(3, m);
        for trans_b in [true, false] {
            // With transB = 0 the same numbers are read as [k, m].
            let d = Dense::new(&w, k, m, trans_b, Some(b.clone()));
            let y = d.run(&x, n);
            for i in 0..n {
                for j in 0..m {
                    let mut acc = f64::from(b[j]);
                    for t in 0..k {
                        let wv = if trans_b { w[j * k + t] } else { w[t * m + j] };
                        acc += f64::from(x[i * k + t]) * f64::from(wv);
                    }
                    assert!(
                        (y[i * m + j] as f64 - acc).abs() < 1e-4,
                        "{trans_b} {i} {j}"
                    );
                }
            }
        }
    }
}
