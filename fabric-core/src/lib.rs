//! Core of burn-fabric: configuration, cluster environments, the rank context, errors,
//! distributed data loading, checkpoint files, loggers and callbacks. The `burn-fabric` crate
//! puts a façade over this and the other crates; depend on that one.
#![warn(missing_docs)]

pub mod backend;
pub mod callback;
pub mod checkpoint;
pub mod config;
pub mod environment;
mod error;
pub mod gather;
pub mod loader;
pub mod logger;
pub mod rank;
pub mod sampler;
pub mod throughput;
pub mod watch;

pub use error::{CollectiveError, FabricError};
