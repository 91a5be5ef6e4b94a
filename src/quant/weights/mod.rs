//! Weight quantization: ARQ scales (symmetric, per tensor or per output
//! channel), int8 weights and int32 biases; NUQ's reduced level sets.

pub mod adaround;
mod arq;
mod nuq;

pub use arq::{
    ChannelLayout, WeightError, arq_scales, dequantize_weight, quantize_bias, quantize_weight,
};
pub use nuq::{
    InputMap, InputMoments, NuqResult, NuqSettings, NuqSummary, entropy_bits, nuq_quantize,
};
