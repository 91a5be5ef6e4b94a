//! AMCT's priority of per-layer settings, shared by every configuration
//! reader (the JSON configurations, the simple config, the retrain simple
//! config): a layer takes the common settings, then those for its operator
//! type, then those named for it, each over the one before; and one set of
//! refusals for names and lists that do not match the model.

/// Where a setting for one layer came from, lowest priority first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The settings every layer takes (`common_config`, the top level).
    Common,
    /// The settings of one operator type (`override_layer_types`).
    Type,
    /// The settings named for one layer (`override_layer_configs`).
    Layer,
}

/// The settings of one configuration at its three levels.
pub struct Levels<S> {
    /// The settings every layer takes, in file order.
    pub common: Vec<S>,
    /// Settings per operator type, in file order.
    pub by_type: Vec<(String, S)>,
    /// Settings per layer name, in file order.
    pub by_layer: Vec<(String, S)>,
}

impl<S: Copy> Levels<S> {
    /// The settings of layer `name` (operator `op`), lowest priority first:
    /// applying them in this order gives AMCT's result.
    pub fn for_layer(&self, name: &str, op: &str) -> Vec<(Level, S)> {
        let common = self.common.iter().map(|s| (Level::Common, *s));
        let by_type = self
            .by_type
            .iter()
            .filter(|(t, _)| t == op)
            .map(|(_, s)| (Level::Type, *s));
        let by_layer = self
            .by_layer
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, s)| (Level::Layer, *s));
        common.chain(by_type).chain(by_layer).collect()
    }

    /// Refuses settings named for a layer the model does not quantize.
    pub fn check_layer_names(&self, layers: &[(String, String)]) -> Result<(), String> {
        self.by_layer
            .iter()
            .try_for_each(|(name, _)| layer_op(layers, name).map(|_| ()))
    }
}

/// The operator type of the quantizable layer `name`, or an error listing
/// the quantizable layers.
pub fn layer_op<'a>(layers: &'a [(String, String)], name: &str) -> Result<&'a str, String> {
    layers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, op)| op.as_str())
        .ok_or_else(|| {
            let names: Vec<&str> = layers.iter().map(|(n, _)| n.as_str()).collect();
            format!(
                "layer '{name}' does not exist or cannot be quantized; quantizable layers: {}",
                names.join(", ")
            )
        })
}

/// Refuses skip lists that name a layer the model does not quantize.
pub fn check_skip_lists(lists: &[&[String]], layers: &[(String, String)]) -> Result<(), String> {
    lists
        .iter()
        .flat_map(|list| list.iter())
        .try_for_each(|name| layer_op(layers, name).map(|_| ()))
}

/// Whether layer `name` of type `op` is in one of the name lists or its
/// type in one of the type lists.
pub fn is_skipped(name: &str, op: &str, names: &[&[String]], types: &[&[String]]) -> bool {
    names.iter().any(|l| l.iter().any(|n| n == name))
        || types.iter().any(|l| l.iter().any(|t| t == op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<(String, String)> {
        [("conv1", "Conv"), ("conv2", "Conv"), ("fc", "Gemm")]
            .iter()
            .map(|(n, o)| (n.to_string(), o.to_string()))
            .collect()
    }

    #[test]
    fn a_layer_takes_common_then_its_type_then_its_own_settings() {
        let levels = Levels {
            common: vec!["c1", "c2"],
            by_type: vec![("Conv".into(), "conv"), ("Gemm".into(), "gemm")],
            by_layer: vec![("conv2".into(), "own"), ("fc".into(), "fc-own")],
        };
        assert_eq!(
            levels.for_layer("conv2", "Conv"),
            vec![
                (Level::Common, "c1"),
                (Level::Common, "c2"),
                (Level::Type, "conv"),
                (Level::Layer, "own")
            ]
        );
        assert_eq!(
            levels.for_layer("conv1", "Conv"),
            vec![
                (Level::Common, "c1"),
                (Level::Common, "c2"),
                (Level::Type, "conv")
            ]
        );
        assert!(levels.check_layer_names(&layers()).is_ok());
    }

    #[test]
    fn names_the_model_does_not_quantize_are_refused_with_the_list() {
        let levels = Levels::<u8> {
            common: vec![],
            by_type: vec![],
            by_layer: vec![("conv9".into(), 0)],
        };
        let e = levels.check_layer_names(&layers()).unwrap_err();
        assert_eq!(
            e,
            "layer 'conv9' does not exist or cannot be quantized; quantizable layers: conv1, conv2, fc"
        );
        let skip = vec!["fc".to_string(), "nope".to_string()];
        assert!(
            check_skip_lists(&[&skip], &layers())
                .unwrap_err()
                .contains("'nope'")
        );
        assert!(is_skipped("fc", "Gemm", &[&skip], &[]));
        assert!(is_skipped("conv1", "Conv", &[], &[&["Conv".to_string()]]));
        assert!(!is_skipped("conv1", "Conv", &[&skip], &[]));
    }
}
