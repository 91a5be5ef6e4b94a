//! The window attributes of 2-D convolutions and pools (`kernel_shape`,
//! `strides`, `dilations`, `pads`, `auto_pad`, `group`), read and checked
//! once for every engine and pass that needs them.

use crate::onnx::NodeProto;
use crate::onnx::attr::{int_attr, ints_attr, string_attr};

/// A 2-D window as ONNX gives it, defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window2d {
    /// `kernel_shape` (height, width), when given.
    pub kernel: Option<(usize, usize)>,
    /// Vertical and horizontal strides (at least 1).
    pub strides: (usize, usize),
    /// Vertical and horizontal dilations (at least 1).
    pub dilations: (usize, usize),
    /// Padding: top, left, bottom, right (zeros for VALID).
    pub pads: [usize; 4],
    /// `group` (at least 1).
    pub group: usize,
}

impl Window2d {
    /// The window of `node`; an error for SAME auto-padding (whose pads
    /// depend on the input's size), attributes that are not 2-D, negative
    /// values, or zero strides and dilations.
    pub fn parse(node: &NodeProto) -> Result<Window2d, String> {
        let two = |name: &str, default: usize| -> Result<(usize, usize), String> {
            match ints_attr(node, name).as_deref() {
                None => Ok((default, default)),
                Some([a, b]) if *a >= 0 && *b >= 0 => Ok((*a as usize, *b as usize)),
                Some(v) => Err(format!("{name} {v:?} are not two non-negative values")),
            }
        };
        let kernel = match ints_attr(node, "kernel_shape") {
            None => None,
            Some(_) => Some(two("kernel_shape", 1)?),
        };
        let strides = two("strides", 1)?;
        let dilations = two("dilations", 1)?;
        if strides.0 == 0 || strides.1 == 0 || dilations.0 == 0 || dilations.1 == 0 {
            return Err(format!(
                "strides {strides:?} and dilations {dilations:?} must be at least 1"
            ));
        }
        let pads = match (
            string_attr(node, "auto_pad").unwrap_or(b"NOTSET"),
            ints_attr(node, "pads").as_deref(),
        ) {
            (b"NOTSET", None) | (b"VALID", _) | (b"", None) => [0; 4],
            (b"NOTSET" | b"", Some(p)) if p.len() == 4 && p.iter().all(|&x| x >= 0) => {
                [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]
            }
            (b"NOTSET" | b"", Some(p)) => {
                return Err(format!("pads {p:?} are not four non-negative values"));
            }
            (other, _) => {
                return Err(format!(
                    "auto_pad {}: give explicit pads",
                    String::from_utf8_lossy(other)
                ));
            }
        };
        Ok(Window2d {
            kernel,
            strides,
            dilations,
            pads,
            group: int_attr(node, "group").unwrap_or(1).max(1) as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::{attr_int, attr_ints, attr_string};
    use crate::onnx::builder::node;

    #[test]
    fn defaults_explicit_values_and_refusals() {
        let plain = node("Conv", "c", &["x", "w"], &["y"], vec![]);
        let w = Window2d::parse(&plain).unwrap();
        assert_eq!(
            (w.kernel, w.strides, w.dilations, w.pads, w.group),
            (None, (1, 1), (1, 1), [0; 4], 1)
        );
        let full = node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![
                attr_ints("kernel_shape", &[3, 5]),
                attr_ints("strides", &[2, 1]),
                attr_ints("dilations", &[1, 2]),
                attr_ints("pads", &[0, 1, 2, 3]),
                attr_int("group", 4),
            ],
        );
        let w = Window2d::parse(&full).unwrap();
        assert_eq!(
            (w.kernel, w.strides, w.dilations, w.pads, w.group),
            (Some((3, 5)), (2, 1), (1, 2), [0, 1, 2, 3], 4)
        );
        let same = node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![attr_string("auto_pad", "SAME_UPPER")],
        );
        assert!(Window2d::parse(&same).unwrap_err().contains("SAME_UPPER"));
        let valid = node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![
                attr_string("auto_pad", "VALID"),
                attr_ints("pads", &[1, 1, 1, 1]),
            ],
        );
        assert_eq!(Window2d::parse(&valid).unwrap().pads, [0; 4]);
        for bad in [
            attr_ints("strides", &[0, 1]),
            attr_ints("pads", &[1, 1]),
            attr_ints("dilations", &[1, 1, 1]),
        ] {
            assert!(Window2d::parse(&node("Conv", "c", &["x"], &["y"], vec![bad])).is_err());
        }
    }
}
