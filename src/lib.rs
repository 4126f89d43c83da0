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

mod checkpoint;
pub mod cli;
mod collectives;
mod connector;
mod export;
mod fabric;
mod fused_adam;
mod logging;
mod optimizer;
mod processes;

pub use checkpoint::{Checkpoint, Remainder, Restore};
pub use export::export_safetensors;
pub use fabric::{Fabric, FabricBuilder};
pub use fabric_core::checkpoint::consolidate;
pub use fused_adam::{FusedAdam, FusedAdamConfig};
pub use optimizer::FabricOptimizer;

pub use fabric_core::backend::{BackendDevices, DevicePool};
pub use fabric_core::callback::{Callback, TrainBatchEnd, ValidationEnd};
pub use fabric_core::collective::{Collective, ReduceOp};
pub use fabric_core::config::{Accelerator, Devices, EnvVars, Precision, StrategyChoice};
pub use fabric_core::loader::{Batches, DataLoader, RankDataLoader};
pub use fabric_core::logger::{CsvLogger, Logger, TensorBoardLogger};
pub use fabric_core::rank::RankInfo;
pub use fabric_core::sampler::DistributedSampler;
pub use fabric_core::throughput::Throughput;
pub use fabric_core::{CollectiveError, FabricError};
pub use fabric_precision::{GradScalerState, PrecisionMode};

/// The crates behind the façade, for what it does not re-export.
pub use burn;
pub use fabric_core;
pub use fabric_precision;
pub use fabric_strategies;

/// The autodiff backend the enabled Cargo feature selects. When several backend features are
/// on, the most specific wins: `cuda`, then `tch`, then `wgpu`, then `ndarray`, then the default
/// `flex`.
#[cfg(feature = "cuda")]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::Cuda>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(feature = "tch", not(feature = "cuda")))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::LibTorch>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(feature = "wgpu", not(any(feature = "cuda", feature = "tch"))))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::Wgpu>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(
    feature = "ndarray",
    not(any(feature = "cuda", feature = "tch", feature = "wgpu"))
))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::NdArray>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(
    feature = "flex",
    not(any(
        feature = "cuda",
        feature = "tch",
        feature = "wgpu",
        feature = "ndarray"
    ))
))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::Flex>;

/// What a training script usually imports.
pub mod prelude {
    #[cfg(any(
        feature = "flex",
        feature = "ndarray",
        feature = "tch",
        feature = "wgpu",
        feature = "cuda"
    ))]
    pub use crate::DefaultBackend;
    pub use crate::{DataLoader, Fabric, FabricError, FabricOptimizer, RankDataLoader, ReduceOp};
}
