//! FSDP's `auto_wrap_policy`: which submodules of a model become units without the model's
//! forward naming them.

/// Which submodules FSDP gathers as one unit (PyTorch's `auto_wrap_policy`). A unit's
/// parameters are gathered together when the forward pass first uses one of them; the
/// parameters outside every unit are gathered one at a time.
/// [`unit`](../../burn_fabric/fn.unit.html) in a model's forward marks units explicitly, with
/// the reduce-scatter of their gradients ordered right after their backward.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AutoWrap {
    /// No automatic units (the default).
    #[default]
    Off,
    /// Every submodule whose type has one of these names (`"Linear"`, a model's own `"Block"`;
    /// Burn names a derived module's type `Struct:Name`, either form matches). A matching
    /// submodule inside another is a unit of its own; the outer unit holds the rest (as
    /// PyTorch's `ModuleWrapPolicy`).
    ModuleTypes(Vec<String>),
    /// Every submodule (the root module included) holding at least this many parameters not
    /// already in a smaller unit (PyTorch's `size_based_auto_wrap_policy` with
    /// `min_num_params`).
    MinParams(usize),
}

impl AutoWrap {
    /// Units by module type names.
    pub fn module_types<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        AutoWrap::ModuleTypes(names.into_iter().map(Into::into).collect())
    }

    /// Whether a submodule of `container_type` (Burn's `Struct:Name`) holding `params`
    /// parameters not yet in a unit becomes a unit.
    pub fn wraps(&self, container_type: &str, params: usize) -> bool {
        match self {
            AutoWrap::Off => false,
            AutoWrap::ModuleTypes(names) => {
                let bare = container_type.rsplit(':').next().unwrap_or(container_type);
                names.iter().any(|n| n == container_type || n == bare)
            }
            AutoWrap::MinParams(min) => params > 0 && params >= *min,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_type_names_with_or_without_the_struct_prefix_and_counts_params() {
        let types = AutoWrap::module_types(["Block", "Struct:Linear"]);
        assert!(types.wraps("Struct:Block", 0));
        assert!(types.wraps("Struct:Linear", 5));
        assert!(!types.wraps("Struct:LayerNorm", 5));
        assert!(!types.wraps("Vec", 5));
        let size = AutoWrap::MinParams(100);
        assert!(size.wraps("Vec", 100));
        assert!(!size.wraps("Struct:Block", 99));
        assert!(!AutoWrap::Off.wraps("Struct:Block", 1_000));
    }
}
