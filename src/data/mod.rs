//! Input data for runs and calibration: reading and writing `.npy` arrays,
//! and reading folders of images.

pub mod dataset;
pub mod images;
pub mod npy;
pub mod npy_rows;
pub mod texts;

pub use dataset::{Batch, Dataset, read_npz};
pub use images::{ImageFolder, ImageSource, Preprocess};
pub use texts::TextSource;

pub use npy::{DataError, read_labels, read_npy, read_npy_bytes, write_npy};
