//! Elementwise arithmetic, comparisons and `Where` on tensors of any numeric
//! type, with NumPy broadcasting: integers in int64, floats in float64, the
//! result in the inputs' type (booleans for comparisons). For the small
//! values of shape arithmetic (`fold`); the native engine's float32 kernels
//! are in `sim::native_ops`.

use super::layout::{broadcast_shape, cast};
use crate::tensor::{DType, Tensor};
use ndarray::{ArrayD, IxDyn, Zip};

/// The element types this arithmetic takes.
fn numeric(t: &Tensor) -> bool {
    !matches!(t.dtype(), DType::Bool)
}

fn is_int(t: &Tensor) -> bool {
    matches!(
        t.dtype(),
        DType::I8 | DType::U8 | DType::I32 | DType::I64 | DType::U64
    )
}

fn as_i64(t: &Tensor) -> ArrayD<i64> {
    match cast(t, DType::I64.onnx_code()) {
        Ok(Tensor::I64(a)) => a,
        _ => unreachable!("every type casts to int64"),
    }
}

fn as_f64(t: &Tensor) -> ArrayD<f64> {
    ArrayD::from_shape_vec(IxDyn(t.shape()), t.to_f64_vec()).expect("same size")
}

/// `f(a, b)` over the broadcast shape.
fn zip2<T: Copy, U>(
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: impl Fn(T, T) -> U,
) -> Result<ArrayD<U>, String> {
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        )
    })?;
    let (a, b) = (
        a.broadcast(IxDyn(&shape)).expect("checked"),
        b.broadcast(IxDyn(&shape)).expect("checked"),
    );
    Ok(Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y)))
}

/// A binary ONNX operator (`Add`, `Sub`, `Mul`, `Div`, `Max`, `Min`, `Pow`,
/// `Mod`, `Equal`, `Less`, `Greater`, `LessOrEqual`, `GreaterOrEqual`), or
/// `None` when `op` is none of these.
pub fn binary(op: &str, a: &Tensor, b: &Tensor) -> Option<Result<Tensor, String>> {
    let compare = |x: f64, y: f64| match op {
        "Equal" => Some(x == y),
        "Less" => Some(x < y),
        "Greater" => Some(x > y),
        "LessOrEqual" => Some(x <= y),
        "GreaterOrEqual" => Some(x >= y),
        _ => None,
    };
    if compare(0.0, 0.0).is_some() {
        if a.dtype() != b.dtype() {
            return Some(Err(format!("{op} of {} and {}", a.dtype(), b.dtype())));
        }
        return Some(
            zip2(&as_f64(a), &as_f64(b), |x, y| {
                compare(x, y).expect("a comparison")
            })
            .map(Tensor::Bool),
        );
    }
    if !["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Mod"].contains(&op) {
        return None;
    }
    if !numeric(a) || a.dtype() != b.dtype() && op != "Pow" {
        return Some(Err(format!("{op} of {} and {}", a.dtype(), b.dtype())));
    }
    let result = if is_int(a) && op != "Pow" {
        zip2(&as_i64(a), &as_i64(b), |x, y| match op {
            "Add" => Some(x.wrapping_add(y)),
            "Sub" => Some(x.wrapping_sub(y)),
            "Mul" => Some(x.wrapping_mul(y)),
            // Integer division truncates toward zero, as ONNX's does.
            "Div" => x.checked_div(y),
            // Mod without fmod takes the divisor's sign (Python's %).
            "Mod" => x.checked_rem(y).map(|r| {
                if r != 0 && (r < 0) != (y < 0) {
                    r + y
                } else {
                    r
                }
            }),
            "Max" => Some(x.max(y)),
            _ => Some(x.min(y)),
        })
        .and_then(|v| {
            let v: Option<Vec<i64>> = v.iter().copied().collect();
            let v = v.ok_or_else(|| format!("{op} by zero"))?;
            cast(
                &Tensor::I64(
                    ArrayD::from_shape_vec(
                        IxDyn(&broadcast_shape(a.shape(), b.shape()).expect("checked")),
                        v,
                    )
                    .expect("same size"),
                ),
                a.dtype().onnx_code(),
            )
        })
    } else {
        zip2(&as_f64(a), &as_f64(b), |x, y| match op {
            "Add" => x + y,
            "Sub" => x - y,
            "Mul" => x * y,
            "Div" => x / y,
            "Pow" => x.powf(y),
            "Mod" => x - y * (x / y).floor(),
            "Max" => x.max(y),
            _ => x.min(y),
        })
        .and_then(|v| cast(&Tensor::F64(v), a.dtype().onnx_code()))
    };
    Some(result)
}

/// A unary ONNX operator (`Neg`, `Abs`, `Ceil`, `Floor`, `Round`, `Sqrt`,
/// `Reciprocal`, `Not`), or `None` when `op` is none of these.
pub fn unary(op: &str, x: &Tensor) -> Option<Result<Tensor, String>> {
    if op == "Not" {
        return Some(match x {
            Tensor::Bool(a) => Ok(Tensor::Bool(a.mapv(|v| !v))),
            other => Err(format!("Not of {}", other.dtype())),
        });
    }
    let f: fn(f64) -> f64 = match op {
        "Neg" => |v| -v,
        "Abs" => f64::abs,
        "Ceil" => f64::ceil,
        "Floor" => f64::floor,
        "Round" => f64::round_ties_even,
        "Sqrt" => f64::sqrt,
        "Reciprocal" => |v| 1.0 / v,
        _ => return None,
    };
    if !numeric(x) {
        return Some(Err(format!("{op} of {}", x.dtype())));
    }
    if is_int(x) {
        let v = as_i64(x).mapv(|v| f(v as f64) as i64);
        return Some(cast(&Tensor::I64(v), x.dtype().onnx_code()));
    }
    Some(cast(&Tensor::F64(as_f64(x).mapv(f)), x.dtype().onnx_code()))
}

/// `Where(condition, a, b)` with broadcasting over all three.
pub fn where_(condition: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    let Tensor::Bool(c) = condition else {
        return Err(format!(
            "Where's condition is {}, not bool",
            condition.dtype()
        ));
    };
    if a.dtype() != b.dtype() {
        return Err(format!("Where of {} and {}", a.dtype(), b.dtype()));
    }
    let shape = broadcast_shape(c.shape(), a.shape())
        .and_then(|s| broadcast_shape(&s, b.shape()))
        .ok_or("Where's inputs do not broadcast")?;
    let c = c.broadcast(IxDyn(&shape)).expect("checked");
    macro_rules! pick {
        ($variant:ident, $x:ident) => {{
            let Tensor::$variant(y) = b else {
                unreachable!("same type")
            };
            let (x, y) = (
                $x.broadcast(IxDyn(&shape)).expect("checked"),
                y.broadcast(IxDyn(&shape)).expect("checked"),
            );
            Tensor::$variant(Zip::from(&c).and(&x).and(&y).map_collect(
                |&k, p, q| {
                    if k { *p } else { *q }
                },
            ))
        }};
    }
    Ok(match a {
        Tensor::F32(x) => pick!(F32, x),
        Tensor::F16(x) => pick!(F16, x),
        Tensor::F64(x) => pick!(F64, x),
        Tensor::I8(x) => pick!(I8, x),
        Tensor::U8(x) => pick!(U8, x),
        Tensor::I32(x) => pick!(I32, x),
        Tensor::I64(x) => pick!(I64, x),
        Tensor::U64(x) => pick!(U64, x),
        Tensor::Bool(x) => pick!(Bool, x),
    })
}

/// Trilu: the values on and above diagonal `k` of the last two axes
/// (`upper`), or on and below it, zeros elsewhere (causal attention masks).
pub fn trilu(x: &Tensor, k: i64, upper: bool) -> Result<Tensor, String> {
    let s = x.shape();
    if s.len() < 2 {
        return Err(format!(
            "Trilu of a rank-{} value needs rank 2 or more",
            s.len()
        ));
    }
    let (n, m) = (s[s.len() - 2], s[s.len() - 1]);
    let keep = ArrayD::from_shape_fn(IxDyn(&[n, m]), |ix| {
        let above = ix[1] as i64 - ix[0] as i64;
        if upper { above >= k } else { above <= k }
    });
    let zero = cast(
        &Tensor::F32(ArrayD::zeros(IxDyn(&[]))),
        x.dtype().onnx_code(),
    )?;
    where_(&Tensor::Bool(keep), x, &zero)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trilu_keeps_a_triangle_by_hand() {
        let x = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[3, 3]), (1..=9).collect()).unwrap());
        let upper = trilu(&x, 0, true).unwrap();
        let ints = |t: &Tensor| super::super::ints_of(t).unwrap();
        assert_eq!(ints(&upper), [1, 2, 3, 0, 5, 6, 0, 0, 9]);
        // Lower from the first diagonal below the main one (causal mask minus the diagonal).
        let lower = trilu(&x, -1, false).unwrap();
        assert_eq!(ints(&lower), [0, 0, 0, 4, 0, 0, 7, 8, 0]);
        let f = Tensor::F32(ArrayD::from_elem(IxDyn(&[2, 2, 3]), 1.0));
        let up1 = trilu(&f, 1, true).unwrap();
        assert_eq!(
            up1.as_f32().unwrap().as_slice().unwrap(),
            &[0., 1., 1., 0., 0., 1., 0., 1., 1., 0., 0., 1.]
        );
    }

    fn ints(v: &[i64]) -> Tensor {
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
    }

    #[test]
    fn integer_arithmetic_is_onnxs() {
        let r = binary("Div", &ints(&[7, -7]), &ints(&[2]))
            .unwrap()
            .unwrap();
        assert_eq!(r.to_f64_vec(), [3.0, -3.0]);
        let r = binary("Mod", &ints(&[7, -7]), &ints(&[3]))
            .unwrap()
            .unwrap();
        assert_eq!(r.to_f64_vec(), [1.0, 2.0]);
        assert!(binary("Div", &ints(&[1]), &ints(&[0])).unwrap().is_err());
        let r = binary("Max", &ints(&[-1, 5]), &ints(&[0]))
            .unwrap()
            .unwrap();
        assert_eq!((r.dtype(), r.to_f64_vec()), (DType::I64, vec![0.0, 5.0]));
        let c = binary("Less", &ints(&[1, 5]), &ints(&[3]))
            .unwrap()
            .unwrap();
        let w = where_(&c, &ints(&[10, 20]), &ints(&[-1])).unwrap();
        assert_eq!(w.to_f64_vec(), [10.0, -1.0]);
        assert!(binary("Gather", &ints(&[1]), &ints(&[1])).is_none());
    }

    #[test]
    fn float_unary_keeps_its_type() {
        let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.5, -0.5]).unwrap());
        let r = unary("Ceil", &x).unwrap().unwrap();
        assert_eq!((r.dtype(), r.to_f64_vec()), (DType::F32, vec![2.0, -0.0]));
    }
}
