//! Calibration and evaluation data from a folder of JPEG and PNG images,
//! with the preprocessing vision deployment scripts apply: resize the short
//! side (bilinear), centre-crop, scale pixels to [0, 1], subtract a mean
//! and divide by a standard deviation per channel, RGB or BGR order, NCHW or
//! NHWC layout. Images are decoded batch by batch, never all at once.

use super::npy::DataError;
use crate::tensor::Tensor;
use image::imageops::FilterType;
use image::{DynamicImage, ImageReader};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// The most memory one decoded image may take (about 89 megapixels of
/// RGB): checked from the file's header before decoding, so a huge or
/// lying header costs nothing.
const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// A folder of images to read, and how.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageSource {
    /// The folder (searched recursively).
    pub dir: PathBuf,
    /// The preprocessing.
    pub prep: Preprocess,
    /// Report and leave out files that are not readable images instead of failing.
    pub skip_bad: bool,
}

/// How images become model input. `None` fields take their defaults from
/// the model input's shape (see [`Preprocess::resolve`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Preprocess {
    /// Resize so the short side has this many pixels (bilinear).
    pub resize: Option<u32>,
    /// Crop this height and width from the centre.
    pub center_crop: Option<(u32, u32)>,
    /// Per-channel mean subtracted from pixels scaled to [0, 1].
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation the result is divided by.
    pub std: Option<Vec<f32>>,
    /// Channels in blue, green, red order.
    pub bgr: bool,
    /// Layout `[N, H, W, C]` instead of `[N, C, H, W]`.
    pub nhwc: bool,
}

/// The preprocessing with every size and layout decided.
#[derive(Clone, Debug, PartialEq)]
struct Resolved {
    resize: Option<u32>,
    crop: (u32, u32),
    channels: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    bgr: bool,
    nhwc: bool,
}

impl Preprocess {
    /// Fills what the user left out from the model input's shape `dims`
    /// (`None` for a dimension that is not fixed): a `[N, 3, 224, 224]`
    /// input means NCHW, 3 channels, a 224 × 224 crop; `[N, 224, 224, 3]`
    /// means NHWC. Without `--resize` the short side is resized to the
    /// crop's larger side (nothing when the image already has it).
    fn resolve(&self, dims: Option<&[Option<usize>]>, dir: &Path) -> Result<Resolved, DataError> {
        let fail = |reason: String| DataError::Format {
            path: dir.to_path_buf(),
            reason,
        };
        let dims = dims.filter(|d| d.len() == 4);
        let channel_last =
            |d: &[Option<usize>]| matches!(d[3], Some(1 | 3)) && !matches!(d[1], Some(1 | 3));
        let nhwc = self.nhwc || dims.is_some_and(channel_last);
        let (c_axis, h_axis, w_axis) = if nhwc { (3, 1, 2) } else { (1, 2, 3) };
        let from_model = |axis: usize| dims.and_then(|d| d[axis]);
        let channels = from_model(c_axis).unwrap_or(3);
        if channels != 1 && channels != 3 {
            return Err(fail(format!(
                "the model input has {channels} channels on axis {c_axis}; images give 1 (grey) or 3 (colour); pass --nhwc if the channels are last"
            )));
        }
        let crop = match (self.center_crop, from_model(h_axis), from_model(w_axis)) {
            (Some(c), _, _) => c,
            (None, Some(h), Some(w)) => (h as u32, w as u32),
            _ => {
                return Err(fail(
                    "the model input's height and width are not fixed; give --center-crop N (and --resize N)".into(),
                ));
            }
        };
        let per_channel = |v: &Option<Vec<f32>>, what: &str, default: f32| match v {
            None => Ok(vec![default; channels]),
            Some(v) if v.len() == channels => Ok(v.clone()),
            Some(v) if v.len() == 1 => Ok(vec![v[0]; channels]),
            Some(v) => Err(fail(format!(
                "--{what} has {} values but the images have {channels} channels",
                v.len()
            ))),
        };
        let mean = per_channel(&self.mean, "mean", 0.0)?;
        let std = per_channel(&self.std, "std", 1.0)?;
        if let Some(bad) = std.iter().find(|s| !(s.is_finite() && **s != 0.0)) {
            return Err(fail(format!(
                "--std {bad} cannot divide; give non-zero values"
            )));
        }
        if crop.0 == 0 || crop.1 == 0 || self.resize == Some(0) {
            return Err(fail("--resize and --center-crop must be at least 1".into()));
        }
        Ok(Resolved {
            resize: self.resize,
            crop,
            channels,
            mean,
            std,
            bgr: self.bgr,
            nhwc,
        })
    }
}

/// A folder of images read as one model input.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    dir: PathBuf,
    files: Vec<PathBuf>,
    prep: Resolved,
}

/// Whether a file name looks like an image we decode.
fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// Every regular file under `dir`, recursively, hidden ones left out,
/// sorted by path.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |path: &Path, error| DataError::Io {
        path: path.to_path_buf(),
        action: "read",
        error,
    };
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| io(&d, e))? {
            let entry = entry.map_err(|e| io(&d, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ty = entry.file_type().map_err(|e| io(&path, e))?;
            if ty.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl ImageFolder {
    /// The images under `dir` (recursively, sorted by path) for a model
    /// input of shape `dims`. A file that is not a JPEG or PNG image is an
    /// error naming it; with `skip_bad`, it and any image that does not
    /// decode are reported on stderr and left out (every image is decoded
    /// once here to find them).
    pub fn open(
        dir: &Path,
        prep: &Preprocess,
        dims: Option<&[Option<usize>]>,
        skip_bad: bool,
    ) -> Result<ImageFolder, DataError> {
        let prep = prep.resolve(dims, dir)?;
        let all = list_files(dir)?;
        let mut files = Vec::with_capacity(all.len());
        for f in all {
            let problem = if !is_image_name(&f) {
                Some("not a .jpg, .jpeg or .png file".to_string())
            } else if skip_bad {
                decode(&f).err()
            } else {
                None
            };
            match problem {
                None => files.push(f),
                Some(why) if skip_bad => eprintln!("skipped {}: {why}", f.display()),
                Some(why) => {
                    return Err(DataError::Format {
                        path: f,
                        reason: format!(
                            "{why}; remove it from the folder, or pass --skip-bad-images"
                        ),
                    });
                }
            }
        }
        if files.is_empty() {
            return Err(DataError::Format {
                path: dir.to_path_buf(),
                reason: "no JPEG or PNG images in this folder (or its subfolders)".into(),
            });
        }
        Ok(ImageFolder {
            dir: dir.to_path_buf(),
            files,
            prep,
        })
    }

    /// The shape of all samples: `[images, C, H, W]` or `[images, H, W, C]`.
    pub fn shape(&self) -> Vec<usize> {
        let (h, w) = (self.prep.crop.0 as usize, self.prep.crop.1 as usize);
        let c = self.prep.channels;
        if self.prep.nhwc {
            vec![self.files.len(), h, w, c]
        } else {
            vec![self.files.len(), c, h, w]
        }
    }

    /// Images `range`, decoded and preprocessed (in parallel).
    pub fn read(&self, range: std::ops::Range<usize>) -> Result<Tensor, DataError> {
        let files = self
            .files
            .get(range.clone())
            .ok_or_else(|| DataError::Format {
                path: self.dir.clone(),
                reason: format!(
                    "images {}..{} asked for, but the folder holds {}",
                    range.start,
                    range.end,
                    self.files.len()
                ),
            })?;
        let samples: Vec<Vec<f32>> = files
            .par_iter()
            .map(|f| {
                let img = decode(f).map_err(|why| DataError::Format {
                    path: f.clone(),
                    reason: format!("{why}; replace or remove it, or pass --skip-bad-images"),
                })?;
                self.prep.apply(img, f)
            })
            .collect::<Result<_, _>>()?;
        let mut shape = self.shape();
        shape[0] = files.len();
        ArrayD::from_shape_vec(IxDyn(&shape), samples.concat())
            .map(Tensor::F32)
            .map_err(|e| DataError::Format {
                path: self.dir.clone(),
                reason: e.to_string(),
            })
    }
}

/// The decoded image, or why it does not decode.
fn decode(path: &Path) -> Result<DynamicImage, String> {
    let open = || -> Result<ImageReader<_>, String> {
        ImageReader::open(path)
            .map_err(|e| e.to_string())?
            .with_guessed_format()
            .map_err(|e| e.to_string())
    };
    // The header's size first: a huge (or lying) one is refused unread.
    if let Ok((w, h)) = open()?.into_dimensions()
        && u64::from(w) * u64::from(h) * 3 > MAX_IMAGE_BYTES
    {
        return Err(format!(
            "{w}×{h} pixels, more than the {} megapixels one image may have here; scale it down first",
            MAX_IMAGE_BYTES / 3 / 1_000_000
        ));
    }
    let mut reader = open()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| format!("not a readable image: {e}"))
}

impl Resolved {
    /// One image as the model's input values.
    fn apply(&self, img: DynamicImage, path: &Path) -> Result<Vec<f32>, DataError> {
        let (ch, cw) = self.crop;
        let target = self.resize.unwrap_or(ch.max(cw));
        let (w, h) = (img.width(), img.height());
        let short = w.min(h);
        let img = if short == target {
            img
        } else {
            // Scale so the short side is `target`, rounding the long side.
            let scale = f64::from(target) / f64::from(short);
            let (nw, nh) = if w <= h {
                (target, ((f64::from(h) * scale).round() as u32).max(1))
            } else {
                (((f64::from(w) * scale).round() as u32).max(1), target)
            };
            img.resize_exact(nw, nh, FilterType::Triangle)
        };
        let (w, h) = (img.width(), img.height());
        if w < cw || h < ch {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "{w}×{h} after resizing, smaller than the {cw}×{ch} crop; give --resize N with N ≥ {}",
                    ch.max(cw)
                ),
            });
        }
        let (left, top) = ((w - cw) / 2, (h - ch) / 2);
        let pixels: Vec<u8> = if self.channels == 1 {
            img.crop_imm(left, top, cw, ch).into_luma8().into_raw()
        } else {
            img.crop_imm(left, top, cw, ch).into_rgb8().into_raw()
        };
        let (hw, c) = ((ch * cw) as usize, self.channels);
        let mut out = vec![0.0f32; hw * c];
        for (p, px) in pixels.chunks_exact(c).enumerate() {
            for k in 0..c {
                // Source channel for output channel k (BGR reverses RGB).
                let src = if self.bgr { c - 1 - k } else { k };
                let v = (f32::from(px[src]) / 255.0 - self.mean[k]) / self.std[k];
                let at = if self.nhwc { p * c + k } else { k * hw + p };
                out[at] = v;
            }
        }
        Ok(out)
    }
}
