//! Gemm's attributes (`transA`, `transB`, `alpha`, `beta`), read and checked
//! once for every engine and pass: Y = alpha · op(A) · op(B) + beta · C.

use crate::onnx::NodeProto;
use crate::onnx::attr::{float_attr, int_attr};

/// A Gemm node's attributes, defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// `transA`: A is read transposed.
    pub trans_a: bool,
    /// `transB`: B is read transposed (its rows are the outputs).
    pub trans_b: bool,
    /// `alpha`, the product's factor.
    pub alpha: f32,
    /// `beta`, the bias's factor.
    pub beta: f32,
}

impl Gemm {
    /// The attributes of `node`; an error for a `transA`/`transB` other
    /// than 0 or 1.
    pub fn parse(node: &NodeProto) -> Result<Gemm, String> {
        let flag = |name: &str| match int_attr(node, name).unwrap_or(0) {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("{name} = {v}; it must be 0 or 1")),
        };
        Ok(Gemm {
            trans_a: flag("transA")?,
            trans_b: flag("transB")?,
            alpha: float_attr(node, "alpha").unwrap_or(1.0),
            beta: float_attr(node, "beta").unwrap_or(1.0),
        })
    }

    /// Whether it is `A · op(B) + C`: A not transposed, alpha and beta 1,
    /// the form the engines' kernels and quantization take.
    pub fn is_plain_product(&self) -> bool {
        !self.trans_a && self.alpha == 1.0 && self.beta == 1.0
    }

    /// B's dimensions as (inputs, outputs), given its stored dims.
    pub fn weight_k_n(&self, rows: usize, cols: usize) -> (usize, usize) {
        if self.trans_b {
            (cols, rows)
        } else {
            (rows, cols)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::{attr_float, attr_int};
    use crate::onnx::builder::node;

    #[test]
    fn defaults_flags_and_bad_flags() {
        let plain = node("Gemm", "g", &["a", "b"], &["y"], vec![]);
        let g = Gemm::parse(&plain).unwrap();
        assert!(g.is_plain_product() && !g.trans_b);
        assert_eq!(g.weight_k_n(3, 5), (3, 5));
        let t = node(
            "Gemm",
            "g",
            &["a", "b"],
            &["y"],
            vec![attr_int("transB", 1), attr_float("beta", 0.5)],
        );
        let g = Gemm::parse(&t).unwrap();
        assert!(g.trans_b && !g.is_plain_product());
        assert_eq!(g.weight_k_n(3, 5), (5, 3));
        let bad = node(
            "Gemm",
            "g",
            &["a", "b"],
            &["y"],
            vec![attr_int("transA", 2)],
        );
        assert_eq!(
            Gemm::parse(&bad).unwrap_err(),
            "transA = 2; it must be 0 or 1"
        );
    }
}
