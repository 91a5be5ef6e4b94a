//! Training pieces for quantization-aware training: the fake-quant
//! operators with the gradients QAT needs ([`fake_quant`]). The differentiable
//! execution of a whole graph comes next; `docs/training.md` records the
//! engine measurements behind its design.

pub mod fake_quant;
