//! Kernels the CPU engine owns: convolution on a packed GEMM (`rten-gemm`),
//! a SIMD depthwise convolution, and a dense layer. Each is tested against
//! the operator's definition on random shapes.

pub mod activation;
pub mod conv;
pub mod depthwise;
