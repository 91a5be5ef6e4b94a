//! The `run` job: a model on the CPU simulator over inputs in `.npy` files,
//! its outputs written as `.npy` files. When the inputs hold another number
//! of samples than the model declares, they are read and run a chunk of
//! samples at a time and each output is written row by row as it comes, so
//! memory does not grow with the number of samples and a long run costs
//! what its samples cost (`docs/engine.md`, Batches). The outputs appear
//! together when the run succeeds, and not at all when it fails.

use super::PipelineError;
use crate::data::npy_rows::NpyRows;
use crate::data::{DataError, read_npy, read_npz};
use crate::fsutil::Staging;
use crate::onnx::{Dim, ModelProto, ValueSpec};
use crate::sim::{CpuExecutor, Executor, SessionOptions};
use crate::tensor::Tensor;
use ndarray_npy::WritableElement;
use ndarray_npy::npy::header::{Header, Layout};
use std::io::BufWriter;
use std::path::Path;

/// Samples read and run at a time when streaming.
const CHUNK: usize = 8;

/// One output as written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Written {
    /// The model output's name.
    pub name: String,
    /// Its element type.
    pub dtype: String,
    /// Its shape (all samples).
    pub shape: Vec<usize>,
    /// The file written.
    pub file: String,
}

/// File name for an output value: characters other than letters, digits,
/// `.`, `_`, `-` become `_`.
pub fn output_file_name(value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{}.npy", clean.trim_start_matches('.'))
}

/// An input's samples: read on demand, or (a file the row reader does not
/// take) held whole.
enum Source {
    Rows(NpyRows),
    Whole(Tensor),
}

impl Source {
    fn open(path: &Path) -> Result<Source, DataError> {
        Ok(match NpyRows::open(path)? {
            Some(rows) => Source::Rows(rows),
            None => Source::Whole(read_npy(path)?),
        })
    }

    fn shape(&self) -> &[usize] {
        match self {
            Source::Rows(r) => r.shape(),
            Source::Whole(t) => t.shape(),
        }
    }

    fn read(&self, range: std::ops::Range<usize>) -> Result<Tensor, DataError> {
        match self {
            Source::Rows(r) => r.read(range),
            Source::Whole(t) if range.start == 0 && range.end == t.shape()[0] => Ok(t.clone()),
            Source::Whole(t) => Ok(t.slice_axis0(range)),
        }
    }
}

/// The inputs `specs` name: `NAME=FILE.npy`, `FILE.npy` for a one-input
/// model, or `FILE.npz` whose arrays are named like the inputs; every
/// feedable input must be given, and nothing else.
fn open_sources(
    model: &ModelProto,
    specs: &[String],
) -> Result<Vec<(String, Source)>, PipelineError> {
    let input_names: Vec<String> = crate::sim::feedable_input_names(model);
    let mut sources: Vec<(String, Source)> = Vec::new();
    for spec in specs {
        match spec.split_once('=') {
            Some((name, file)) => sources.push((name.to_string(), Source::open(Path::new(file))?)),
            None if spec.ends_with(".npz") => sources.extend(
                read_npz(Path::new(spec))?
                    .into_iter()
                    .map(|(name, t)| (name, Source::Whole(t))),
            ),
            None if input_names.len() == 1 => {
                sources.push((input_names[0].clone(), Source::open(Path::new(spec))?))
            }
            None => {
                return Err(PipelineError::Usage(format!(
                    "--input '{spec}': the model has {} inputs ({}), so write NAME=FILE.npy for each or give one .npz",
                    input_names.len(),
                    input_names.join(", ")
                )));
            }
        }
    }
    if let Some((name, _)) = sources.iter().find(|(n, _)| !input_names.contains(n)) {
        return Err(PipelineError::Usage(format!(
            "--input: '{name}' is not an input of the model; its inputs are {}",
            input_names.join(", ")
        )));
    }
    if let Some(missing) = input_names
        .iter()
        .find(|n| !sources.iter().any(|(f, _)| f == *n))
    {
        return Err(PipelineError::Usage(format!(
            "input '{missing}' was not given; add --input {missing}=FILE.npy"
        )));
    }
    Ok(sources)
}

/// Runs `model` on the inputs `specs` (`NAME=FILE.npy`, `FILE.npy`,
/// `FILE.npz`) and writes one [`output_file_name`] per output into
/// `output_dir`.
pub fn run(
    model: &ModelProto,
    specs: &[String],
    output_dir: &Path,
) -> Result<Vec<Written>, PipelineError> {
    let sources = open_sources(model, specs)?;
    let declared: Vec<ValueSpec> = model
        .graph
        .iter()
        .flat_map(|g| &g.input)
        .map(ValueSpec::from_proto)
        .collect();
    // A batch other than the declared one runs with a free batch axis.
    let batch_differs = sources.iter().any(|(name, source)| {
        declared.iter().any(|s| {
            &s.name == name
                && matches!(s.shape.as_deref(), Some([Dim::Fixed(b), ..]) if source.shape().first() != Some(b))
        })
    });
    let session = CpuExecutor.prepare(
        model,
        &SessionOptions {
            dynamic_batch: batch_differs,
            ..Default::default()
        },
    )?;
    let names: Vec<String> = session.outputs().iter().map(|o| o.name.clone()).collect();
    let fetch: Vec<&str> = names.iter().map(String::as_str).collect();
    std::fs::create_dir_all(output_dir).map_err(|e| {
        PipelineError::Usage(format!(
            "cannot create output folder {}: {e}",
            output_dir.display()
        ))
    })?;
    let cannot_write = |e: std::io::Error| {
        PipelineError::Usage(format!("cannot write into {}: {e}", output_dir.display()))
    };
    let staging = Staging::new(output_dir).map_err(cannot_write)?;
    let samples = sources
        .first()
        .and_then(|(_, s)| s.shape().first().copied())
        .unwrap_or(0);
    if let Some((name, s)) = sources
        .iter()
        .find(|(_, s)| s.shape().first() != Some(&samples))
    {
        return Err(PipelineError::Usage(format!(
            "input '{name}' holds {} samples but '{}' holds {samples}; give every input the same number",
            s.shape().first().copied().unwrap_or(0),
            sources[0].0
        )));
    }
    let chunk = if batch_differs && samples > 0 {
        CHUNK
    } else {
        samples.max(1)
    };
    let mut writers: Vec<Option<RowWriter>> = names.iter().map(|_| None).collect();
    let mut start = 0;
    loop {
        let end = (start + chunk).min(samples);
        let feeds: Vec<(&str, Tensor)> = sources
            .iter()
            .map(|(name, s)| Ok((name.as_str(), s.read(start..end)?)))
            .collect::<Result<_, DataError>>()?;
        let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (*n, t)).collect();
        let values = session.run(&refs, &fetch)?;
        for ((name, writer), value) in names.iter().zip(&mut writers).zip(&values) {
            let path = staging.path(&output_file_name(name));
            if writer.is_none() {
                // The first chunk tells each output's type and per-sample shape.
                let mut shape = value.shape().to_vec();
                if chunk < samples {
                    if shape.first() != Some(&(end - start)) {
                        return Err(PipelineError::Usage(format!(
                            "output '{name}' has shape {:?} for {} samples: its first axis is not the samples, so it cannot be written sample by sample; give the model its declared batch",
                            value.shape(),
                            end - start
                        )));
                    }
                    shape[0] = samples;
                }
                *writer = Some(RowWriter::create(&path, value, shape).map_err(cannot_write)?);
            }
            writer
                .as_mut()
                .expect("created above")
                .append(name, value)?;
        }
        start = end;
        if start >= samples {
            break;
        }
    }
    let mut written = Vec::new();
    for (name, writer) in names.iter().zip(writers) {
        let w = writer.expect("one chunk at least");
        written.push(Written {
            name: name.clone(),
            dtype: w.dtype.clone(),
            shape: w.shape.clone(),
            file: output_dir
                .join(output_file_name(name))
                .display()
                .to_string(),
        });
        w.finish().map_err(cannot_write)?;
    }
    staging.commit().map_err(cannot_write)?;
    Ok(written)
}

/// An `.npy` file written a block of rows at a time.
struct RowWriter {
    file: BufWriter<std::fs::File>,
    dtype: String,
    shape: Vec<usize>,
    kind: crate::tensor::DType,
}

impl RowWriter {
    /// Creates `path` for values of `first`'s type and the full `shape`.
    fn create(path: &Path, first: &Tensor, shape: Vec<usize>) -> std::io::Result<RowWriter> {
        use crate::tensor::DType;
        let descriptor = match first.dtype() {
            DType::F32 | DType::F16 => f32::type_descriptor(),
            DType::F64 => f64::type_descriptor(),
            DType::I8 => i8::type_descriptor(),
            DType::U8 => u8::type_descriptor(),
            DType::I32 => i32::type_descriptor(),
            DType::I64 => i64::type_descriptor(),
            DType::U64 => u64::type_descriptor(),
            DType::Bool => bool::type_descriptor(),
        };
        let header = Header {
            type_descriptor: descriptor,
            layout: Layout::Standard,
            shape: shape.clone(),
        };
        let mut file = BufWriter::new(std::fs::File::create(path)?);
        header.write(&mut file).map_err(std::io::Error::other)?;
        Ok(RowWriter {
            file,
            dtype: first.dtype().to_string(),
            shape,
            kind: first.dtype(),
        })
    }

    /// Appends the rows of `value` (of the first block's type).
    fn append(&mut self, name: &str, value: &Tensor) -> Result<(), PipelineError> {
        if value.dtype() != self.kind {
            return Err(PipelineError::Usage(format!(
                "output '{name}' changed type from {} to {} between samples",
                self.dtype,
                value.dtype()
            )));
        }
        macro_rules! rows {
            ($a:expr, $t:ty) => {{
                let a = $a.as_standard_layout();
                <$t>::write_slice(a.as_slice().expect("standard layout"), &mut self.file)
            }};
        }
        let result = match value {
            Tensor::F32(a) => rows!(a, f32),
            Tensor::F16(a) => {
                let widened = a.mapv(|v| v.to_f32());
                rows!(widened, f32)
            }
            Tensor::F64(a) => rows!(a, f64),
            Tensor::I8(a) => rows!(a, i8),
            Tensor::U8(a) => rows!(a, u8),
            Tensor::I32(a) => rows!(a, i32),
            Tensor::I64(a) => rows!(a, i64),
            Tensor::U64(a) => rows!(a, u64),
            Tensor::Bool(a) => rows!(a, bool),
        };
        result.map_err(|e| PipelineError::Usage(format!("cannot write output '{name}': {e}")))
    }

    /// Flushes and syncs the file.
    fn finish(self) -> std::io::Result<()> {
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}
