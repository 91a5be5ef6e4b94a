//! Convolutions for training, beside the inference kernels they share: the
//! forward pass on `conv` (every group count), the gradients by GEMM for
//! dense convolutions (sample by sample; im2col only for non-pointwise
//! layers) and by `depthwise::grad` for depthwise ones, and ConvTranspose as
//! the input gradient of its dual convolution.

use super::conv::{Conv, ConvGeometry};
use super::depthwise::grad::{self as depthwise, Depthwise};
use ndarray::{Array2, ArrayD, Axis, IxDyn};

/// The geometry of one convolution call over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub m: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Groups (1, or the channel count for depthwise).
    pub group: usize,
    /// Strides (height, width).
    pub strides: (usize, usize),
    /// Dilations (height, width).
    pub dilations: (usize, usize),
    /// Padding: top, left, bottom, right.
    pub pads: (usize, usize, usize, usize),
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

/// The geometry of convolving `x` `[n, c, h, w]` with `w` `[m, c/group,
/// kh, kw]`; an error for shapes that do not fit or groups other than 1
/// and depthwise.
pub fn conv_geometry(
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    group: usize,
    strides: (usize, usize),
    dilations: (usize, usize),
    pads: (usize, usize, usize, usize),
) -> Result<ConvGeom, String> {
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 || ws.len() != 4 {
        return Err(format!(
            "input {xs:?} and weight {ws:?}: only 2-D convolutions train"
        ));
    }
    let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (m, cg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    if cg * group != c || m % group != 0 || strides.0 == 0 || strides.1 == 0 {
        return Err(format!(
            "weight {ws:?} with group {group} does not fit input {xs:?}"
        ));
    }
    if group != 1 && !(group == c && m == c) {
        return Err(format!(
            "grouped convolution with {group} groups: only dense and depthwise convolutions train"
        ));
    }
    let span_h = dilations.0 * (kh - 1) + 1;
    let span_w = dilations.1 * (kw - 1) + 1;
    let (ph, pw) = (h + pads.0 + pads.2, wd + pads.1 + pads.3);
    if ph < span_h || pw < span_w {
        return Err("the kernel is larger than the padded input".into());
    }
    Ok(ConvGeom {
        n,
        c,
        h,
        w: wd,
        m,
        kh,
        kw,
        group,
        strides,
        dilations,
        pads,
        oh: (ph - span_h) / strides.0 + 1,
        ow: (pw - span_w) / strides.1 + 1,
    })
}

impl ConvGeom {
    /// The depthwise kernels' geometry of this (depthwise) convolution.
    pub fn depthwise(&self) -> Depthwise {
        Depthwise {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            kh: self.kh,
            kw: self.kw,
            stride: self.strides,
            dilation: self.dilations,
            pads: self.pads,
        }
    }

    /// For output position (r, col) and tap (i, j), the input position if inside.
    pub fn source(&self, r: usize, col: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let ih = (r * self.strides.0 + i * self.dilations.0).checked_sub(self.pads.0)?;
        let iw = (col * self.strides.1 + j * self.dilations.1).checked_sub(self.pads.1)?;
        (ih < self.h && iw < self.w).then_some((ih, iw))
    }
}

/// `[c·kh·kw, n·oh·ow]` columns of a dense convolution.
/// `[c·kh·kw, n·oh·ow]` columns of a dense convolution's input.
pub fn im2col(g: &ConvGeom, x: &[f32]) -> Array2<f32> {
    let cols = g.n * g.oh * g.ow;
    let mut out = Array2::<f32>::zeros((g.c * g.kh * g.kw, cols));
    for (row, mut line) in out.outer_iter_mut().enumerate() {
        let (ci, i, j) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
        for b in 0..g.n {
            for r in 0..g.oh {
                for col in 0..g.ow {
                    if let Some((ih, iw)) = g.source(r, col, i, j) {
                        line[(b * g.oh + r) * g.ow + col] =
                            x[((b * g.c + ci) * g.h + ih) * g.w + iw];
                    }
                }
            }
        }
    }
    out
}

/// The input-shaped sum of columns (the adjoint of [`im2col`]).
pub fn col2im(g: &ConvGeom, cols: &Array2<f32>) -> Vec<f32> {
    let mut x = vec![0f32; g.n * g.c * g.h * g.w];
    for (row, line) in cols.outer_iter().enumerate() {
        let (ci, i, j) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
        for b in 0..g.n {
            for r in 0..g.oh {
                for col in 0..g.ow {
                    if let Some((ih, iw)) = g.source(r, col, i, j) {
                        x[((b * g.c + ci) * g.h + ih) * g.w + iw] +=
                            line[(b * g.oh + r) * g.ow + col];
                    }
                }
            }
        }
    }
    x
}

/// NCHW `[n, m, oh, ow]` as `[m, n·oh·ow]`.
pub fn from_nchw(g: &ConvGeom, y: &ArrayD<f32>) -> Array2<f32> {
    let plane = g.oh * g.ow;
    let ys: Vec<f32> = y.iter().copied().collect();
    Array2::from_shape_fn((g.m, g.n * plane), |(mi, k)| {
        let (b, p) = (k / plane, k % plane);
        ys[(b * g.m + mi) * plane + p]
    })
}

/// The values of `a` in row-major order, borrowed when already so laid out.
pub fn contiguous(a: &ArrayD<f32>) -> std::borrow::Cow<'_, [f32]> {
    match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().copied().collect()),
    }
}

/// The forward pass on the inference engine's convolution kernels
/// (`sim::kernels::conv`), packed from the current weights.
pub fn conv_forward(
    g: &ConvGeom,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    bias: Option<&[f32]>,
) -> ArrayD<f32> {
    let geometry = ConvGeometry {
        kernel: (g.kh, g.kw),
        stride: g.strides,
        dilation: g.dilations,
        pads: [g.pads.0, g.pads.1, g.pads.2, g.pads.3],
        group: g.group,
    };
    let conv = Conv::new(
        geometry,
        g.c,
        g.m,
        contiguous(w).into_owned(),
        bias.map(|b| (0..g.m).map(|i| b.get(i).copied().unwrap_or(0.0)).collect()),
    );
    let y = conv
        .run_adding(&contiguous(x), g.n, g.h, g.w, None)
        .map(|(y, _)| y)
        .unwrap_or_default();
    ArrayD::from_shape_vec(IxDyn(&[g.n, g.m, g.oh, g.ow]), y).unwrap_or_default()
}

/// The gradients of the input, the weight and the bias for output gradient `gy`.
pub fn conv_backward(
    g: &ConvGeom,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    gy: &ArrayD<f32>,
) -> (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) {
    let shape_x = IxDyn(&[g.n, g.c, g.h, g.w]);
    if g.group > 1 {
        let d = g.depthwise();
        let (xs, ws, gys) = (contiguous(x), contiguous(w), contiguous(gy));
        let mut gx = vec![0f32; xs.len()];
        depthwise::grad_input(&d, &gys, &ws, &mut gx);
        let (mut gw, mut gb) = (vec![0f32; ws.len()], vec![0f32; g.c]);
        depthwise::grad_weight(&d, &xs, &gys, &mut gw, &mut gb);
        return (
            ArrayD::from_shape_vec(shape_x, gx).unwrap_or_default(),
            ArrayD::from_shape_vec(w.raw_dim(), gw).unwrap_or_default(),
            ArrayD::from_shape_vec(IxDyn(&[g.c]), gb).unwrap_or_default(),
        );
    }
    // Sample by sample, each output gradient [m, plane] is already a matrix
    // (NCHW); a pointwise layer's columns are its input itself.
    let (xs, gys, ws) = (contiguous(x), contiguous(gy), contiguous(w));
    let wm = ndarray::ArrayView2::from_shape((g.m, g.c * g.kh * g.kw), &ws[..])
        .expect("weight of its shape");
    let plane_in = g.c * g.h * g.w;
    let plane_out = g.oh * g.ow;
    let pointwise = g.kh == 1 && g.kw == 1 && g.strides == (1, 1) && g.pads == (0, 0, 0, 0);
    let mut gw = Array2::<f32>::zeros((g.m, g.c * g.kh * g.kw));
    let mut gx = vec![0f32; g.n * plane_in];
    let mut gb = ndarray::Array1::<f32>::zeros(g.m);
    let one = ConvGeom { n: 1, ..*g };
    for (b, gx_b) in gx.chunks_mut(plane_in).enumerate() {
        let x_b = &xs[b * plane_in..(b + 1) * plane_in];
        let gy_b = ndarray::ArrayView2::from_shape(
            (g.m, plane_out),
            &gys[b * g.m * plane_out..(b + 1) * g.m * plane_out],
        )
        .expect("output gradient of the output's shape");
        gb += &gy_b.sum_axis(Axis(1));
        if pointwise {
            let x_m =
                ndarray::ArrayView2::from_shape((g.c, plane_out), x_b).expect("input of its shape");
            ndarray::linalg::general_mat_mul(1.0, &gy_b, &x_m.t(), 1.0, &mut gw);
            let mut gx_m = ndarray::ArrayViewMut2::from_shape((g.c, plane_out), gx_b)
                .expect("input of its shape");
            ndarray::linalg::general_mat_mul(1.0, &wm.t(), &gy_b, 0.0, &mut gx_m);
        } else {
            let cols = im2col(&one, x_b);
            ndarray::linalg::general_mat_mul(1.0, &gy_b, &cols.t(), 1.0, &mut gw);
            let gcols = wm.t().dot(&gy_b);
            gx_b.copy_from_slice(&col2im(&one, &gcols));
        }
    }
    (
        ArrayD::from_shape_vec(shape_x, gx).unwrap_or_default(),
        gw.into_shape_with_order(w.raw_dim()).unwrap_or_default(),
        gb.into_dyn(),
    )
}

/// A 2-D ConvTranspose's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransposedWindow {
    /// Strides (height, width).
    pub strides: (usize, usize),
    /// Dilations (height, width).
    pub dilations: (usize, usize),
    /// Padding: top, left, bottom, right.
    pub pads: (usize, usize, usize, usize),
    /// Extra rows and columns at the output's end.
    pub output_padding: (usize, usize),
}

/// The convolution whose input gradient a ConvTranspose computes: input
/// channels = the ConvTranspose's outputs (its weight `[Cin, Cout, kh, kw]`
/// read as a convolution weight `[m = Cin, c = Cout, kh, kw]`), input plane =
/// the ConvTranspose's output plane, output plane = its input plane.
pub fn transposed_geometry(
    window: &TransposedWindow,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
) -> Result<ConvGeom, String> {
    let TransposedWindow {
        strides,
        dilations,
        pads,
        output_padding,
    } = window;
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 || ws.len() != 4 || ws[0] != xs[1] || xs[2] == 0 || xs[3] == 0 {
        return Err(format!("input {xs:?} and weight {ws:?}: only 2-D, group 1"));
    }
    let size = |i: usize, s: usize, d: usize, k: usize, p0: usize, p1: usize, op: usize| {
        ((i - 1) * s + d * (k - 1) + 1 + op).checked_sub(p0 + p1)
    };
    let (h, wd) = (
        size(
            xs[2],
            strides.0,
            dilations.0,
            ws[2],
            pads.0,
            pads.2,
            output_padding.0,
        ),
        size(
            xs[3],
            strides.1,
            dilations.1,
            ws[3],
            pads.1,
            pads.3,
            output_padding.1,
        ),
    );
    let (Some(h), Some(wd)) = (h, wd) else {
        return Err("the pads are larger than the output".into());
    };
    Ok(ConvGeom {
        n: xs[0],
        c: ws[1],
        h,
        w: wd,
        m: ws[0],
        kh: ws[2],
        kw: ws[3],
        group: 1,
        strides: *strides,
        dilations: *dilations,
        pads: *pads,
        oh: xs[2],
        ow: xs[3],
    })
}

/// The input gradient of the dense convolution `g` for output gradient `gy`.
pub fn conv_input_grad(g: &ConvGeom, w: &ArrayD<f32>, gy: &ArrayD<f32>) -> ArrayD<f32> {
    let gym = from_nchw(g, gy);
    let wm = Array2::from_shape_vec((g.m, g.c * g.kh * g.kw), contiguous(w).into_owned())
        .unwrap_or_default();
    let gcols = wm.t().dot(&gym);
    ArrayD::from_shape_vec(IxDyn(&[g.n, g.c, g.h, g.w]), col2im(g, &gcols)).unwrap_or_default()
}
