//! The search for the layers to keep in float: AMCT's worst-first binary
//! search over how many of the most sensitive layers to roll back, then a
//! refinement pass that re-enables rolled-back layers one at a time, least
//! sensitive first, while the target still holds.

use serde::Serialize;
use std::time::Instant;

/// One configuration tried.
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    /// Layers kept in float.
    pub rolled_back: Vec<String>,
    /// Its metric.
    pub metric: f64,
    /// Whether it met the target.
    pub passed: bool,
    /// Seconds the evaluation took.
    pub seconds: f64,
    /// Which step of the search tried it.
    pub step: &'static str,
}

/// The result of the search.
#[derive(Clone, Debug)]
pub struct SearchOutcome {
    /// Layers to keep in float in the chosen configuration.
    pub rolled_back: Vec<String>,
    /// Its metric.
    pub metric: f64,
    /// Whether it meets the target.
    pub passed: bool,
    /// Every configuration tried, in order.
    pub history: Vec<Trial>,
}

/// Finds a small set of layers to keep in float so that `score(set) >= target`.
///
/// `ranked` lists layer names worst (most sensitive) first; `score` evaluates
/// the configuration keeping the given layers in float.
pub fn search<E>(
    ranked: &[String],
    target: f64,
    mut score: impl FnMut(&[String]) -> Result<f64, E>,
) -> Result<SearchOutcome, E> {
    let mut history: Vec<Trial> = Vec::new();
    let mut try_set = |set: Vec<String>,
                       step: &'static str,
                       history: &mut Vec<Trial>|
     -> Result<(f64, bool), E> {
        let started = Instant::now();
        let metric = score(&set)?;
        let passed = metric >= target;
        history.push(Trial {
            rolled_back: set,
            metric,
            passed,
            seconds: started.elapsed().as_secs_f64(),
            step,
        });
        Ok((metric, passed))
    };
    let (m0, ok0) = try_set(Vec::new(), "all layers quantized", &mut history)?;
    if ok0 || ranked.is_empty() {
        return Ok(SearchOutcome {
            rolled_back: Vec::new(),
            metric: m0,
            passed: ok0,
            history,
        });
    }
    // Smallest k in [1, n] whose worst-k roll-back passes, assuming monotonicity.
    let n = ranked.len();
    let (mut left, mut right) = (1usize, n);
    let mut best: Option<(usize, f64)> = None;
    while left <= right {
        let mid = (left + right) / 2;
        let (m, ok) = try_set(ranked[..mid].to_vec(), "binary search", &mut history)?;
        if ok {
            best = Some((mid, m));
            right = mid - 1;
        } else {
            left = mid + 1;
        }
    }
    let Some((k, metric)) = best else {
        let top = history
            .iter()
            .max_by(|a, b| a.metric.total_cmp(&b.metric))
            .expect("tried at least one")
            .clone();
        return Ok(SearchOutcome {
            rolled_back: top.rolled_back,
            metric: top.metric,
            passed: false,
            history,
        });
    };
    // Refinement: give back to quantization whatever the target allows, least sensitive first.
    let mut kept: Vec<String> = ranked[..k].to_vec();
    let mut metric = metric;
    for candidate in ranked[..k].iter().rev() {
        if kept.len() <= 1 && k == 1 {
            break; // with one layer rolled back, re-enabling it is the all-quantized run that failed
        }
        let trial: Vec<String> = kept.iter().filter(|l| *l != candidate).cloned().collect();
        let (m, ok) = try_set(trial.clone(), "refinement", &mut history)?;
        if ok {
            kept = trial;
            metric = m;
        }
    }
    Ok(SearchOutcome {
        rolled_back: kept,
        metric,
        passed: true,
        history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("l{i}")).collect()
    }

    #[test]
    fn finds_the_one_bad_layer_even_when_it_is_not_ranked_first() {
        // Only l2 hurts: any set containing it passes.
        let ranked = names(6);
        let out = search::<()>(&ranked, 90.0, |set| {
            Ok(if set.iter().any(|l| l == "l2") {
                95.0
            } else {
                80.0
            })
        })
        .unwrap();
        assert!(out.passed);
        assert_eq!(out.rolled_back, vec!["l2".to_string()]);
        // The binary search evaluations are logarithmic, the refinement linear in k.
        assert!(out.history.len() <= 1 + 3 + 3, "{}", out.history.len());
    }

    #[test]
    fn nothing_rolled_back_when_everything_passes() {
        let out = search::<()>(&names(4), 90.0, |_| Ok(99.0)).unwrap();
        assert!(out.passed && out.rolled_back.is_empty());
        assert_eq!(out.history.len(), 1);
    }

    #[test]
    fn reports_failure_with_the_best_configuration() {
        let out = search::<()>(&names(3), 90.0, |set| Ok(50.0 + set.len() as f64)).unwrap();
        assert!(!out.passed);
        assert_eq!(out.rolled_back.len(), 3);
        assert_eq!(out.metric, 53.0);
    }
}
