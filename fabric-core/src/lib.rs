//! Core of burn-fabric: configuration, the rank context, the collective seam and its in-process
//! engine, the thread launcher, distributed data loading, gradient storage and the strategy
//! trait. The `burn-fabric` crate puts a façade over all of this; depend on that one.

pub mod backend;
pub mod callback;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod environment;
mod error;
pub mod grads;
pub mod launcher;
pub mod loader;
pub mod logger;
pub mod rank;
pub mod sampler;
pub mod strategy;
pub mod throughput;

pub use error::{CollectiveError, FabricError};
