//! Quantization: finding the layers to quantize (and, in later work,
//! calibration, weight quantization and the Ascend output formats).

pub mod amct;
pub mod calibrate;
pub mod config;
pub mod emit;
pub mod error;
pub mod layers;
pub mod observe;
pub mod params;
pub mod prepare;
pub mod record;
pub mod simple_config;
pub mod weights;
