//! Quantization-aware training: the differentiable execution of a graph
//! ([`graph`], its operators in `op.rs`, their kernels in `ops_*.rs`, the
//! forward convolutions on the inference engine's kernels), the fake-quant
//! operators with the gradients QAT needs ([`fake_quant`]) and how a layer
//! applies them (`layer_quant.rs`: clips, per-channel weights, DMQ), the depthwise
//! gradients ([`depthwise`]), the optimizers ([`optim`]) and the training
//! loop ([`qat`]); `docs/training.md` records the measurements behind it.

pub mod checkpoint;
pub mod fake_quant;
pub mod graph;
mod layer_quant;
mod op;
mod ops_layout;
mod ops_matmul;
mod ops_norm;
mod ops_pool;
mod ops_select;
pub mod optim;
pub mod qat;
