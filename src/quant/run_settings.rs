//! How a calibration run cuts the data and reports progress: the settings
//! every pass that runs the model over the data shares.

/// How to cut the data and report progress.
pub struct RunSettings<'a> {
    /// Samples per batch.
    pub batch_size: usize,
    /// Let the simulator run batch sizes the model does not declare.
    pub dynamic_batch: bool,
    /// Called after each calibration batch with (done, total).
    pub progress: &'a dyn Fn(usize, usize),
    /// Calibration samples on which each layer's float vs fake-quant similarity
    /// is measured (0 skips the measurement).
    pub similarity_samples: usize,
}
