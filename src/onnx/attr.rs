//! Node attributes: the one place that reads them by name (readers return
//! `None` when the attribute is absent) and builds them.

use super::proto::attribute_proto::AttributeType;
use super::proto::{AttributeProto, NodeProto};

/// The attribute `name` of `node`, if present.
pub fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

/// An INT attribute's value.
pub fn int_attr(node: &NodeProto, name: &str) -> Option<i64> {
    find(node, name).and_then(|a| a.i)
}

/// A FLOAT attribute's value.
pub fn float_attr(node: &NodeProto, name: &str) -> Option<f32> {
    find(node, name).and_then(|a| a.f)
}

/// An INTS attribute's values.
pub fn ints_attr(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    find(node, name).map(|a| a.ints.clone())
}

/// A FLOATS attribute's values.
pub fn floats_attr(node: &NodeProto, name: &str) -> Option<Vec<f32>> {
    find(node, name).map(|a| a.floats.clone())
}

/// A STRING attribute's bytes.
pub fn string_attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [u8]> {
    find(node, name).and_then(|a| a.s.as_deref())
}

/// Replaces (or adds) an attribute of `node`.
pub fn set(node: &mut NodeProto, attribute: AttributeProto) {
    node.attribute.retain(|a| a.name() != attribute.name());
    node.attribute.push(attribute);
}

/// A FLOAT attribute.
pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

/// An INT attribute.
pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// An INTS attribute.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A STRING attribute.
pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(value.as_bytes().to_vec()),
        ..Default::default()
    }
}
