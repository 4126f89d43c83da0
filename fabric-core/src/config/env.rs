//! Settings read from the environment that the `fabric run` CLI sets (Lightning's `LT_*` names).

use std::collections::HashMap;

/// Set to `1` by the `fabric run` CLI; then a conflicting value in code is an error.
pub const LT_CLI_USED: &str = "LT_CLI_USED";
/// Accelerator set by the CLI.
pub const LT_ACCELERATOR: &str = "LT_ACCELERATOR";
/// Strategy set by the CLI.
pub const LT_STRATEGY: &str = "LT_STRATEGY";
/// Devices per node set by the CLI.
pub const LT_DEVICES: &str = "LT_DEVICES";
/// Number of nodes set by the CLI.
pub const LT_NUM_NODES: &str = "LT_NUM_NODES";
/// Precision set by the CLI.
pub const LT_PRECISION: &str = "LT_PRECISION";
/// Collective timeout (`90`, `90s`, `1.5m`, `2h`, `500ms`), set by `fabric run
/// --collective-timeout` or by hand; read by every `Fabric` builder.
pub const LT_COLLECTIVE_TIMEOUT: &str = "LT_COLLECTIVE_TIMEOUT";
/// How many times `fabric run --max-restarts` has restarted the job before this attempt (0, 1,
/// ...); burn-fabric's own (Lightning has no restarts). Read as `Fabric::restart_count`.
pub const LT_RESTART_COUNT: &str = "LT_RESTART_COUNT";

/// Variables read by name: torchrun's (and Lightning's) launch variables.
const NAMES: [&str; 10] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
];

/// Variables read by prefix: ours (`LT_`), SLURM's, Open MPI's and the PMI launchers'.
const PREFIXES: [&str; 5] = ["LT_", "SLURM_", "OMPI_", "PMI_", "PMIX_"];

/// A snapshot of the variables Fabric reads: the `LT_*` settings and the cluster launchers'
/// rank variables. Taken once when a Fabric is built, so configuration does not change under a
/// running job; tests build one from pairs instead of touching the process environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvVars {
    vars: HashMap<String, String>,
}

impl EnvVars {
    /// Reads the variables of this process that Fabric uses.
    pub fn from_process() -> Self {
        let vars = std::env::vars()
            .filter(|(name, _)| {
                NAMES.contains(&name.as_str()) || PREFIXES.iter().any(|p| name.starts_with(p))
            })
            .collect();
        Self { vars }
    }

    /// An explicit set of variables (for tests, or for embedding Fabric in another launcher).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of one variable, if set and non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Whether the `fabric run` CLI launched this process.
    pub fn cli_used(&self) -> bool {
        self.get(LT_CLI_USED) == Some("1")
    }
}
