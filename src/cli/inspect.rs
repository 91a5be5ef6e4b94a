//! `ascend-quant inspect`: a summary of a model, for people or (`--json`) scripts.

use super::Failure;
use crate::onnx::{ModelProto, OnnxError};
use crate::onnx::{ValueSpec, load_model};
use crate::quant::layers::{LayerCandidate, discover};
use crate::quant::prepare::prepare;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The ONNX model to describe.
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Everything `inspect` reports.
#[derive(Debug, Serialize)]
struct Summary {
    model: String,
    ir_version: i64,
    producer: String,
    opsets: BTreeMap<String, i64>,
    inputs: Vec<ValueSpec>,
    outputs: Vec<ValueSpec>,
    node_count: usize,
    initializer_count: usize,
    operators: BTreeMap<String, usize>,
    /// How the CPU simulator runs the model (or why it cannot).
    engine: Result<crate::sim::Plan, String>,
    layers: Vec<LayerCandidate>,
}

/// The quantizable-layer verdicts, under the names calibration gives the
/// layers (unnamed nodes are named as `calibrate` names them).
fn layer_verdicts(model: &ModelProto) -> Result<Vec<LayerCandidate>, OnnxError> {
    let mut named = model.clone();
    prepare(&mut named, false, &[])?;
    Ok(discover(crate::onnx::graph_of(&named, "the model")?)?.1)
}

/// Runs `inspect`.
pub fn execute(args: &InspectArgs) -> Result<(), Failure> {
    let model = load_model(&args.model)?;
    let graph = crate::onnx::graph_of(&model, &args.model.display().to_string())?;
    let mut operators = BTreeMap::new();
    for n in &graph.node {
        let key = if n.domain().is_empty() {
            n.op_type().to_string()
        } else {
            format!("{}::{}", n.domain(), n.op_type())
        };
        *operators.entry(key).or_insert(0) += 1;
    }
    let summary = Summary {
        model: args.model.display().to_string(),
        ir_version: model.ir_version(),
        producer: format!("{} {}", model.producer_name(), model.producer_version())
            .trim()
            .to_string(),
        opsets: model
            .opset_import
            .iter()
            .map(|o| {
                (
                    if o.domain().is_empty() {
                        "ai.onnx".to_string()
                    } else {
                        o.domain().to_string()
                    },
                    o.version(),
                )
            })
            .collect(),
        inputs: crate::sim::feedable_inputs(&model),
        outputs: graph.output.iter().map(ValueSpec::from_proto).collect(),
        node_count: graph.node.len(),
        initializer_count: graph.initializer.len(),
        operators,
        engine: crate::sim::engine_plan(&model, &crate::sim::SessionOptions::default())
            .map_err(|e| e.to_string()),
        layers: layer_verdicts(&model)
            .with_context(|| format!("indexing the graph of {}", args.model.display()))?,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).context("serializing the summary")?
        );
    } else {
        print_text(&summary);
    }
    Ok(())
}

fn print_text(s: &Summary) {
    println!("model:     {}", s.model);
    println!(
        "ir:        {}   producer: {}",
        s.ir_version,
        if s.producer.is_empty() {
            "?"
        } else {
            &s.producer
        }
    );
    let opsets: Vec<String> = s.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    println!("opsets:    {}", opsets.join(", "));
    println!("inputs:");
    for v in &s.inputs {
        println!("  {:<32} {:<8} {}", v.name, v.dtype, v.shape_text());
    }
    println!("outputs:");
    for v in &s.outputs {
        println!("  {:<32} {:<8} {}", v.name, v.dtype, v.shape_text());
    }
    println!(
        "operators ({} nodes, {} initializers):",
        s.node_count, s.initializer_count
    );
    for (op, n) in &s.operators {
        println!("  {op:<24} {n}");
    }
    print_engine(&s.engine);
    let ok = s.layers.iter().filter(|l| l.quantizable).count();
    println!(
        "quantizable layers ({ok} of {} candidates):",
        s.layers.len()
    );
    for l in &s.layers {
        match &l.note {
            None => println!(
                "  {:<40} {:<14} {}",
                l.node,
                l.op_type,
                l.weight.as_deref().unwrap_or("-")
            ),
            Some(why) => println!("  {:<40} {:<14} skipped: {why}", l.node, l.op_type),
        }
    }
}

fn print_engine(plan: &Result<crate::sim::Plan, String>) {
    match plan {
        Err(e) => println!("cpu engine: cannot prepare the model: {e}"),
        Ok(p) if p.whole_on_rten => {
            println!("cpu engine: the whole model runs on rten (slower), because of:");
            for d in &p.declined {
                println!("  {d}");
            }
        }
        Ok(p) => {
            println!(
                "cpu engine: {} steps on the native engine, {} nodes computed when the model is prepared, {} nodes alone on rten{}",
                p.native,
                p.folded,
                p.declined.len(),
                if p.declined.is_empty() { "" } else { ":" }
            );
            for d in &p.declined {
                println!("  {d}");
            }
        }
    }
}
