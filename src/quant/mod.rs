//! Quantization: finding the layers to quantize, preparing the model,
//! calibration, weight quantization, the record file and the deploy and
//! fake-quant models.

pub mod adaround;
pub mod amct;
pub mod bias_correction;
pub mod calibrate;
pub mod config;
pub mod config_levels;
pub mod dmq;
pub mod dmq_search;
pub mod emit;
pub mod error;
pub mod fp16_quant;
pub mod from_record;
pub mod layer_cosines;
pub mod layers;
pub mod nuq;
pub mod observe;
pub mod params;
pub mod prepare;
pub mod record;
pub mod retrain_config;
pub mod run_settings;
pub mod simple_config;
pub mod tensor_quant;
pub mod text_format;
pub mod value_bounds;
pub mod weights;
