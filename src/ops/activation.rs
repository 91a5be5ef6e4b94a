//! Activations and other float operators of one input, value by value,
//! with their attributes read once (`alpha`, `beta`): the native engine
//! applies them, the trainer reads their parameters from them.

use crate::onnx::NodeProto;
use crate::onnx::attr::{float_attr, int_attr};

/// Float operators of one input, value by value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// tanh
    Tanh,
    /// e^x
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// −x
    Neg,
    /// |x|
    Abs,
    /// 1 / x
    Reciprocal,
    /// ⌊x⌋
    Floor,
    /// ⌈x⌉
    Ceil,
    /// x, or alpha·x below 0
    LeakyRelu(f32),
    /// max(0, min(1, alpha·x + beta))
    HardSigmoid(f32, f32),
    /// x · max(0, min(1, x/6 + 1/2))
    HardSwish,
    /// x, or alpha·(e^x − 1) below 0
    Elu(f32),
    /// ln(1 + e^x)
    Softplus,
    /// The error function (GELU's exact form uses it)
    Erf,
    /// x · (1 + erf(x / √2)) / 2 (ONNX's Gelu, opset 20, `approximate` none)
    Gelu,
    /// GELU's tanh form: x · (1 + tanh(√(2/π) · (x + 0.044715 x³))) / 2
    GeluTanh,
}

impl Unary {
    /// The operator applied to one value.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Unary::Tanh => x.tanh(),
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Sqrt => x.sqrt(),
            Unary::Neg => -x,
            Unary::Abs => x.abs(),
            Unary::Reciprocal => 1.0 / x,
            Unary::Floor => x.floor(),
            Unary::Ceil => x.ceil(),
            Unary::LeakyRelu(a) => {
                if x < 0.0 {
                    a * x
                } else {
                    x
                }
            }
            Unary::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Unary::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Unary::Elu(a) => {
                if x < 0.0 {
                    a * (x.exp() - 1.0)
                } else {
                    x
                }
            }
            Unary::Softplus => x.exp().ln_1p(),
            Unary::Erf => erf(x),
            Unary::Gelu => 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
            Unary::GeluTanh => {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044_715 * x * x * x)).tanh())
            }
        }
    }

    /// The derivative d apply(x) / dx at `x`, as training back-propagates it
    /// (0 for the piecewise-constant Floor and Ceil; at a kink, the right
    /// side's slope except where ONNX's clamps make the value constant).
    pub fn derivative(self, x: f32) -> f32 {
        let gauss = |z: f32| (-z * z).exp() * std::f32::consts::FRAC_2_SQRT_PI;
        match self {
            Unary::Tanh => 1.0 - x.tanh().powi(2),
            Unary::Exp => x.exp(),
            Unary::Log => 1.0 / x,
            Unary::Sqrt => 0.5 / x.sqrt(),
            Unary::Neg => -1.0,
            Unary::Abs => {
                if x < 0.0 {
                    -1.0
                } else {
                    1.0
                }
            }
            Unary::Reciprocal => -1.0 / (x * x),
            Unary::Floor | Unary::Ceil => 0.0,
            Unary::LeakyRelu(a) => {
                if x < 0.0 {
                    a
                } else {
                    1.0
                }
            }
            Unary::HardSigmoid(a, b) => {
                let t = a * x + b;
                if t > 0.0 && t < 1.0 { a } else { 0.0 }
            }
            Unary::HardSwish => {
                if x <= -3.0 {
                    0.0
                } else if x >= 3.0 {
                    1.0
                } else {
                    x / 3.0 + 0.5
                }
            }
            Unary::Elu(a) => {
                if x < 0.0 {
                    a * x.exp()
                } else {
                    1.0
                }
            }
            Unary::Softplus => 1.0 / (1.0 + (-x).exp()),
            Unary::Erf => gauss(x),
            Unary::Gelu => {
                let r = x / std::f32::consts::SQRT_2;
                0.5 * (1.0 + erf(r)) + 0.5 * x * gauss(r) / std::f32::consts::SQRT_2
            }
            Unary::GeluTanh => {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                let t = (c * (x + 0.044_715 * x * x * x)).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044_715 * x * x)
            }
        }
    }

    /// The operator of an ONNX node, with its attributes.
    pub fn of(node: &NodeProto) -> Option<Unary> {
        let alpha = |default: f32| float_attr(node, "alpha").unwrap_or(default);
        Some(match node.op_type() {
            "Tanh" => Unary::Tanh,
            "Exp" => Unary::Exp,
            "Log" => Unary::Log,
            "Sqrt" => Unary::Sqrt,
            "Neg" => Unary::Neg,
            "Abs" => Unary::Abs,
            "Reciprocal" => Unary::Reciprocal,
            "Floor" => Unary::Floor,
            "Ceil" => Unary::Ceil,
            "LeakyRelu" => Unary::LeakyRelu(alpha(0.01)),
            "HardSigmoid" => {
                Unary::HardSigmoid(alpha(0.2), float_attr(node, "beta").unwrap_or(0.5))
            }
            "HardSwish" => Unary::HardSwish,
            "Elu" => Unary::Elu(alpha(1.0)),
            "Softplus" => Unary::Softplus,
            "Erf" => Unary::Erf,
            "Gelu" => match crate::onnx::attr::string_attr(node, "approximate") {
                None | Some(b"none") => Unary::Gelu,
                Some(b"tanh") => Unary::GeluTanh,
                Some(_) => return None,
            },
            _ => return None,
        })
    }
}

/// The error function in f32 to within 5e-7 absolute: its Taylor series
/// below 0.5, else Abramowitz & Stegun's 7.1.26 (error under 1.5e-7), ±1
/// from 4 on.
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    if z < 0.5 {
        // 2/√π · (x − x³/3 + x⁵/10 − x⁷/42 + x⁹/216 − x¹¹/1320), Horner in x².
        let x2 = x * x;
        let series = 1.0
            + x2 * (-1.0 / 3.0
                + x2 * (1.0 / 10.0 + x2 * (-1.0 / 42.0 + x2 * (1.0 / 216.0 - x2 / 1320.0))));
        return x * series * std::f32::consts::FRAC_2_SQRT_PI;
    }
    if z >= 4.0 {
        // 1 − erf(4) is 1.5e-8, below f32's resolution at 1; and e^(−z²)
        // would soon be subnormal, which costs a hundred cycles a value.
        return 1f32.copysign(x);
    }
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * (-z * z).exp()).copysign(x)
}

/// Clip's `min` and `max` attributes (before opset 11; later they are inputs).
pub fn clip_attributes(node: &NodeProto) -> (Option<f32>, Option<f32>) {
    (float_attr(node, "min"), float_attr(node, "max"))
}

/// Softmax's axis in the opset's semantics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Softmax {
    /// The axis (negative counts from the end).
    pub axis: i64,
    /// Before opset 13: the input is flattened to 2-D at `axis` and the
    /// softmax runs over everything from `axis` on.
    pub flattened: bool,
}

impl Softmax {
    /// The softmax of `node` under `opset` (default axis 1 before 13, −1 from 13).
    pub fn parse(node: &NodeProto, opset: i64) -> Softmax {
        let flattened = opset < 13;
        let default = if flattened { 1 } else { -1 };
        Softmax {
            axis: int_attr(node, "axis").unwrap_or(default),
            flattened,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Unary;
    use crate::onnx::attr::attr_float;
    use crate::onnx::builder::node;

    #[test]
    fn attributes_and_defaults_follow_onnx() {
        let hs = node("HardSigmoid", "h", &["x"], &["y"], vec![]);
        assert_eq!(Unary::of(&hs), Some(Unary::HardSigmoid(0.2, 0.5)));
        // By hand: max(0, min(1, 0.2·1 + 0.5)) = 0.7.
        assert!((Unary::of(&hs).unwrap().apply(1.0) - 0.7).abs() < 1e-7);
        let lr = node(
            "LeakyRelu",
            "l",
            &["x"],
            &["y"],
            vec![attr_float("alpha", 0.1)],
        );
        assert_eq!(Unary::of(&lr).unwrap().apply(-2.0), -0.2);
        assert_eq!(
            Unary::of(&node("Elu", "e", &["x"], &["y"], vec![])),
            Some(Unary::Elu(1.0))
        );
        assert_eq!(Unary::of(&node("Relu6", "r", &["x"], &["y"], vec![])), None);
    }

    #[test]
    fn erf_matches_tabulated_values() {
        // Values from the series to 16 digits (Abramowitz & Stegun, table 7.1).
        let table: [(f64, f64); 6] = [
            (0.1, 0.112_462_916_018_285),
            (0.5, 0.520_499_877_813_047),
            (1.0, 0.842_700_792_949_715),
            (2.0, 0.995_322_265_018_953),
            (-1.5, -0.966_105_146_475_311),
            (0.0, 0.0),
        ];
        for (x, want) in table {
            let got = f64::from(super::erf(x as f32));
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}");
        }
        assert_eq!(
            Unary::of(&node("Erf", "e", &["x"], &["y"], vec![])),
            Some(Unary::Erf)
        );
    }

    #[test]
    fn gelu_forms_by_hand() {
        let exact = node("Gelu", "g", &["x"], &["y"], vec![]);
        assert_eq!(Unary::of(&exact), Some(Unary::Gelu));
        // GELU(1) = (1 + erf(1/√2)) / 2 = 0.841344746.
        assert!((Unary::Gelu.apply(1.0) - 0.841_344_7).abs() < 1e-6);
        let tanh = node(
            "Gelu",
            "g",
            &["x"],
            &["y"],
            vec![crate::onnx::attr::attr_string("approximate", "tanh")],
        );
        assert_eq!(Unary::of(&tanh), Some(Unary::GeluTanh));
        // tanh form at 1: (1 + tanh(0.7978846 · 1.044715)) / 2 = 0.841191990.
        assert!((Unary::GeluTanh.apply(1.0) - 0.841_192).abs() < 1e-6);
    }

    #[test]
    fn softmax_axis_follows_the_opset() {
        let plain = node("Softmax", "s", &["x"], &["y"], vec![]);
        let s = super::Softmax::parse(&plain, 13);
        assert_eq!((s.axis, s.flattened), (-1, false));
        let s = super::Softmax::parse(&plain, 11);
        assert_eq!((s.axis, s.flattened), (1, true));
    }

    /// Every derivative against a central finite difference in f64 of the
    /// operator's own value, away from kinks.
    #[test]
    fn derivatives_match_finite_differences() {
        let ops = [
            Unary::Tanh,
            Unary::Exp,
            Unary::Log,
            Unary::Sqrt,
            Unary::Neg,
            Unary::Abs,
            Unary::Reciprocal,
            Unary::LeakyRelu(0.1),
            Unary::HardSigmoid(0.2, 0.5),
            Unary::HardSwish,
            Unary::Elu(1.0),
            Unary::Softplus,
            Unary::Erf,
            Unary::Gelu,
            Unary::GeluTanh,
        ];
        for op in ops {
            for x in [-2.3f32, -0.7, 0.31, 1.2, 2.6] {
                if matches!(op, Unary::Log | Unary::Sqrt) && x <= 0.0 {
                    continue;
                }
                let h = 1e-3f32;
                let numeric = (f64::from(op.apply(x + h)) - f64::from(op.apply(x - h)))
                    / (2.0 * f64::from(h));
                let exact = f64::from(op.derivative(x));
                assert!(
                    (numeric - exact).abs() < 2e-3 * (1.0 + exact.abs()),
                    "{op:?} at {x}: {exact} vs {numeric}"
                );
            }
        }
        assert_eq!(Unary::Floor.derivative(1.5), 0.0);
    }
}
