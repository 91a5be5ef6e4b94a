//! The [`Executor`] built on the `rten` crate, a pure-Rust ONNX runtime.
//!
//! rten holds float32, int32, int8 and uint8 tensors; int64 and bool values
//! cross the boundary as int32 (range-checked) and are widened back when the
//! model declares them so.

use super::error::{SimError, ValueRole};
use super::per_sample::BatchMode;
use super::prepare::{check_feed, feedable_inputs, rewrite_for_execution};
use super::{Executor, Session, SessionOptions};
use crate::onnx::{ModelProto, ValueSpec};
use crate::tensor::{DType, Tensor};
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use rten::{ModelOptions, NodeId, Value, ValueOrView};
use rten_tensor::{Layout, TensorView};
use std::collections::HashMap;

/// Runs models with the `rten` engine on the CPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct RtenExecutor;

impl Executor for RtenExecutor {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn prepare(
        &self,
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Box<dyn Session>, SimError> {
        let lowered;
        let model = if super::ascend::has_ascend_ops(model) {
            lowered = super::ascend::lower(model)?;
            &lowered
        } else {
            model
        };
        let graph = model.graph.as_ref().ok_or_else(|| SimError::Load {
            reason: "the model holds no graph".into(),
        })?;
        crate::onnx::GraphIndex::new(graph).map_err(|e| SimError::Load {
            reason: e.to_string(),
        })?;
        let mut prepared = rewrite_for_execution(model, opts)?;
        super::rten_adapt::adapt_for_rten(&mut prepared)?;
        let mut options = ModelOptions::with_all_ops();
        options
            .enable_optimization(opts.optimize)
            .prepack_weights(true);
        let engine = options.load(prepared.encode_to_vec()).map_err(|e| SimError::Load {
            reason: match e.kind() {
                rten::LoadErrorKind::OperatorInvalid => format!(
                    "{e}; remove or replace that operator, or keep it out of the model given to ascend-quant"
                ),
                _ => e.to_string(),
            },
        })?;
        let graph = prepared.graph.as_ref().ok_or_else(|| SimError::Load {
            reason: "the model holds no graph".into(),
        })?;
        let declared: HashMap<String, i32> = graph
            .input
            .iter()
            .chain(&graph.output)
            .chain(&graph.value_info)
            .map(ValueSpec::from_proto)
            .filter_map(|s| s.elem_type.map(|t| (s.name, t)))
            .collect();
        Ok(Box::new(RtenSession {
            inputs: feedable_inputs(&prepared),
            outputs: model
                .graph
                .iter()
                .flat_map(|g| &g.output)
                .map(ValueSpec::from_proto)
                .collect(),
            keep: opts.keep.clone(),
            declared,
            batch: BatchMode::of(model, opts),
            engine,
        }))
    }
}

/// A model loaded into rten.
struct RtenSession {
    inputs: Vec<ValueSpec>,
    outputs: Vec<ValueSpec>,
    keep: Vec<String>,
    declared: HashMap<String, i32>,
    batch: BatchMode,
    engine: rten::Model,
}

impl RtenSession {
    fn node(&self, name: &str, role: ValueRole) -> Result<NodeId, SimError> {
        let known = self.declared(role).iter().any(|s| s.name == name)
            || self.keep.iter().any(|k| k == name);
        let unknown = || SimError::UnknownValue {
            name: name.to_string(),
            role,
            hint: self.hint(role),
        };
        if !known {
            return Err(unknown());
        }
        self.engine.find_node(name).ok_or_else(unknown)
    }

    fn declared(&self, role: ValueRole) -> &[ValueSpec] {
        match role {
            ValueRole::Input => &self.inputs,
            ValueRole::Output => &self.outputs,
        }
    }

    fn hint(&self, role: ValueRole) -> String {
        super::error::names_hint(self.declared(role), &self.keep, role)
    }
}

impl Session for RtenSession {
    fn inputs(&self) -> &[ValueSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[ValueSpec] {
        &self.outputs
    }

    fn run(&self, feeds: &[(&str, &Tensor)], fetch: &[&str]) -> Result<Vec<Tensor>, SimError> {
        super::per_sample::run_batch(self.batch, &self.inputs, feeds, fetch, &|f, o| {
            self.run_once(f, o)
        })
    }
}

impl RtenSession {
    fn run_once(&self, feeds: &[(&str, &Tensor)], fetch: &[&str]) -> Result<Vec<Tensor>, SimError> {
        let mut inputs = Vec::with_capacity(feeds.len());
        for (name, value) in feeds {
            let id = self.node(name, ValueRole::Input)?;
            if let Some(spec) = self.inputs.iter().find(|s| s.name == *name) {
                check_feed(spec, value, self.batch.is_free())?;
            }
            inputs.push((id, to_engine(name, value)?));
        }
        let ids = fetch
            .iter()
            .map(|n| self.node(n, ValueRole::Output))
            .collect::<Result<Vec<_>, _>>()?;
        // rten asserts on some malformed operator inputs (a Slice whose
        // bounds overflow, found by fuzzing): a panic inside it is this
        // run's error, not the process's end.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.engine.run(inputs, &ids, None)
        }));
        let values = match run {
            Ok(result) => result.map_err(|e| SimError::Run {
                reason: e.to_string(),
            })?,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(SimError::Run {
                    reason: format!(
                        "the rten engine failed inside an operator ({what}); an operator's inputs are outside what it handles — check the model with onnx.checker or onnxruntime"
                    ),
                });
            }
        };
        values
            .into_iter()
            .zip(fetch)
            .map(|(v, name)| from_engine(name, v, self.declared.get(*name).copied()))
            .collect()
    }
}

fn view<'a, T: Clone>(a: &'a ArrayD<T>) -> ValueOrView<'a>
where
    ValueOrView<'a>: From<TensorView<'a, T>>,
    ValueOrView<'static>: From<rten_tensor::Tensor<T>>,
{
    match a.as_slice() {
        Some(data) => TensorView::from_data(a.shape(), data).into(),
        None => {
            let owned: ValueOrView<'static> =
                rten_tensor::Tensor::from_data(a.shape(), a.iter().cloned().collect::<Vec<T>>())
                    .into();
            owned
        }
    }
}

fn to_engine<'a>(name: &str, value: &'a Tensor) -> Result<ValueOrView<'a>, SimError> {
    let narrow = |a: &ArrayD<i64>| -> Result<ValueOrView<'a>, SimError> {
        let data = a
            .iter()
            .map(|&v| i32::try_from(v))
            .collect::<Result<Vec<i32>, _>>()
            .map_err(|_| SimError::InputMismatch {
                name: name.to_string(),
                reason: "an int64 value is outside the int32 range the CPU engine computes in"
                    .into(),
            })?;
        Ok(rten_tensor::Tensor::from_data(a.shape(), data).into())
    };
    Ok(match value {
        Tensor::F32(a) => view(a),
        Tensor::I32(a) => view(a),
        Tensor::I8(a) => view(a),
        Tensor::U8(a) => view(a),
        Tensor::I64(a) => narrow(a)?,
        Tensor::Bool(a) => rten_tensor::Tensor::from_data(
            a.shape(),
            a.iter().map(|&b| i32::from(b)).collect::<Vec<_>>(),
        )
        .into(),
        other => {
            return Err(SimError::InputMismatch {
                name: name.to_string(),
                reason: format!(
                    "{} tensors are not supported by the CPU engine; convert to float32",
                    other.dtype()
                ),
            });
        }
    })
}

fn array<T: Clone>(t: rten_tensor::Tensor<T>) -> ArrayD<T> {
    let shape = t.shape().to_vec();
    let data = t.into_data(); // no copy when contiguous
    ArrayD::from_shape_vec(IxDyn(&shape), data).expect("engine tensors are consistent")
}

fn from_engine(name: &str, value: Value, declared: Option<i32>) -> Result<Tensor, SimError> {
    let declared = declared.and_then(DType::from_onnx_code);
    Ok(match value {
        Value::FloatTensor(t) => Tensor::F32(array(t)),
        Value::Int8Tensor(t) => Tensor::I8(array(t)),
        Value::UInt8Tensor(t) => Tensor::U8(array(t)),
        Value::Int32Tensor(t) => {
            let a = array(t);
            match declared {
                Some(DType::I64) => Tensor::I64(a.mapv(i64::from)),
                Some(DType::Bool) => Tensor::Bool(a.mapv(|v| v != 0)),
                _ => Tensor::I32(a),
            }
        }
        _ => {
            return Err(SimError::Run {
                reason: format!(
                    "'{name}' is not a tensor (a sequence?); only tensors can be fetched"
                ),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::node;
    use crate::onnx::proto::{GraphProto, OperatorSetIdProto, ValueInfoProto};

    #[test]
    fn unknown_names_are_reported_with_the_model_names_intact() {
        let vi = |n: &str| ValueInfoProto {
            name: Some(n.into()),
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![node("Relu", "r", &["scan input"], &["an output"], vec![])],
                input: vec![vi("scan input")],
                output: vec![vi("an output")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = RtenExecutor
            .prepare(&model, &SessionOptions::default())
            .unwrap();
        let x = Tensor::F32(ArrayD::zeros(IxDyn(&[2])));
        let e = s.run(&[("x", &x)], &["an output"]).unwrap_err().to_string();
        assert_eq!(
            e,
            "'x' is not an input of the model; the model's inputs are: scan input"
        );
        let e = s
            .run(&[("scan input", &x)], &["y"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "'y' is not an output of the model; the model's outputs are: an output"
        );
    }
}
