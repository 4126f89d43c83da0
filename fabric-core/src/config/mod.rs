//! Configuration: what the user wrote ([`RawConfig`]) and what it resolves to ([`FabricConfig`]),
//! with Lightning's rule for values that also come from the environment.

mod accelerator;
mod auto_wrap;
mod devices;
mod env;
mod precision;
mod setting;
mod strategy;
mod timeout;

pub use accelerator::Accelerator;
pub use auto_wrap::AutoWrap;
pub use devices::Devices;
pub use env::{
    EnvVars, LT_ACCELERATOR, LT_CLI_USED, LT_COLLECTIVE_TIMEOUT, LT_DEVICES, LT_NUM_NODES,
    LT_PRECISION, LT_RESTART_COUNT, LT_STRATEGY,
};
pub use precision::Precision;
pub use setting::Setting;
pub use strategy::{ShardingStrategy, StrategyChoice};
pub use timeout::{CollectiveTimeout, DEFAULT_COLLECTIVE_TIMEOUT};

use crate::FabricError;
use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

/// PyTorch DDP's default gradient bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The settings as written in code; `None` means "not given" (the default applies, and the
/// environment may override it).
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    /// Accelerator, typed or as a Lightning string.
    pub accelerator: Option<Setting<Accelerator>>,
    /// Devices per node.
    pub devices: Option<Setting<Devices>>,
    /// Number of nodes.
    pub num_nodes: Option<usize>,
    /// Strategy.
    pub strategy: Option<Setting<StrategyChoice>>,
    /// Precision.
    pub precision: Option<Setting<Precision>>,
    /// How long any collective may wait for its peers.
    pub collective_timeout: Option<Duration>,
    /// Target size of one gradient bucket, in bytes.
    pub bucket_bytes: Option<usize>,
    /// FSDP's automatic units.
    pub auto_wrap: Option<AutoWrap>,
    /// DDP and FSDP: average units' gradients while backward runs.
    pub overlap_backward: Option<bool>,
    /// FSDP: start the next unit's gathers while a unit runs.
    pub forward_prefetch: Option<bool>,
}

/// Resolved settings, before the backend picks devices.
#[derive(Debug, Clone, PartialEq)]
pub struct FabricConfig {
    /// Requested accelerator (`Auto` is resolved against the backend later).
    pub accelerator: Accelerator,
    /// Requested devices per node.
    pub devices: Devices,
    /// Number of nodes (`>= 1`).
    pub num_nodes: usize,
    /// Strategy (`Auto` is resolved once the device count is known).
    pub strategy: StrategyChoice,
    /// Precision.
    pub precision: Precision,
    /// Collective timeout.
    pub collective_timeout: Duration,
    /// Gradient bucket size in bytes.
    pub bucket_bytes: usize,
    /// FSDP's automatic units.
    pub auto_wrap: AutoWrap,
    /// DDP and FSDP: average units' gradients while backward runs (default off).
    pub overlap_backward: bool,
    /// FSDP: start the next unit's gathers while a unit runs (default off).
    pub forward_prefetch: bool,
}

impl RawConfig {
    /// Applies defaults and the `LT_*` environment, with Lightning's conflict rule: an
    /// environment value wins, but if the CLI set it and the code gave a different non-default
    /// value, that is an error naming both.
    pub fn resolve(self, env: &EnvVars) -> Result<FabricConfig, FabricError> {
        let accelerator = from_env(
            "accelerator",
            LT_ACCELERATOR,
            self.accelerator.map(Setting::resolve).transpose()?,
            env,
        )?;
        let devices = from_env(
            "devices",
            LT_DEVICES,
            self.devices.map(Setting::resolve).transpose()?,
            env,
        )?;
        let strategy = from_env(
            "strategy",
            LT_STRATEGY,
            self.strategy.map(Setting::resolve).transpose()?,
            env,
        )?;
        let precision = from_env(
            "precision",
            LT_PRECISION,
            self.precision.map(Setting::resolve).transpose()?,
            env,
        )?;
        let num_nodes = from_env(
            "num_nodes",
            LT_NUM_NODES,
            self.num_nodes.map(NumNodes::new).transpose()?,
            env,
        )?
        .0;
        let collective_timeout = from_env(
            "collective_timeout",
            LT_COLLECTIVE_TIMEOUT,
            self.collective_timeout
                .map(CollectiveTimeout::new)
                .transpose()?,
            env,
        )?
        .duration();
        let bucket_bytes = self.bucket_bytes.unwrap_or(DEFAULT_BUCKET_BYTES);
        if bucket_bytes == 0 {
            return Err(FabricError::InvalidArgument {
                name: "bucket_bytes",
                value: "0".into(),
                reason: "a gradient bucket must hold at least one byte".into(),
            });
        }
        Ok(FabricConfig {
            accelerator,
            devices,
            num_nodes,
            strategy,
            precision,
            collective_timeout,
            bucket_bytes,
            auto_wrap: self.auto_wrap.unwrap_or_default(),
            overlap_backward: self.overlap_backward.unwrap_or(false),
            forward_prefetch: self.forward_prefetch.unwrap_or(false),
        })
    }
}

/// One setting: code value, environment value, default.
fn from_env<T>(
    setting: &'static str,
    env_var: &'static str,
    code: Option<T>,
    env: &EnvVars,
) -> Result<T, FabricError>
where
    T: FromStr<Err = FabricError> + PartialEq + Default + Display,
{
    let Some(text) = env.get(env_var) else {
        return Ok(code.unwrap_or_default());
    };
    let from_env: T = text.parse()?;
    if let Some(code) = code
        && code != T::default()
        && code != from_env
        && env.cli_used()
    {
        return Err(FabricError::EnvConflict {
            setting,
            code: code.to_string(),
            env_var,
            env: text.to_string(),
        });
    }
    Ok(from_env)
}

/// `num_nodes`, validated to be at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct NumNodes(usize);

impl NumNodes {
    fn new(n: usize) -> Result<Self, FabricError> {
        if n == 0 {
            return Err(invalid_num_nodes("0"));
        }
        Ok(Self(n))
    }
}

impl Default for NumNodes {
    fn default() -> Self {
        Self(1)
    }
}

impl Display for NumNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for NumNodes {
    type Err = FabricError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Self(n)),
            _ => Err(invalid_num_nodes(s)),
        }
    }
}

fn invalid_num_nodes(value: &str) -> FabricError {
    FabricError::InvalidSetting {
        setting: "num_nodes",
        value: value.to_string(),
        valid: "a positive integer (1, 2, ...)".to_string(),
    }
}
