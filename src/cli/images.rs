//! The image-folder arguments shared by `calibrate`, `auto`, `compare` and
//! `qat`: `--images DIR` and the preprocessing flags.

use super::Failure;
use super::exit::usage;
use crate::data::{ImageSource, Preprocess};
use std::path::{Path, PathBuf};

/// Where image data comes from and how it is preprocessed.
#[derive(Debug, Default, clap::Args)]
pub struct ImageArgs {
    /// A folder of JPEG / PNG images (sorted by path, subfolders included)
    /// as the data of a one-input model, instead of --data.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Resize images so their short side is N pixels (bilinear; default:
    /// the crop's size).
    #[arg(long, value_name = "N")]
    pub resize: Option<u32>,
    /// Crop N×N (or H,W) from the centre (default: the model input's height and width).
    #[arg(long, value_name = "N|H,W")]
    pub center_crop: Option<String>,
    /// Per-channel mean subtracted from pixels scaled to [0, 1], in the
    /// model's channel order, e.g. 0.485,0.456,0.406 (default: none).
    #[arg(long, value_name = "A,B,C")]
    pub mean: Option<String>,
    /// Per-channel standard deviation the result is divided by, e.g.
    /// 0.229,0.224,0.225 (default: none).
    #[arg(long, value_name = "A,B,C")]
    pub std: Option<String>,
    /// Feed channels in blue, green, red order (default: RGB).
    #[arg(long)]
    pub bgr: bool,
    /// Feed [N, H, W, C] (default: NCHW, unless the model input's last axis is the channels).
    #[arg(long)]
    pub nhwc: bool,
    /// Report and leave out files that are not readable images, instead of failing.
    #[arg(long)]
    pub skip_bad_images: bool,
}

fn floats(flag: &str, text: &str) -> Result<Vec<f32>, Failure> {
    text.split(',')
        .map(|v| {
            v.trim().parse::<f32>().map_err(|_| {
                usage(format!(
                    "--{flag} '{text}': '{v}' is not a number; give values separated by ','"
                ))
            })
        })
        .collect()
}

impl ImageArgs {
    /// The preprocessing these flags ask for.
    pub fn preprocess(&self) -> Result<Preprocess, Failure> {
        let center_crop = match &self.center_crop {
            None => None,
            Some(text) => {
                let sizes: Vec<u32> = text
                    .split(',')
                    .map(|v| v.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        usage(format!(
                            "--center-crop '{text}' must be N or H,W (whole numbers)"
                        ))
                    })?;
                match sizes.as_slice() {
                    [n] => Some((*n, *n)),
                    [h, w] => Some((*h, *w)),
                    _ => {
                        return Err(usage(format!("--center-crop '{text}' must be N or H,W")));
                    }
                }
            }
        };
        Ok(Preprocess {
            resize: self.resize,
            center_crop,
            mean: self
                .mean
                .as_deref()
                .map(|t| floats("mean", t))
                .transpose()?,
            std: self.std.as_deref().map(|t| floats("std", t)).transpose()?,
            bgr: self.bgr,
            nhwc: self.nhwc,
        })
    }

    /// The folder `dir` read with these flags.
    pub fn source(&self, dir: &Path) -> Result<ImageSource, Failure> {
        Ok(ImageSource {
            dir: dir.to_path_buf(),
            prep: self.preprocess()?,
            skip_bad: self.skip_bad_images,
        })
    }
}
