//! The window attributes of convolutions and pools (`kernel_shape`,
//! `strides`, `dilations`, `pads`, `auto_pad`, `group`), read and checked
//! once for every engine and pass that needs them: [`Window`] for any
//! number of spatial axes, [`Window2d`] for the 2-D kernels.

use crate::onnx::NodeProto;
use crate::onnx::attr::{int_attr, ints_attr, string_attr};

/// The size-giving window attributes of any node exactly as written (no
/// defaults, no checks): what the size limits look at before any operator
/// is understood (`ops::work::check_node_sizes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenWindow {
    /// `pads`.
    pub pads: Option<Vec<i64>>,
    /// `kernel_shape`.
    pub kernel_shape: Option<Vec<i64>>,
    /// `strides`.
    pub strides: Option<Vec<i64>>,
    /// `dilations`.
    pub dilations: Option<Vec<i64>>,
    /// `output_padding` (ConvTranspose).
    pub output_padding: Option<Vec<i64>>,
    /// `output_shape` (ConvTranspose).
    pub output_shape: Option<Vec<i64>>,
}

impl WrittenWindow {
    /// The attributes of `node`.
    pub fn of(node: &NodeProto) -> WrittenWindow {
        WrittenWindow {
            pads: ints_attr(node, "pads"),
            kernel_shape: ints_attr(node, "kernel_shape"),
            strides: ints_attr(node, "strides"),
            dilations: ints_attr(node, "dilations"),
            output_padding: ints_attr(node, "output_padding"),
            output_shape: ints_attr(node, "output_shape"),
        }
    }

    /// The per-axis lists with their attribute names (present ones).
    pub fn per_axis(&self) -> impl Iterator<Item = (&'static str, &[i64])> {
        [
            ("pads", &self.pads),
            ("kernel_shape", &self.kernel_shape),
            ("strides", &self.strides),
            ("dilations", &self.dilations),
            ("output_padding", &self.output_padding),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v.as_deref()?)))
    }
}

/// A window over `spatial` axes as ONNX gives it, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// `kernel_shape`, when given.
    pub kernel: Option<Vec<usize>>,
    /// Strides per axis (at least 1).
    pub strides: Vec<usize>,
    /// Dilations per axis (at least 1).
    pub dilations: Vec<usize>,
    /// Padding: all begins, then all ends (zeros for VALID).
    pub pads: Vec<usize>,
    /// `group` (at least 1).
    pub group: usize,
}

impl Window {
    /// The window of `node` over `spatial` axes; an error for SAME
    /// auto-padding (whose pads depend on the input's size), attributes of
    /// another rank, negative values, or zero strides and dilations.
    pub fn parse(node: &NodeProto, spatial: usize) -> Result<Window, String> {
        let list = |name: &str, len: usize, default: usize| -> Result<Vec<usize>, String> {
            match ints_attr(node, name) {
                None => Ok(vec![default; len]),
                Some(v) if v.len() == len && v.iter().all(|&x| x >= 0) => {
                    Ok(v.iter().map(|&x| x as usize).collect())
                }
                Some(v) => Err(format!("{name} {v:?} are not {len} non-negative values")),
            }
        };
        let kernel = match ints_attr(node, "kernel_shape") {
            None => None,
            Some(_) => Some(list("kernel_shape", spatial, 1)?),
        };
        let strides = list("strides", spatial, 1)?;
        let dilations = list("dilations", spatial, 1)?;
        if strides.contains(&0) || dilations.contains(&0) {
            return Err(format!(
                "strides {strides:?} and dilations {dilations:?} must be at least 1"
            ));
        }
        let pads = match string_attr(node, "auto_pad").unwrap_or(b"NOTSET") {
            b"NOTSET" | b"" => list("pads", 2 * spatial, 0)?,
            b"VALID" => vec![0; 2 * spatial],
            other => {
                return Err(format!(
                    "auto_pad {}: give explicit pads",
                    String::from_utf8_lossy(other)
                ));
            }
        };
        Ok(Window {
            kernel,
            strides,
            dilations,
            pads,
            group: int_attr(node, "group").unwrap_or(1).max(1) as usize,
        })
    }

    /// The window without its first spatial axis (a 3-D convolution's
    /// depth, which `sim::conv3d` lowers into 2-D convolutions); the kernel
    /// is left out.
    pub fn without_first_axis(&self) -> Window {
        let spatial = self.strides.len();
        let (begins, ends) = self.pads.split_at(spatial.min(self.pads.len()));
        Window {
            kernel: None,
            strides: self.strides.iter().skip(1).copied().collect(),
            dilations: self.dilations.iter().skip(1).copied().collect(),
            pads: begins
                .iter()
                .skip(1)
                .chain(ends.iter().skip(1))
                .copied()
                .collect(),
            group: self.group,
        }
    }

    /// The attributes that write this window on a convolution node
    /// (strides, dilations, pads, group; the kernel shape when known).
    pub fn attributes(&self) -> Vec<crate::onnx::proto::AttributeProto> {
        use crate::onnx::attr::{attr_int, attr_ints};
        let ints = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
        let mut a = vec![
            attr_ints("strides", &ints(&self.strides)),
            attr_ints("dilations", &ints(&self.dilations)),
            attr_ints("pads", &ints(&self.pads)),
            attr_int("group", self.group as i64),
        ];
        if let Some(k) = &self.kernel {
            a.push(attr_ints("kernel_shape", &ints(k)));
        }
        a
    }

    /// Writes `pads` (all begins, then all ends) onto `node`, replacing
    /// what it had.
    pub fn set_pads(node: &mut NodeProto, pads: &[i64]) {
        crate::onnx::attr::set(node, crate::onnx::attr::attr_ints("pads", pads));
    }

    /// Whether any dilation is above 1.
    pub fn dilated(&self) -> bool {
        self.dilations.iter().any(|&d| d != 1)
    }

    /// `group` of `node` (at least 1) alone, for passes that need only it
    /// and take any padding (SAME included).
    pub fn group_of(node: &NodeProto) -> usize {
        int_attr(node, "group").unwrap_or(1).max(1) as usize
    }

    /// Whether `node` dilates some axis (no `dilations` means 1 on each),
    /// for passes that need only that.
    pub fn dilates(node: &NodeProto) -> bool {
        ints_attr(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1))
    }

    /// `auto_pad` of `node` (NOTSET when absent or empty).
    pub fn auto_pad(node: &NodeProto) -> AutoPad {
        match string_attr(node, "auto_pad").unwrap_or(b"NOTSET") {
            b"NOTSET" | b"" => AutoPad::NotSet,
            b"VALID" => AutoPad::Valid,
            b"SAME_UPPER" => AutoPad::SameUpper,
            b"SAME_LOWER" => AutoPad::SameLower,
            _ => AutoPad::Other,
        }
    }

    /// The `pads` attribute as written (no defaults, no checks).
    pub fn pads_as_written(node: &NodeProto) -> Option<Vec<i64>> {
        ints_attr(node, "pads")
    }

    /// The window attributes ONNX defaults that `node` leaves out, with
    /// their default values over `spatial` axes (pools have no dilations;
    /// no pads under auto_pad).
    pub fn absent_defaults(node: &NodeProto, spatial: usize) -> Vec<(&'static str, Vec<i64>)> {
        let pool = matches!(node.op_type(), "MaxPool" | "AveragePool");
        let mut defaults = vec![("strides", vec![1; spatial])];
        if !pool {
            defaults.push(("dilations", vec![1; spatial]));
        }
        if Window::auto_pad(node) == AutoPad::NotSet {
            defaults.push(("pads", vec![0; 2 * spatial]));
        }
        defaults.retain(|(name, _)| ints_attr(node, name).is_none());
        defaults
    }

    /// The number of spatial axes `kernel_shape` names (0 without it).
    pub fn kernel_rank(node: &NodeProto) -> usize {
        ints_attr(node, "kernel_shape").map_or(0, |k| k.len())
    }
}

/// A node's `auto_pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    /// Explicit pads (the default).
    NotSet,
    /// No padding.
    Valid,
    /// Padding from the input's size, the extra one at the end.
    SameUpper,
    /// Padding from the input's size, the extra one at the start.
    SameLower,
    /// A value ONNX does not define.
    Other,
}

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
        let w = Window::parse(node, 2)?;
        Ok(Window2d {
            kernel: w.kernel.map(|k| (k[0], k[1])),
            strides: (w.strides[0], w.strides[1]),
            dilations: (w.dilations[0], w.dilations[1]),
            pads: [w.pads[0], w.pads[1], w.pads[2], w.pads[3]],
            group: w.group,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::{attr_int, attr_ints, attr_string};
    use crate::onnx::builder::node;

    /// A 3-D window less its depth, written as attributes and read back:
    /// the height and width of strides, dilations and both pad ends.
    #[test]
    fn the_window_without_depth_reads_back_as_written() {
        let conv = node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![
                attr_ints("strides", &[2, 3, 4]),
                attr_ints("dilations", &[1, 2, 1]),
                attr_ints("pads", &[1, 2, 3, 4, 5, 6]),
                attr_int("group", 2),
            ],
        );
        let flat = Window::parse(&conv, 3).unwrap().without_first_axis();
        let written = node("Conv", "d", &["x", "w"], &["y"], flat.attributes());
        let back = Window::parse(&written, 2).unwrap();
        assert_eq!(back.strides, vec![3, 4]);
        assert_eq!(back.dilations, vec![2, 1]);
        assert_eq!(back.pads, vec![2, 3, 5, 6]);
        assert_eq!(back.group, 2);
        let mut padded = written.clone();
        Window::set_pads(&mut padded, &[0, 1, 0, 1]);
        assert_eq!(Window::pads_as_written(&padded), Some(vec![0, 1, 0, 1]));
    }

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

    #[test]
    fn windows_of_other_ranks() {
        let conv3d = node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![
                attr_ints("strides", &[1, 2, 2]),
                attr_ints("dilations", &[2, 1, 1]),
            ],
        );
        let w = Window::parse(&conv3d, 3).unwrap();
        assert_eq!(
            (w.strides.clone(), w.pads.clone(), w.dilated()),
            (vec![1, 2, 2], vec![0; 6], true)
        );
        assert!(
            Window::parse(&conv3d, 2).is_err(),
            "3 strides on a 2-D window"
        );
        let conv1d = node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![attr_ints("pads", &[1, 2])],
        );
        assert_eq!(Window::parse(&conv1d, 1).unwrap().pads, [1, 2]);
    }
}
