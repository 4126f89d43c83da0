//! The flags every example accepts. Fabric settings left out fall back to the `LT_*` environment
//! (set by `fabric run`) and then to Fabric's defaults.

use burn::tensor::backend::AutodiffBackend;
use burn_fabric::{BackendDevices, Fabric, FabricBuilder};

/// `--accelerator --devices --num-nodes --strategy --precision --epochs --batch-size --seed`.
#[derive(clap::Args, Debug, Clone)]
pub struct FabricArgs {
    /// auto, cpu, gpu, cuda or wgpu
    #[arg(long)]
    pub accelerator: Option<String>,
    /// Devices per node: a count, -1 for all, auto, or ids like 0,2
    #[arg(long, allow_hyphen_values = true)]
    pub devices: Option<String>,
    /// Number of nodes
    #[arg(long)]
    pub num_nodes: Option<usize>,
    /// auto, single_device or ddp
    #[arg(long)]
    pub strategy: Option<String>,
    /// 32-true (64-true, 16-mixed, bf16-mixed, ... as Fabric supports them)
    #[arg(long)]
    pub precision: Option<String>,
    /// Passes over the training data
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Items per batch on each rank
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Seed of initialisation and shuffling
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl FabricArgs {
    /// A Fabric builder with the flags that were given.
    pub fn builder<B: AutodiffBackend + BackendDevices>(&self) -> FabricBuilder<B> {
        let mut builder = Fabric::<B>::builder();
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
        builder
    }
}
