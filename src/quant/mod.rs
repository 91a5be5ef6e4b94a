//! Quantization: finding the layers to quantize (and, in later work,
//! calibration, weight quantization and the Ascend output formats).

pub mod config;
pub mod layers;
pub mod observe;
pub mod params;
pub mod weights;
