//! `ascend-quant run`: runs a model on the CPU simulator and saves its outputs.

use super::Failure;
use super::exit::usage;
use crate::data::{read_npy, write_npy};
use crate::onnx::{Dim, ValueSpec, load_model};
use crate::sim::{CpuExecutor, Executor, SessionOptions};
use crate::tensor::{Tensor, format_shape};
use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The ONNX model to run.
    pub model: PathBuf,
    /// An input as NAME=FILE.npy (or just FILE.npy for a single-input model); repeatable.
    #[arg(long = "input", short = 'i', required = true)]
    pub inputs: Vec<String>,
    /// Where to write one OUTPUT_NAME.npy per model output.
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    /// Print a JSON list of the written outputs instead of text.
    #[arg(long)]
    pub json: bool,
    /// Compute AscendQuant with its scale at fp16 precision, as a device
    /// does under FORCE_FP16_QUANT (for deploy models made by AMCT in that
    /// mode; ascend-quant's own say so in their metadata).
    #[arg(long)]
    pub fp16_quant: bool,
}

#[derive(Serialize)]
struct Written {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    file: String,
}

/// File name for an output value: characters other than letters, digits, `.`, `_`, `-` become `_`.
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

/// Runs `run`.
pub fn execute(args: &RunArgs) -> Result<(), Failure> {
    let mut model = load_model(&args.model)?;
    if args.fp16_quant {
        crate::deploy_format::fp16_quant::mark(&mut model);
    }
    let input_names: Vec<String> = crate::sim::feedable_input_names(&model);
    let mut feeds: Vec<(String, Tensor)> = Vec::new();
    for spec in &args.inputs {
        let (name, file) = match spec.split_once('=') {
            Some((n, f)) => (n.to_string(), f),
            None if input_names.len() == 1 => (input_names[0].clone(), spec.as_str()),
            None => {
                return Err(usage(format!(
                    "--input '{spec}': the model has {} inputs ({}), so write NAME=FILE.npy",
                    input_names.len(),
                    input_names.join(", ")
                )));
            }
        };
        let value = read_npy(Path::new(file))?;
        feeds.push((name, value));
    }
    if let Some(missing) = input_names
        .iter()
        .find(|n| !feeds.iter().any(|(f, _)| f == *n))
    {
        return Err(usage(format!(
            "input '{missing}' was not given; add --input {missing}=FILE.npy"
        )));
    }
    // A batch other than the declared one runs with a free batch axis.
    let declared: Vec<ValueSpec> = model
        .graph
        .iter()
        .flat_map(|g| &g.input)
        .map(ValueSpec::from_proto)
        .collect();
    let batch_differs = feeds.iter().any(|(name, v)| {
        declared.iter().any(|s| {
            &s.name == name && matches!(s.shape.as_deref(), Some([Dim::Fixed(b), ..]) if v.shape().first() != Some(b))
        })
    });
    let session = CpuExecutor.prepare(
        &model,
        &SessionOptions {
            dynamic_batch: batch_differs,
            ..Default::default()
        },
    )?;
    let output_names: Vec<String> = session.outputs().iter().map(|o| o.name.clone()).collect();
    let fetch: Vec<&str> = output_names.iter().map(String::as_str).collect();
    let feed_refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let values = session
        .run(&feed_refs, &fetch)
        .with_context(|| format!("running {}", args.model.display()))?;
    std::fs::create_dir_all(&args.output_dir).map_err(|e| {
        usage(format!(
            "cannot create output folder {}: {e}",
            args.output_dir.display()
        ))
    })?;
    let mut written = Vec::new();
    for (name, value) in output_names.iter().zip(&values) {
        let path = args.output_dir.join(output_file_name(name));
        write_npy(&path, value)?;
        written.push(Written {
            name: name.clone(),
            dtype: value.dtype().to_string(),
            shape: value.shape().to_vec(),
            file: path.display().to_string(),
        });
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&written).context("serializing the result")?
        );
    } else {
        for w in &written {
            println!(
                "{:<32} {:<8} {:<20} {}",
                w.name,
                w.dtype,
                format_shape(&w.shape),
                w.file
            );
        }
    }
    Ok(())
}
