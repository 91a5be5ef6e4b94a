//! Training pieces for quantization-aware training: the fake-quant
//! operators with the gradients QAT needs ([`fake_quant`]) and the depthwise
//! convolution kernels with both gradients ([`depthwise`]), and the
//! optimizers ([`optim`]). The differentiable
//! execution of a whole graph comes next; `docs/training.md` records the
//! engine measurements behind its design.

pub mod checkpoint;
pub mod depthwise;
pub mod fake_quant;
pub mod graph;
mod ops_conv;
mod ops_layout;
mod ops_pool;
pub mod optim;
pub mod qat;
