//! Calibration from a folder of images: PNG files written here give the
//! same factors as the same pixels normalised by hand into a `.npy`;
//! preprocessing defaults come from the model input; bad files are named
//! (or skipped on request); resizing keeps the short side's size.

mod common;

use ascend_quant::data::{Dataset, ImageSource, Preprocess, write_npy};
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::save_model;
use ascend_quant::pipeline::inputs::DataSource;
use ascend_quant::pipeline::{Backend, CalibrateOptions};
use ascend_quant::tensor::Tensor;
use ascend_quant::{Progress, calibrate};
use common::model_x_to_y;
use ndarray::{ArrayD, IxDyn};
use std::path::{Path, PathBuf};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Reproducible bytes (pixels).
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    common::signed_values(seed, n)
        .into_iter()
        .map(|v| ((v + 1.0) * 127.5) as u8)
        .collect()
}

/// A conv model reading `[1, 3, 8, 8]`.
fn model(dir: &Path) -> PathBuf {
    let w = ArrayD::from_shape_vec(
        IxDyn(&[4, 3, 3, 3]),
        (0..108)
            .map(|i| ((i * 37) % 19) as f32 / 19.0 - 0.5)
            .collect(),
    )
    .unwrap();
    let m = model_x_to_y(
        vec![node("Conv", "conv", &["x", "w"], &["y"], vec![])],
        vec![("w", w)],
        &[1, 3, 8, 8],
        &[1, 4, 6, 6],
    );
    let path = dir.join("m.onnx");
    save_model(&m, &path).unwrap();
    path
}

/// Writes `count` random 8×8 RGB PNG files under `dir` (one in a
/// subfolder), returns their pixels in path order.
fn write_pngs(dir: &Path, count: usize) -> Vec<Vec<u8>> {
    let mut named: Vec<(PathBuf, Vec<u8>)> = (0..count)
        .map(|i| {
            let sub = if i == 2 { "sub/" } else { "" };
            let path = dir.join(format!("{sub}img{i:02}.png"));
            (path, bytes(i as u64 + 1, 8 * 8 * 3))
        })
        .collect();
    for (path, px) in &named {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_raw(8, 8, px.clone())
            .unwrap()
            .save(path)
            .unwrap();
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, px)| px).collect()
}

/// The images as the model input, by the definition: NCHW, RGB,
/// `(pixel / 255 − mean) / std`.
fn normalised(pixels: &[Vec<u8>]) -> ArrayD<f32> {
    let mut out = ArrayD::<f32>::zeros(IxDyn(&[pixels.len(), 3, 8, 8]));
    for (n, px) in pixels.iter().enumerate() {
        for y in 0..8 {
            for x in 0..8 {
                for c in 0..3 {
                    let p = f32::from(px[(y * 8 + x) * 3 + c]);
                    out[[n, c, y, x]] = (p / 255.0 - MEAN[c]) / STD[c];
                }
            }
        }
    }
    out
}

fn imagenet_prep() -> Preprocess {
    Preprocess {
        mean: Some(MEAN.to_vec()),
        std: Some(STD.to_vec()),
        ..Default::default()
    }
}

#[test]
fn png_folders_give_the_factors_of_the_same_pixels_normalised_in_an_npy() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let images = dir.path().join("images");
    let pixels = write_pngs(&images, 6);
    // A hidden file is not an image of the set.
    std::fs::write(images.join(".DS_Store"), b"junk").unwrap();
    let want = normalised(&pixels);
    let npy = dir.path().join("x.npy");
    write_npy(&npy, &Tensor::F32(want.clone())).unwrap();
    // The decoded input equals the definition bit for bit.
    let dims = [Some(1), Some(3), Some(8), Some(8)];
    let data =
        Dataset::from_images(&images, &imagenet_prep(), false, &["x".into()], Some(&dims)).unwrap();
    assert_eq!(data.samples(), 6);
    let Tensor::F32(got) = data.batch(6, 0).unwrap().remove(0).1 else {
        panic!("float data")
    };
    assert_eq!(got.shape(), want.shape());
    assert!(
        got.iter()
            .zip(want.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let run = |data: DataSource, prefix: &str| {
        let mut opts = CalibrateOptions::new(model.clone(), Vec::new(), dir.path().join(prefix));
        opts.data = data;
        opts.batch_size = Some(2);
        opts.backend = Backend::Cpu;
        calibrate(&opts, Progress::silent()).unwrap();
        std::fs::read_to_string(dir.path().join(format!("{prefix}_record.txt"))).unwrap()
    };
    let from_npy = run(DataSource::Files(vec![npy.display().to_string()]), "npy");
    let from_images = run(
        DataSource::Images(ImageSource {
            dir: images.clone(),
            prep: imagenet_prep(),
            skip_bad: false,
        }),
        "png",
    );
    assert!(from_npy.contains("scale_d"), "{from_npy}");
    assert_eq!(from_images, from_npy);
}

#[test]
fn the_model_input_sets_size_and_layout_and_bgr_swaps_channels() {
    let dir = tempfile::tempdir().unwrap();
    let pixels = write_pngs(dir.path(), 2);
    // A channels-last input: NHWC without being told.
    let dims = [Some(1), Some(8), Some(8), Some(3)];
    let prep = Preprocess {
        bgr: true,
        ..Default::default()
    };
    let data = Dataset::from_images(dir.path(), &prep, false, &["x".into()], Some(&dims)).unwrap();
    let Tensor::F32(x) = data.batch(2, 0).unwrap().remove(0).1 else {
        panic!("float data")
    };
    assert_eq!(x.shape(), [2, 8, 8, 3]);
    // Pixel (y 3, x 5) of the first image: BGR order, scaled to [0, 1].
    let px = &pixels[0][(3 * 8 + 5) * 3..(3 * 8 + 5) * 3 + 3];
    for c in 0..3 {
        assert_eq!(x[[0, 3, 5, c]], f32::from(px[2 - c]) / 255.0);
    }
}

#[test]
fn a_bad_file_is_named_or_skipped_on_request() {
    let dir = tempfile::tempdir().unwrap();
    write_pngs(dir.path(), 3);
    let bad = dir.path().join("img01b.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    std::fs::write(dir.path().join("labels.txt"), b"1 2 3").unwrap();
    let dims = [Some(1), Some(3), Some(8), Some(8)];
    let open = |skip| {
        Dataset::from_images(
            dir.path(),
            &Preprocess::default(),
            skip,
            &["x".into()],
            Some(&dims),
        )
    };
    let err = open(false).unwrap_err().to_string();
    assert!(
        err.contains("labels.txt") && err.contains("--skip-bad-images"),
        "{err}"
    );
    let data = open(true).unwrap();
    assert_eq!(
        data.samples(),
        3,
        "the PNG that does not decode and the text file are left out"
    );
    // Without --skip-bad-images a corrupt image is named when it is read.
    std::fs::remove_file(dir.path().join("labels.txt")).unwrap();
    let data = open(false).unwrap();
    let err = data.batch(4, 0).unwrap_err().to_string();
    assert!(err.contains("img01b.png"), "{err}");
}

/// `img` saved alone in `dir` and read back with its short side resized to
/// `resize` and a 4 × 6 centre crop.
fn resized_and_cropped(dir: &Path, img: &image::RgbImage, resize: u32) -> ArrayD<f32> {
    img.save(dir.join("a.png")).unwrap();
    let prep = Preprocess {
        resize: Some(resize),
        center_crop: Some((4, 6)),
        ..Default::default()
    };
    let data = Dataset::from_images(dir, &prep, false, &["x".into()], None).unwrap();
    let Tensor::F32(x) = data.batch(1, 0).unwrap().remove(0).1 else {
        panic!("float data")
    };
    x
}

#[test]
fn resizing_scales_the_short_side_and_crops_the_centre() {
    let dir = tempfile::tempdir().unwrap();
    // 20 × 10, left half one colour and right half another.
    let mut img = image::RgbImage::new(20, 10);
    for (x, _, p) in img.enumerate_pixels_mut() {
        *p = if x < 10 {
            image::Rgb([200, 10, 10])
        } else {
            image::Rgb([10, 10, 200])
        };
    }
    let x = resized_and_cropped(dir.path(), &img, 4);
    // 20 × 10 → 8 × 4 (short side 4), centre 6 wide: columns 1..7 of 8.
    assert_eq!(x.shape(), [1, 3, 4, 6]);
    // Far from the colour edge the values are the flat colours.
    for y in 0..4 {
        assert!((x[[0, 0, y, 0]] - 200.0 / 255.0).abs() < 1e-6);
        assert!((x[[0, 2, y, 5]] - 200.0 / 255.0).abs() < 1e-6);
    }

    // Where the crop starts: every column and row of a 20 × 10 image has
    // its own red and green, and the short side is already 10 (no
    // scaling). A 4 × 6 centre crop is rows 3..7 and columns 7..13, so no
    // other offset passes.
    let mut img = image::RgbImage::new(20, 10);
    for (x, y, p) in img.enumerate_pixels_mut() {
        *p = image::Rgb([10 * x as u8, 20 * y as u8, 0]);
    }
    let x = resized_and_cropped(dir.path(), &img, 10);
    assert_eq!(x.shape(), [1, 3, 4, 6]);
    for row in 0..4 {
        for col in 0..6 {
            let red = x[[0, 0, row, col]] * 255.0;
            let green = x[[0, 1, row, col]] * 255.0;
            assert!(
                (red - (10 * (col + 7)) as f32).abs() < 1e-3,
                "column {col}: {red}"
            );
            assert!(
                (green - (20 * (row + 3)) as f32).abs() < 1e-3,
                "row {row}: {green}"
            );
        }
    }
}

#[test]
fn an_image_whose_header_claims_too_many_pixels_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    // A PNG signature and an IHDR chunk claiming 30000 × 30000 RGB, then nothing.
    // Chunks with their CRC-32 (IEEE, bit by bit): IHDR, then an empty IDAT.
    let chunk = |body: &[u8]| {
        let mut crc = !0u32;
        for &b in body {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        let mut out = ((body.len() - 4) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out.extend_from_slice(&(!crc).to_be_bytes());
        out
    };
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(&ihdr));
    png.extend(chunk(b"IDAT"));
    std::fs::write(dir.path().join("huge.png"), &png).unwrap();
    let dims = [Some(1), Some(3), Some(8), Some(8)];
    let data = Dataset::from_images(
        dir.path(),
        &Preprocess::default(),
        false,
        &["x".into()],
        Some(&dims),
    )
    .unwrap();
    let err = data.batch(1, 0).unwrap_err().to_string();
    assert!(
        err.contains("huge.png") && err.contains("30000×30000"),
        "{err}"
    );
}
