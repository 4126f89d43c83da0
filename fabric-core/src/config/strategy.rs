//! The `strategy` setting.

use super::setting::{list, setting_from};
use crate::FabricError;
use crate::config::Setting;
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
    /// Fully sharded data parallel (`fsdp`, ZeRO stage 3): each rank keeps only its shard of
    /// every parameter, of its gradient and of its optimizer state; forward passes gather whole
    /// parameters, backward reduce-scatters their gradients. The sharding choice says how long
    /// gathered parameters live.
    Fsdp(ShardingStrategy),
}

/// PyTorch FSDP's `sharding_strategy`: what a fully sharded job keeps whole, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ShardingStrategy {
    /// `full_shard` (ZeRO-3): parameters are gathered for the forward pass and released after
    /// it, then gathered again for backward (the release needs an autodiff backend that
    /// checkpoints memory-bound operations, `Autodiff<_, BalancedCheckpointing>`; the default
    /// `Autodiff<_>` keeps them from forward to backward, as `shard_grad_op` does).
    #[default]
    FullShard,
    /// `shard_grad_op` (ZeRO-2 with sharded parameters between steps): parameters gathered for
    /// the forward pass stay gathered until its backward.
    ShardGradOp,
    /// `no_shard`: plain DDP.
    NoShard,
    /// `hybrid_shard`: `full_shard` among the ranks of each process (node), replicated across
    /// processes: parameters are gathered within a process only; gradients are averaged over
    /// every rank (an all-reduce across processes). In a single-process job it is `full_shard`.
    HybridShard,
}

impl ShardingStrategy {
    /// The names, as PyTorch spells them in lower case.
    pub const NAMES: [&'static str; 4] =
        ["full_shard", "shard_grad_op", "no_shard", "hybrid_shard"];

    /// The name, as PyTorch spells it in lower case.
    pub fn as_str(&self) -> &'static str {
        match self {
            ShardingStrategy::FullShard => "full_shard",
            ShardingStrategy::ShardGradOp => "shard_grad_op",
            ShardingStrategy::NoShard => "no_shard",
            ShardingStrategy::HybridShard => "hybrid_shard",
        }
    }
}

impl fmt::Display for ShardingStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ShardingStrategy {
    type Err = FabricError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full_shard" => Ok(ShardingStrategy::FullShard),
            "shard_grad_op" => Ok(ShardingStrategy::ShardGradOp),
            "no_shard" => Ok(ShardingStrategy::NoShard),
            "hybrid_shard" => Ok(ShardingStrategy::HybridShard),
            "_hybrid_shard_zero2" => Err(FabricError::StrategyNotAvailable {
                strategy: s.to_string(),
                reason: format!(
                    "hybrid sharding with parameters kept from forward to backward is not \
                     implemented; use one of {}",
                    list(&Self::NAMES)
                ),
            }),
            _ => Err(FabricError::InvalidSetting {
                setting: "sharding_strategy",
                value: s.to_string(),
                valid: list(&Self::NAMES),
            }),
        }
    }
}

impl From<ShardingStrategy> for StrategyChoice {
    fn from(sharding: ShardingStrategy) -> Self {
        StrategyChoice::Fsdp(sharding)
    }
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
const NOT_AVAILABLE: [&str; 13] = [
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
    pub const NAMES: [&'static str; 9] = [
        "auto",
        "single_device",
        "ddp",
        "zero1",
        "zero2",
        "fsdp",
        "fsdp_shard_grad_op",
        "fsdp_no_shard",
        "fsdp_hybrid_shard",
    ];

    /// The canonical name.
    pub fn as_str(&self) -> &'static str {
        match self {
            StrategyChoice::Auto => "auto",
            StrategyChoice::SingleDevice => "single_device",
            StrategyChoice::Ddp => "ddp",
            StrategyChoice::Zero1 => "zero1",
            StrategyChoice::Zero2 => "zero2",
            StrategyChoice::Fsdp(ShardingStrategy::FullShard) => "fsdp",
            StrategyChoice::Fsdp(ShardingStrategy::ShardGradOp) => "fsdp_shard_grad_op",
            StrategyChoice::Fsdp(ShardingStrategy::NoShard) => "fsdp_no_shard",
            StrategyChoice::Fsdp(ShardingStrategy::HybridShard) => "fsdp_hybrid_shard",
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
            "fsdp" => Ok(StrategyChoice::Fsdp(ShardingStrategy::FullShard)),
            fsdp if fsdp.starts_with("fsdp_") && !NOT_AVAILABLE.contains(&fsdp) => {
                Ok(StrategyChoice::Fsdp(fsdp["fsdp_".len()..].parse()?))
            }
            alias if DDP_ALIASES.contains(&alias) => Ok(StrategyChoice::Ddp),
            other if NOT_AVAILABLE.contains(&other) => Err(FabricError::StrategyNotAvailable {
                strategy: s.to_string(),
                reason: format!(
                    "burn-fabric has no CPU offload, DeepSpeed or XLA (sharding is `zero1`, `zero2` and `fsdp`); use one of {}",
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

impl From<ShardingStrategy> for Setting<StrategyChoice> {
    fn from(sharding: ShardingStrategy) -> Self {
        Setting::Value(StrategyChoice::Fsdp(sharding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsdp_names_and_sharding_choices() {
        let parse = |s: &str| s.parse::<StrategyChoice>();
        assert_eq!(parse("fsdp").unwrap(), ShardingStrategy::FullShard.into());
        assert_eq!(
            parse("FSDP_shard_grad_op").unwrap(),
            ShardingStrategy::ShardGradOp.into()
        );
        assert_eq!(parse("fsdp_full_shard").unwrap().as_str(), "fsdp");
        assert_eq!(parse("fsdp_no_shard").unwrap().as_str(), "fsdp_no_shard");
        for name in StrategyChoice::NAMES {
            assert_eq!(parse(name).unwrap().as_str(), name);
        }
        assert_eq!(
            parse("fsdp_hybrid_shard").unwrap(),
            ShardingStrategy::HybridShard.into()
        );
        let zero2 = parse("fsdp__hybrid_shard_zero2").unwrap_err().to_string();
        assert!(
            zero2.contains("hybrid") && zero2.contains("full_shard"),
            "{zero2}"
        );
        let bad = parse("fsdp_everything").unwrap_err().to_string();
        assert!(
            bad.contains("everything") && bad.contains("shard_grad_op"),
            "{bad}"
        );
        assert!(parse("fsdp_cpu_offload").is_err());
    }
}
