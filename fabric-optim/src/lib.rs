//! Optimizers of burn-fabric, each a Burn `SimpleOptimizer` in one file with its configuration,
//! state and tests (as `burn-optim`): hand them to `Fabric::setup` like any Burn optimizer.
#![warn(missing_docs)]

mod fused_adam;
#[cfg(any(feature = "flex", feature = "tch"))]
mod host;
#[cfg(not(any(feature = "flex", feature = "tch")))]
#[path = "host_stub.rs"]
mod host;

pub use fused_adam::{FusedAdam, FusedAdamConfig};
