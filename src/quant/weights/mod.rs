//! Weight quantization: ARQ scales (symmetric, per tensor or per output
//! channel), int8 weights and int32 biases.

mod arq;

pub use arq::{
    ChannelLayout, WeightError, arq_scales, dequantize_weight, quantize_bias, quantize_weight,
};
