//! Readable descriptions of graph inputs and outputs (name, element type, shape).

use super::proto::ValueInfoProto;
use super::proto::tensor_shape_proto::dimension;
use super::proto::type_proto;
use crate::tensor::onnx_type_name;
use serde::Serialize;
use std::fmt;

/// One axis of a declared shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A named symbolic size such as `batch`.
    Symbolic(String),
    /// Neither given.
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// The declared name, element type and shape of a graph input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValueSpec {
    /// The value's name.
    pub name: String,
    /// The ONNX element type number (`None` when not a tensor or not declared).
    #[serde(skip)]
    pub elem_type: Option<i32>,
    /// The element type's name (`"float32"`, ...), or `"unknown"`.
    pub dtype: String,
    /// The declared shape, `None` when the rank is unknown.
    pub shape: Option<Vec<Dim>>,
}

impl ValueSpec {
    /// The output a job scores or trains on: the one called `name` (asked
    /// for by the option `flag`), else the first float32 one.
    pub fn scored_output(
        outputs: &[ValueSpec],
        name: Option<&str>,
        flag: &str,
    ) -> Result<String, String> {
        match name {
            Some(name) => outputs
                .iter()
                .find(|o| o.name == name)
                .map(|o| o.name.clone())
                .ok_or_else(|| {
                    let all: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
                    format!(
                        "{flag} '{name}' is not an output of the model; its outputs are {}",
                        all.join(", ")
                    )
                }),
            None => outputs
                .iter()
                .find(|o| o.elem_type.is_none_or(|t| t == 1))
                .map(|o| o.name.clone())
                .ok_or_else(|| "the model has no float32 output".into()),
        }
    }

    /// Reads the spec of a `ValueInfoProto`.
    pub fn from_proto(v: &ValueInfoProto) -> ValueSpec {
        let tensor = v.r#type.as_ref().and_then(|t| match &t.value {
            Some(type_proto::Value::TensorType(tt)) => Some(tt),
            _ => None,
        });
        let elem_type = tensor.and_then(|t| t.elem_type).filter(|&e| e != 0);
        let shape = tensor.and_then(|t| t.shape.as_ref()).map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(n)) if *n >= 0 => Dim::Fixed(*n as usize),
                    Some(dimension::Value::DimParam(p)) if !p.is_empty() => {
                        Dim::Symbolic(p.clone())
                    }
                    _ => Dim::Unknown,
                })
                .collect()
        });
        ValueSpec {
            name: v.name().to_string(),
            elem_type,
            dtype: elem_type
                .map(onnx_type_name)
                .unwrap_or("unknown")
                .to_string(),
            shape,
        }
    }

    /// The shape as text, e.g. `[batch, 3, 224, 224]`, or `[?]` for unknown rank.
    pub fn shape_text(&self) -> String {
        match &self.shape {
            None => "[?]".into(),
            Some(dims) => format!(
                "[{}]",
                dims.iter()
                    .map(Dim::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}
