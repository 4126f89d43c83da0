//! Core of burn-fabric: configuration, the rank context, the collective seam and its in-process
//! engine, the thread launcher, distributed data loading and checkpoint files.
#![warn(missing_docs)]

pub mod backend;
pub mod callback;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod environment;
mod error;
pub mod launcher;
pub mod loader;
pub mod logger;
pub mod rank;
pub mod sampler;
pub mod throughput;

pub use error::{CollectiveError, FabricError};
