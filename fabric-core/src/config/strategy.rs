//! The `strategy` setting.

use super::setting::{list, setting_from};
use crate::FabricError;
use std::fmt;
use std::str::FromStr;

/// Which parallel strategy runs the ranks. Names are Lightning's, case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StrategyChoice {
    /// `single_device` for one device, `ddp` for more than one.
    #[default]
    Auto,
    /// One device, no communication.
    SingleDevice,
    /// Distributed data parallel: every rank holds the whole model; gradients are averaged.
    Ddp,
    /// ZeRO stage 1 (`zero1`, Lightning's `ddp_sharded`): as DDP, but each rank keeps optimizer
    /// state for, and updates, its own partition of the parameters only.
    Zero1,
    /// ZeRO stage 2 (`zero2`): stage 1, and each gradient is reduced to its owner only.
    Zero2,
}

/// Lightning names that mean DDP here: our ranks are threads (or MPI processes), so the spawn
/// method does not matter, and unused parameters are always handled.
const DDP_ALIASES: [&str; 6] = [
    "ddp_spawn",
    "ddp_fork",
    "ddp_notebook",
    "ddp_find_unused_parameters_true",
    "ddp_find_unused_parameters_false",
    "dp",
];

/// Lightning names that burn-fabric does not implement.
const NOT_AVAILABLE: [&str; 14] = [
    "fsdp",
    "fsdp_cpu_offload",
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_3",
    "deepspeed_stage_1_offload",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme",
    "xla",
    "single_xla",
    "xla_fsdp",
    "model_parallel",
];

impl StrategyChoice {
    /// The canonical names.
    pub const NAMES: [&'static str; 5] = ["auto", "single_device", "ddp", "zero1", "zero2"];

    /// The canonical name.
    pub fn as_str(&self) -> &'static str {
        match self {
            StrategyChoice::Auto => "auto",
            StrategyChoice::SingleDevice => "single_device",
            StrategyChoice::Ddp => "ddp",
            StrategyChoice::Zero1 => "zero1",
            StrategyChoice::Zero2 => "zero2",
        }
    }
}

impl fmt::Display for StrategyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StrategyChoice {
    type Err = FabricError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        match name.as_str() {
            "auto" => Ok(StrategyChoice::Auto),
            "single_device" => Ok(StrategyChoice::SingleDevice),
            "ddp" => Ok(StrategyChoice::Ddp),
            "zero1" | "ddp_sharded" => Ok(StrategyChoice::Zero1),
            "zero2" => Ok(StrategyChoice::Zero2),
            alias if DDP_ALIASES.contains(&alias) => Ok(StrategyChoice::Ddp),
            other if NOT_AVAILABLE.contains(&other) => Err(FabricError::StrategyNotAvailable {
                strategy: s.to_string(),
                reason: format!(
                    "burn-fabric has no FSDP, DeepSpeed or XLA (sharded optimizer state is `zero1`/`zero2`); use one of {}",
                    list(&Self::NAMES)
                ),
            }),
            _ => {
                let mut valid: Vec<&str> = Self::NAMES.to_vec();
                valid.extend(DDP_ALIASES);
                Err(FabricError::InvalidSetting {
                    setting: "strategy",
                    value: s.to_string(),
                    valid: list(&valid),
                })
            }
        }
    }
}

setting_from!(StrategyChoice);
