//! The flags every example accepts. Fabric settings left out fall back to the `LT_*` environment
//! (set by `fabric run`) and then to Fabric's defaults.

use burn::tensor::backend::AutodiffBackend;
use burn_fabric::fabric_core::config::CollectiveTimeout;
use burn_fabric::{
    BackendDevices, CsvLogger, Fabric, FabricBuilder, FabricError, TensorBoardLogger,
};
use std::path::PathBuf;
use std::time::Duration;

/// Which logger `--logger` asks for.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoggerKind {
    /// `LOG_DIR/NAME/version_N/metrics.csv`
    Csv,
    /// TensorBoard event files in `LOG_DIR/NAME/version_N/`
    Tensorboard,
}

/// `--backend --accelerator --devices --num-nodes --strategy --precision --collective-timeout
/// --epochs --batch-size --seed`,
/// plus checkpointing (`--checkpoint-dir --checkpoint-every --resume`) and logging
/// (`--logger --log-dir`).
#[derive(clap::Args, Debug, Clone)]
pub struct FabricArgs {
    /// flex, ndarray, tch, wgpu or cuda: one compiled into this build [default: the build's
    /// DefaultBackend]
    #[arg(long)]
    pub backend: Option<String>,
    /// auto, cpu, gpu, cuda or wgpu
    #[arg(long)]
    pub accelerator: Option<String>,
    /// Devices per node: a count, -1 for all, auto, or ids like 0,2
    #[arg(long, allow_hyphen_values = true)]
    pub devices: Option<String>,
    /// Number of nodes
    #[arg(long)]
    pub num_nodes: Option<usize>,
    /// auto, single_device, ddp, zero1 (ddp_sharded) or zero2
    #[arg(long)]
    pub strategy: Option<String>,
    /// 32-true (64-true, 16-mixed, bf16-mixed, ... as Fabric supports them)
    #[arg(long)]
    pub precision: Option<String>,
    /// How long a collective waits for the other ranks before failing and naming them: `90`
    /// (seconds), `90s`, `1.5m`, `2h` [default: 30 minutes, or LT_COLLECTIVE_TIMEOUT]
    #[arg(long, value_parser = parse_timeout)]
    pub collective_timeout: Option<Duration>,
    /// Passes over the training data
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Items per batch on each rank
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Seed of initialisation and shuffling
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a checkpoint here at the end of every epoch
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Also save every N optimizer steps
    #[arg(long, requires = "checkpoint_dir")]
    pub checkpoint_every: Option<u64>,
    /// Continue from the newest complete checkpoint in --checkpoint-dir (implied when `fabric
    /// run --max-restarts` restarts the job)
    #[arg(long, requires = "checkpoint_dir")]
    pub resume: bool,
    /// Log metrics as csv or tensorboard
    #[arg(long, value_enum)]
    pub logger: Option<LoggerKind>,
    /// Where loggers write
    #[arg(long, default_value = "runs")]
    pub log_dir: PathBuf,
}

impl FabricArgs {
    /// A Fabric builder with the flags that were given; loggers write under
    /// `--log-dir/name`.
    pub fn builder<B: AutodiffBackend + BackendDevices>(&self, name: &str) -> FabricBuilder<B> {
        let mut builder = Fabric::<B>::builder();
        builder = match self.logger {
            Some(LoggerKind::Csv) => builder.logger(CsvLogger::new(&self.log_dir, name)),
            Some(LoggerKind::Tensorboard) => {
                builder.logger(TensorBoardLogger::new(&self.log_dir, name))
            }
            None => builder,
        };
        if let Some(accelerator) = &self.accelerator {
            builder = builder.accelerator(accelerator.as_str());
        }
        if let Some(devices) = &self.devices {
            builder = builder.devices(devices.as_str());
        }
        if let Some(num_nodes) = self.num_nodes {
            builder = builder.num_nodes(num_nodes);
        }
        if let Some(strategy) = &self.strategy {
            builder = builder.strategy(strategy.as_str());
        }
        if let Some(precision) = &self.precision {
            builder = builder.precision(precision.as_str());
        }
        if let Some(timeout) = self.collective_timeout {
            builder = builder.collective_timeout(timeout);
        }
        builder
    }
}

/// `--collective-timeout`, parsed as Fabric parses `LT_COLLECTIVE_TIMEOUT`.
fn parse_timeout(text: &str) -> Result<Duration, FabricError> {
    Ok(text.parse::<CollectiveTimeout>()?.duration())
}
