//! The operators the training graph runs, with their attributes read once
//! when the graph is built (`graph.rs`), for the forward and backward
//! kernels of `sim::kernels::conv_grad`, `ops_pool.rs`, `ops_matmul.rs`,
//! `ops_norm.rs`, `ops_select.rs` and `graph.rs`.

/// One operator of the training graph.
#[derive(Clone, Debug)]
pub(in crate::train) enum Op {
    Conv {
        group: usize,
        strides: (usize, usize),
        dilations: (usize, usize),
        pads: (usize, usize, usize, usize),
    },
    Gemm {
        trans_b: bool,
    },
    Relu,
    Clip {
        lo: f32,
        hi: f32,
    },
    MaxPool {
        kernel: (usize, usize),
        strides: (usize, usize),
        pads: (usize, usize, usize, usize),
    },
    AveragePool {
        kernel: (usize, usize),
        strides: (usize, usize),
    },
    GlobalAveragePool,
    Flatten {
        axis: usize,
    },
    Reshape,
    Add,
    Mul,
    Sigmoid,
    /// A float function of one value (`ops::activation::Unary`).
    Unary(crate::ops::activation::Unary),
    Sub,
    Div,
    /// Power; the gradient flows to the base and, where it is positive, the exponent.
    Pow,
    LayerNorm(super::ops_norm::NormAttrs),
    /// ReduceMean or ReduceSum with constant axes.
    Reduce(crate::ops::reduce::Reduce),
    /// Gather of a float table by integer indices (embeddings).
    Gather {
        axis: i64,
    },
    /// Where(bool condition, x, y).
    Where,
    /// A node the engine's `ops::eval_constant` evaluates (shape arithmetic,
    /// masks, layout of any type): no gradient, except through the first
    /// input of a value-moving operator (`ops_select::moves_values`) and a
    /// float-to-float Cast or Identity.
    Evaluate,
    Concat {
        axis: i64,
    },
    Softmax {
        axis: i64,
    },
    Transpose {
        perm: Option<Vec<usize>>,
    },
    MatMul,
    ConvTranspose {
        strides: (usize, usize),
        dilations: (usize, usize),
        pads: (usize, usize, usize, usize),
        output_padding: (usize, usize),
    },
    Resize {
        /// Output height and width, or scales when `None`.
        sizes: Option<(usize, usize)>,
        scales: (f32, f32),
        coordinates: String,
        nearest: String,
    },
}
