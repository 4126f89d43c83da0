//! # burn-fabric
//!
//! Lightning Fabric for [Burn](https://burn.dev): keep your own training loop, change a handful
//! of lines, and run it on one CPU or many devices, with the gradients of every rank averaged,
//! the data sharded, and every rank released with an error naming the culprit if one fails.
//!
//! ```text
//! let mut fabric = Fabric::<DefaultBackend>::builder().devices(2).build()?;
//! fabric.launch(|fabric| {
//!     let (mut model, mut optim) = fabric.setup(model, AdamConfig::new().init())?;
//!     let mut train = fabric.setup_dataloader(loader)?;
//!     for batch in train.iter() {
//!         let loss = model.forward(batch);
//!         fabric.backward(loss, &model)?;          // instead of loss.backward()
//!         model = optim.step(lr, model)?;          // instead of optim.step(lr, model, grads)
//!     }
//!     Ok::<_, FabricError>(())
//! })?;
//! ```
//!
//! Pick the backend with a Cargo feature (`flex`, the default, `ndarray`, `tch`, `wgpu` or
//! `cuda`); [`DefaultBackend`] follows it.
#![warn(missing_docs)]

mod checkpoint;
pub mod cli;
mod collectives;
mod connector;
mod default_backend;
mod export;
mod fabric;
mod logging;
mod optimizer;
#[cfg(feature = "train")]
mod train;
mod unit;

pub use checkpoint::{Checkpoint, Remainder, Restore};
pub use default_backend::*;
pub use export::export_safetensors;
pub use fabric::{Fabric, FabricBuilder};
pub use fabric_core::checkpoint::{Newest, consolidate, newest_checkpoint, step_checkpoint};
pub use fabric_optim::{FusedAdam, FusedAdamConfig};
pub use optimizer::FabricOptimizer;
#[cfg(feature = "train")]
pub use train::metric_metadata;
pub use unit::unit;

pub use fabric_collective::{Collective, ReduceOp};
pub use fabric_core::backend::{BackendDevices, DevicePool};
pub use fabric_core::callback::{Callback, TrainBatchEnd, ValidationEnd};
pub use fabric_core::config::{
    Accelerator, AutoWrap, Devices, EnvVars, Precision, ShardingStrategy, StrategyChoice,
};
pub use fabric_core::loader::{Batches, DataLoader, RankDataLoader};
pub use fabric_core::logger::{CsvLogger, Logger, TensorBoardLogger};
pub use fabric_core::rank::RankInfo;
pub use fabric_core::sampler::DistributedSampler;
pub use fabric_core::throughput::Throughput;
pub use fabric_core::{CollectiveError, FabricError};
pub use fabric_precision::{ForwardInput, GradScalerState, PrecisionMode};

/// The crates behind the façade, for what it does not re-export.
pub use burn;
pub use fabric_collective;
pub use fabric_core;
pub use fabric_optim;
pub use fabric_precision;
pub use fabric_strategies;

/// What a training script usually imports.
pub mod prelude {
    pub use crate::default_backend::*;
    pub use crate::{DataLoader, Fabric, FabricError, FabricOptimizer, RankDataLoader, ReduceOp};
}
