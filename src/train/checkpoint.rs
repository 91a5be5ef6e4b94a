//! QAT checkpoints: everything a run needs to continue exactly where it
//! stopped — the step, the losses so far, the trained weights, the clips and
//! both optimizers' states — in one file: the magic `AQCK1\n`, a JSON header
//! line (names, shapes, counts), then the float32 values little-endian in
//! the header's order. Reading checks every length against the file.

use serde::{Deserialize, Serialize};
use std::path::Path;

const MAGIC: &[u8] = b"AQCK1\n";

/// One Adam optimizer's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamState {
    /// Steps taken.
    pub step: i32,
    /// (first, second) moments per parameter buffer.
    pub moments: Vec<(Vec<f32>, Vec<f32>)>,
}

/// The state of a QAT run after `step` steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// Steps done.
    pub step: usize,
    /// Loss of every step done.
    pub losses: Vec<f64>,
    /// Trained constants: name, shape, values.
    pub constants: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Clips per quantized layer: name, clip_min, clip_max.
    pub clips: Vec<(String, f32, f32)>,
    /// The weights' optimizer.
    pub weights_opt: AdamState,
    /// The clips' optimizer.
    pub clips_opt: AdamState,
}

#[derive(Serialize, Deserialize)]
struct Header {
    step: usize,
    losses: Vec<f64>,
    constants: Vec<(String, Vec<usize>)>,
    clips: Vec<(String, f32, f32)>,
    weights_opt: (i32, Vec<usize>),
    clips_opt: (i32, Vec<usize>),
}

fn moments_lengths(a: &AdamState) -> Vec<usize> {
    a.moments.iter().map(|(m, _)| m.len()).collect()
}

impl Checkpoint {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = Header {
            step: self.step,
            losses: self.losses.clone(),
            constants: self
                .constants
                .iter()
                .map(|(n, s, _)| (n.clone(), s.clone()))
                .collect(),
            clips: self.clips.clone(),
            weights_opt: (self.weights_opt.step, moments_lengths(&self.weights_opt)),
            clips_opt: (self.clips_opt.step, moments_lengths(&self.clips_opt)),
        };
        let mut out = MAGIC.to_vec();
        out.extend(
            serde_json::to_string(&header)
                .unwrap_or_default()
                .into_bytes(),
        );
        out.push(b'\n');
        let mut put = |v: &[f32]| {
            for x in v {
                out.extend(x.to_le_bytes());
            }
        };
        for (_, _, v) in &self.constants {
            put(v);
        }
        for opt in [&self.weights_opt, &self.clips_opt] {
            for (m, v) in &opt.moments {
                put(m);
                put(v);
            }
        }
        out
    }

    /// Parses a checkpoint file's bytes; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Checkpoint, String> {
        let bad = |why: &str| format!("{origin}: not a usable ascend-quant QAT checkpoint: {why}");
        let rest = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("wrong magic"))?;
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("no header"))?;
        let header: Header =
            serde_json::from_slice(&rest[..end]).map_err(|e| bad(&format!("header: {e}")))?;
        let mut data = &rest[end + 1..];
        let mut take = |n: usize| -> Result<Vec<f32>, String> {
            let bytes = n.checked_mul(4).ok_or_else(|| bad("absurd size"))?;
            if data.len() < bytes {
                return Err(bad("truncated"));
            }
            let (head, tail) = data.split_at(bytes);
            data = tail;
            Ok(head
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut constants = Vec::new();
        for (name, shape) in header.constants {
            let n = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad("absurd shape"))?;
            constants.push((name, shape, take(n)?));
        }
        let mut opts = Vec::new();
        for (step, lengths) in [header.weights_opt, header.clips_opt] {
            let mut moments = Vec::new();
            for n in lengths {
                moments.push((take(n)?, take(n)?));
            }
            opts.push(AdamState { step, moments });
        }
        if !data.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let clips_opt = opts.pop().unwrap_or_default();
        let weights_opt = opts.pop().unwrap_or_default();
        Ok(Checkpoint {
            step: header.step,
            losses: header.losses,
            constants,
            clips: header.clips,
            weights_opt,
            clips_opt,
        })
    }

    /// Writes the checkpoint atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::fsutil::write_atomic(path, &self.to_bytes())
    }

    /// Reads a checkpoint file.
    pub fn load(path: &Path) -> Result<Checkpoint, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Checkpoint::from_bytes(&bytes, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let c = Checkpoint {
            step: 7,
            losses: vec![1.5, 0.25],
            constants: vec![("w".into(), vec![2, 2], vec![1.0, -2.0, 3.5, 0.0])],
            clips: vec![("conv".into(), 0.0, 6.0)],
            weights_opt: AdamState {
                step: 7,
                moments: vec![(vec![0.1; 4], vec![0.2; 4])],
            },
            clips_opt: AdamState {
                step: 7,
                moments: vec![(vec![0.3, 0.4], vec![0.5, 0.6])],
            },
        };
        let bytes = c.to_bytes();
        assert_eq!(Checkpoint::from_bytes(&bytes, "c").unwrap(), c);
        for cut in [3, bytes.len() - 1] {
            assert!(Checkpoint::from_bytes(&bytes[..cut], "c").is_err());
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(
            Checkpoint::from_bytes(&extra, "c")
                .unwrap_err()
                .contains("trailing")
        );
    }
}
