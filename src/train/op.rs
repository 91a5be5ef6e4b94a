//! The operators the training graph runs, with their attributes read once
//! when the graph is built (`graph.rs`), for the forward and backward
//! kernels of `sim::kernels::conv_grad`, `ops_pool.rs` and `graph.rs`.

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
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
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
