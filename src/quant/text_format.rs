//! Protobuf text format in the layout AMCT's files use (that of protobuf's
//! C++ printer): one `field: value` per line, a repeated field as one line
//! per value, a nested message as `field {` … `}`, two spaces of indent per
//! level, floats in their shortest round-trip form written like C's `%g`
//! (`0.0125`, `4.198479e-05`). Reading needs nothing of ours: the text
//! format parser takes this layout and the compact list one alike.

use prost_reflect::{DynamicMessage, Value};
use std::fmt::Write;

/// The text of `msg` in AMCT's layout, ending with a newline.
pub fn amct_text(msg: &DynamicMessage) -> String {
    let mut out = String::new();
    write_fields(&mut out, msg, 0);
    out
}

fn write_fields(out: &mut String, msg: &DynamicMessage, depth: usize) {
    for (field, value) in msg.fields() {
        let values: Vec<&Value> = match value {
            Value::List(items) => items.iter().collect(),
            other => vec![other],
        };
        for v in values {
            indent(out, depth);
            match v {
                Value::Message(m) => {
                    out.push_str(field.name());
                    out.push_str(" {\n");
                    write_fields(out, m, depth + 1);
                    indent(out, depth);
                    out.push_str("}\n");
                }
                scalar => {
                    out.push_str(field.name());
                    out.push_str(": ");
                    write_scalar(out, scalar, &field);
                    out.push('\n');
                }
            }
        }
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn write_scalar(out: &mut String, v: &Value, field: &prost_reflect::FieldDescriptor) {
    let _ = match v {
        Value::Bool(b) => write!(out, "{b}"),
        Value::I32(i) => write!(out, "{i}"),
        Value::I64(i) => write!(out, "{i}"),
        Value::U32(i) => write!(out, "{i}"),
        Value::U64(i) => write!(out, "{i}"),
        Value::F32(f) => write!(out, "{}", shortest_g(f64::from(*f), &format!("{f:e}"))),
        Value::F64(f) => write!(out, "{}", shortest_g(*f, &format!("{f:e}"))),
        Value::String(s) => write!(out, "\"{}\"", escape(s.as_bytes())),
        Value::Bytes(b) => write!(out, "\"{}\"", escape(b)),
        Value::EnumNumber(n) => match field.kind().as_enum().and_then(|e| e.get_value(*n)) {
            Some(e) => write!(out, "{}", e.name()),
            None => write!(out, "{n}"),
        },
        Value::List(_) | Value::Map(_) | Value::Message(_) => Ok(()),
    };
}

/// `%g` of a float's shortest round-trip digits: fixed notation for
/// exponents from −4 up to the digit count, scientific (`e-05`) otherwise;
/// `sci` is Rust's `{:e}` of the value (`4.198479e-5`).
fn shortest_g(v: f64, sci: &str) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let precision = digits.len() as i32;
    if v == 0.0 {
        return format!("{sign}0");
    }
    if exp < -4 || exp >= precision.max(1) {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{dot}{rest}e{esign}{:02}", exp.abs());
    }
    if exp < 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
    } else {
        let (int, frac) = digits.split_at((exp + 1) as usize);
        let dot = if frac.is_empty() { "" } else { "." };
        format!("{sign}{int}{dot}{frac}")
    }
}

/// C-style escapes for a quoted string.
fn escape(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            // UTF-8 and control bytes as octal, as protobuf's printer writes them.
            _ => {
                let _ = write!(s, "\\{b:03o}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::shortest_g;

    fn g(v: f32) -> String {
        shortest_g(f64::from(v), &format!("{v:e}"))
    }

    #[test]
    fn floats_print_like_c_percent_g_with_round_trip_digits() {
        // Expected strings as C's printf("%g") writes these values at
        // their shortest round-trip precision.
        assert_eq!(g(0.0125), "0.0125");
        assert_eq!(g(4.198_479e-5), "4.198479e-05");
        assert_eq!(g(1.0), "1");
        assert_eq!(g(-2.5), "-2.5");
        assert_eq!(g(123_456.0), "123456");
        assert_eq!(g(1.5e10), "1.5e+10");
        assert_eq!(g(0.0001), "0.0001");
        assert_eq!(g(0.0), "0");
        for v in [0.079_848_15f32, 3.3e-9, 7.123_456_7, 65_504.0] {
            assert_eq!(g(v).parse::<f32>().unwrap(), v, "round trip of {v}");
        }
    }
}
