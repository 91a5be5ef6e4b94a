//! Calibration and evaluation data: named input arrays whose axis 0 counts
//! samples, read from `.npy`, `NAME=FILE.npy`, `.npz`, AMCT-style `.bin`
//! folders or folders of images, and cut into batches.

use super::images::{ImageFolder, Preprocess};
use super::npy::{DataError, read_npy, read_npy_bytes};
use super::npy_rows::NpyRows;
use super::texts::{Corpus, TextColumn, TextField, TextSource};
use crate::tensor::{DType, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One batch: a tensor per model input.
pub type Batch = Vec<(String, Tensor)>;

/// Where one input's samples come from.
#[derive(Clone, Debug)]
enum Column {
    /// Held in memory (arrays given by the caller, `.npz` entries).
    Memory(Tensor),
    /// Read from a `.npy` file batch by batch.
    File(NpyRows),
    /// Decoded from a folder of images batch by batch.
    Images(ImageFolder),
    /// Tokenized from a text file batch by batch.
    Text(TextColumn),
}

impl Column {
    fn shape(&self) -> Vec<usize> {
        match self {
            Column::Memory(t) => t.shape().to_vec(),
            Column::File(f) => f.shape().to_vec(),
            Column::Images(f) => f.shape(),
            Column::Text(t) => t.shape(),
        }
    }

    fn rows(&self, range: std::ops::Range<usize>) -> Result<Tensor, DataError> {
        match self {
            Column::Memory(t) => Ok(t.slice_axis0(range)),
            Column::File(f) => f.read(range),
            Column::Images(f) => f.read(range),
            Column::Text(t) => t.read(range, t.corpus.max_length()),
        }
    }
}

/// One `.bin` file of AMCT's raw layout: a whole batch of one input.
#[derive(Clone, Debug)]
struct BinFile {
    input: String,
    path: PathBuf,
    dtype: String,
    shape: Vec<usize>,
}

/// Input data with the same number of samples on axis 0 for every input,
/// read batch by batch so memory does not grow with the number of samples.
#[derive(Clone, Debug)]
pub struct Dataset {
    inputs: Vec<(String, Column)>,
    samples: usize,
    /// AMCT raw batches (each file is one batch), read when asked for.
    fixed_batches: Option<Vec<Vec<BinFile>>>,
}

fn format_err(path: &Path, reason: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        reason,
    }
}

impl Dataset {
    /// Reads `--data` arguments: `FILE.npy` (single-input model), `NAME=FILE.npy`, or `FILE.npz`.
    pub fn from_specs(specs: &[String], input_names: &[String]) -> Result<Dataset, DataError> {
        let npy = |file: &str| -> Result<Column, DataError> {
            Ok(match NpyRows::open(Path::new(file))? {
                Some(rows) => Column::File(rows),
                None => Column::Memory(read_npy(Path::new(file))?),
            })
        };
        let mut inputs: Vec<(String, Column)> = Vec::new();
        for spec in specs {
            if let Some((name, file)) = spec.split_once('=') {
                inputs.push((name.to_string(), npy(file)?));
            } else if spec.ends_with(".npz") {
                inputs.extend(
                    read_npz(Path::new(spec))?
                        .into_iter()
                        .map(|(n, t)| (n, Column::Memory(t))),
                );
            } else if input_names.len() == 1 {
                inputs.push((input_names[0].clone(), npy(spec)?));
            } else {
                return Err(format_err(
                    Path::new(spec),
                    format!(
                        "the model has {} inputs ({}); give NAME=FILE.npy for each, or one .npz",
                        input_names.len(),
                        input_names.join(", ")
                    ),
                ));
            }
        }
        Self::from_columns(
            inputs,
            input_names,
            specs.first().map(PathBuf::from).unwrap_or_default(),
        )
    }

    /// Reads a folder of images for a model with one input, `input_name`,
    /// of shape `dims` (the defaults of the preprocessing come from it).
    pub fn from_images(
        dir: &Path,
        prep: &Preprocess,
        skip_bad: bool,
        input_names: &[String],
        dims: Option<&[Option<usize>]>,
    ) -> Result<Dataset, DataError> {
        let [name] = input_names else {
            return Err(format_err(
                dir,
                format!(
                    "the model has {} inputs ({}); an image folder feeds a model with one input: give --data NAME=FILE.npy for each instead",
                    input_names.len(),
                    input_names.join(", ")
                ),
            ));
        };
        let folder = ImageFolder::open(dir, prep, dims, skip_bad)?;
        Self::from_columns(
            vec![(name.clone(), Column::Images(folder))],
            input_names,
            dir.to_path_buf(),
        )
    }

    /// Reads a text file of sentences for a model whose inputs (name and
    /// ONNX element type) take token ids, an attention mask or token types
    /// ([`TextField::of_input`]), `max_length` tokens each.
    pub fn from_texts(
        source: &TextSource,
        max_length: usize,
        inputs: &[(String, Option<i32>)],
    ) -> Result<Dataset, DataError> {
        let corpus = std::sync::Arc::new(Corpus::open(source, max_length)?);
        let mut columns = Vec::new();
        for (name, elem_type) in inputs {
            let dtype = match elem_type {
                None | Some(7) => DType::I64,
                Some(6) => DType::I32,
                Some(t) => {
                    return Err(format_err(
                        &source.file,
                        format!(
                            "model input '{name}' is of ONNX type {t}, not int64 or int32: --texts feeds token ids, attention masks and token types; give this model --data"
                        ),
                    ));
                }
            };
            let field = TextField::of_input(name);
            if let Some((other, _)) = columns
                .iter()
                .find(|(_, c): &&(String, Column)| matches!(c, Column::Text(t) if t.field == field))
            {
                return Err(format_err(
                    &source.file,
                    format!(
                        "model inputs '{other}' and '{name}' would both take the {field:?} of the sentences; give this model --data"
                    ),
                ));
            }
            columns.push((
                name.clone(),
                Column::Text(TextColumn {
                    corpus: corpus.clone(),
                    field,
                    dtype,
                }),
            ));
        }
        let names: Vec<String> = inputs.iter().map(|(n, _)| n.clone()).collect();
        Self::from_columns(columns, &names, source.file.clone())
    }

    /// Builds a dataset from named arrays in memory, checking names and sample counts.
    pub fn from_arrays(
        inputs: Vec<(String, Tensor)>,
        input_names: &[String],
        origin: PathBuf,
    ) -> Result<Dataset, DataError> {
        let columns = inputs
            .into_iter()
            .map(|(n, t)| (n, Column::Memory(t)))
            .collect();
        Self::from_columns(columns, input_names, origin)
    }

    fn from_columns(
        inputs: Vec<(String, Column)>,
        input_names: &[String],
        origin: PathBuf,
    ) -> Result<Dataset, DataError> {
        for (name, _) in &inputs {
            if !input_names.contains(name) {
                return Err(format_err(
                    &origin,
                    format!(
                        "'{name}' is not an input of the model; its inputs are: {}",
                        input_names.join(", ")
                    ),
                ));
            }
        }
        if let Some(missing) = input_names
            .iter()
            .find(|n| !inputs.iter().any(|(i, _)| i == *n))
        {
            return Err(format_err(
                &origin,
                format!("no data for model input '{missing}'"),
            ));
        }
        let samples = inputs
            .first()
            .and_then(|(_, t)| t.shape().first().copied())
            .unwrap_or(0);
        for (name, t) in &inputs {
            if t.shape().is_empty() {
                return Err(format_err(
                    &origin,
                    format!("data for '{name}' is a scalar; axis 0 must count samples"),
                ));
            }
            if t.shape()[0] != samples {
                return Err(format_err(
                    &origin,
                    format!(
                        "data for '{name}' has {} samples but another input has {samples}",
                        t.shape()[0]
                    ),
                ));
            }
        }
        if samples == 0 {
            return Err(format_err(
                &origin,
                "the data holds no samples (axis 0 has size 0)".into(),
            ));
        }
        Ok(Dataset {
            inputs,
            samples,
            fixed_batches: None,
        })
    }

    /// Reads AMCT-style raw data: one folder per input (`;`-separated), files
    /// sorted by name, each file one batch of `shape` elements of `dtype`.
    pub fn from_bin_dirs(
        dirs: &str,
        types: &str,
        shapes: &[(String, Vec<usize>)],
    ) -> Result<Dataset, DataError> {
        let dirs: Vec<&str> = dirs.split(';').filter(|s| !s.is_empty()).collect();
        let types: Vec<&str> = types.split(';').filter(|s| !s.is_empty()).collect();
        if dirs.len() != shapes.len() || types.len() != shapes.len() {
            return Err(format_err(
                Path::new(dirs.first().copied().unwrap_or("")),
                format!(
                    "--data-dir gives {} folders, --data-types {} types and --input-shape {} inputs; give one of each per input",
                    dirs.len(),
                    types.len(),
                    shapes.len()
                ),
            ));
        }
        let mut per_input: Vec<Vec<BinFile>> = Vec::new();
        for ((dir, ty), (name, shape)) in dirs.iter().zip(&types).zip(shapes) {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| DataError::Io {
                    path: PathBuf::from(dir),
                    action: "read",
                    error: source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "bin"))
                .collect();
            files.sort();
            per_input.push(
                files
                    .into_iter()
                    .map(|path| BinFile {
                        input: name.clone(),
                        path,
                        dtype: ty.to_string(),
                        shape: shape.clone(),
                    })
                    .collect(),
            );
        }
        let n = per_input.iter().map(Vec::len).min().unwrap_or(0);
        if n == 0 {
            return Err(format_err(Path::new(dirs[0]), "no .bin files found".into()));
        }
        let fixed: Vec<Vec<BinFile>> = (0..n)
            .map(|b| per_input.iter().map(|v| v[b].clone()).collect())
            .collect();
        let samples = n * shapes[0].1.first().copied().unwrap_or(1);
        Ok(Dataset {
            inputs: Vec::new(),
            samples,
            fixed_batches: Some(fixed),
        })
    }

    /// Number of samples.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Whether the batches are fixed by the files (`.bin` folders) rather
    /// than cut from samples.
    pub fn has_fixed_batches(&self) -> bool {
        self.fixed_batches.is_some()
    }

    /// Number of batches of `batch_size` samples (the last may be short);
    /// for fixed batches (`.bin` folders), the number of batch files.
    pub fn batch_count(&self, batch_size: usize) -> usize {
        match &self.fixed_batches {
            Some(f) => f.len(),
            None => self.samples.div_ceil(batch_size.max(1)),
        }
    }

    /// Batch `index` of `batch_size` samples, read now.
    pub fn batch(&self, batch_size: usize, index: usize) -> Result<Batch, DataError> {
        if let Some(f) = &self.fixed_batches {
            let files = f.get(index).ok_or_else(|| {
                format_err(
                    Path::new("--data-dir"),
                    format!(
                        "batch {index} asked for, but the folders hold {} batches",
                        f.len()
                    ),
                )
            })?;
            return files
                .iter()
                .map(|b| {
                    let bytes = std::fs::read(&b.path).map_err(|source| DataError::Io {
                        path: b.path.clone(),
                        action: "read",
                        error: source,
                    })?;
                    Ok((
                        b.input.clone(),
                        decode_bin(&b.path, &bytes, &b.dtype, &b.shape)?,
                    ))
                })
                .collect();
        }
        let bs = batch_size.max(1);
        let r = index * bs..((index + 1) * bs).min(self.samples);
        self.inputs
            .iter()
            .map(|(n, c)| Ok((n.clone(), c.rows(r.clone())?)))
            .collect()
    }
}

impl Dataset {
    /// Whether the samples are sentences (`--texts`).
    pub fn is_text(&self) -> bool {
        self.inputs
            .iter()
            .any(|(_, c)| matches!(c, Column::Text(_)))
    }

    /// [`Dataset::batch`], with sentences padded only to the longest of the
    /// batch instead of to `--max-length` (what Hugging Face's
    /// `padding=True` feeds): for a model whose outputs do not keep the
    /// sequence axis, the same outputs for less work.
    pub fn batch_unpadded(&self, batch_size: usize, index: usize) -> Result<Batch, DataError> {
        let text = self.inputs.iter().find_map(|(_, c)| match c {
            Column::Text(t) => Some(t.corpus.clone()),
            _ => None,
        });
        let (Some(corpus), None) = (text, &self.fixed_batches) else {
            return self.batch(batch_size, index);
        };
        let bs = batch_size.max(1);
        let r = index * bs..((index + 1) * bs).min(self.samples);
        let width = corpus.longest(r.clone())?;
        self.inputs
            .iter()
            .map(|(n, c)| {
                let t = match c {
                    Column::Text(t) => t.read(r.clone(), width)?,
                    other => other.rows(r.clone())?,
                };
                Ok((n.clone(), t))
            })
            .collect()
    }
}

fn decode_bin(path: &Path, bytes: &[u8], ty: &str, shape: &[usize]) -> Result<Tensor, DataError> {
    let dtype = match ty {
        "float32" => DType::F32,
        "float64" => DType::F64,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "int32" => DType::I32,
        "int64" => DType::I64,
        "bool" => DType::Bool,
        other => {
            return Err(format_err(
                path,
                format!(
                    "data type '{other}' is not supported; use float32, float64, int8, uint8, int32, int64 or bool"
                ),
            ));
        }
    };
    let need = super::npy::data_bytes(shape, dtype.size_of());
    if need != Some(bytes.len() as u64) {
        return Err(format_err(
            path,
            format!(
                "{} bytes, but shape {shape:?} of {ty} needs {}; check --input-shape and --data-types",
                bytes.len(),
                need.map_or("more than 2^64".to_string(), |n| n.to_string())
            ),
        ));
    }
    crate::onnx::tensor_proto::to_tensor(&crate::onnx::proto::TensorProto {
        name: Some(path.display().to_string()),
        data_type: Some(dtype.onnx_code()),
        dims: shape.iter().map(|&d| d as i64).collect(),
        raw_data: Some(bytes.to_vec()),
        ..Default::default()
    })
    .map_err(|e| format_err(path, e.to_string()))
}

/// The largest `.npz` entry read into memory (4 GiB): `.npz` arrays are held
/// whole, unlike `.npy` files, which are read batch by batch.
const MAX_NPZ_ENTRY: u64 = 4 << 30;

/// The arrays of an `.npz` archive, each by its name, held in memory.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Tensor)>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.into(),
        action: "read",
        error: source,
    })?;
    let mut zip = zip_archive(file, path)?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| format_err(path, e.to_string()))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        if entry.size() > MAX_NPZ_ENTRY {
            return Err(format_err(
                path,
                format!(
                    "entry '{name}' expands to {} bytes, more than the {MAX_NPZ_ENTRY} an .npz entry may hold here; give large arrays as .npy files (they are streamed)",
                    entry.size()
                ),
            ));
        }
        let mut bytes = Vec::new();
        // The declared size can lie: never read past the limit either.
        (&mut entry)
            .take(MAX_NPZ_ENTRY + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| DataError::Io {
                path: path.into(),
                action: "read",
                error: source,
            })?;
        out.push((name, read_npy_bytes(&bytes, path)?));
    }
    Ok(out)
}

fn zip_archive(
    file: std::fs::File,
    path: &Path,
) -> Result<zip::ZipArchive<std::fs::File>, DataError> {
    zip::ZipArchive::new(file).map_err(|e| format_err(path, format!("not a .npz archive: {e}")))
}
