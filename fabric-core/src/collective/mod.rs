//! The collective seam: the operations ranks use to exchange tensors. One trait, one
//! implementation per engine: [`SingleProcess`] (world size 1), [`ThreadGroup`] (ranks are threads
//! of one process); MPI and NCCL implement the same trait behind their features.
//!
//! Buffers travel as [`TensorData`]: dtype-tagged host bytes. Moving a CPU tensor into
//! `TensorData` and back is free for Flex when the tensor is not shared, so the in-process engine
//! reduces straight in the tensors' own memory.

mod reduce;
mod single;
mod thread_group;

pub use single::SingleProcess;
pub use thread_group::{ThreadCollective, ThreadGroup};

use crate::FabricError;
use crate::error::CollectiveError;
use burn::tensor::TensorData;
use std::fmt;
use std::str::FromStr;

/// How [`Collective::all_reduce`] combines the ranks' values, element by element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Sum over ranks divided by the world size. Integer tensors are rounded to the nearest
    /// integer (ties away from zero) rather than truncated as in Lightning.
    #[default]
    Mean,
    /// Minimum over ranks (logical AND for booleans).
    Min,
    /// Maximum over ranks (logical OR for booleans).
    Max,
}

impl ReduceOp {
    /// Every accepted spelling.
    pub const NAMES: [&'static str; 5] = ["sum", "mean", "avg", "min", "max"];
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
        })
    }
}

impl FromStr for ReduceOp {
    type Err = FabricError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sum" => Ok(ReduceOp::Sum),
            "mean" | "avg" => Ok(ReduceOp::Mean),
            "min" => Ok(ReduceOp::Min),
            "max" => Ok(ReduceOp::Max),
            _ => Err(FabricError::InvalidSetting {
                setting: "reduce_op",
                value: s.to_string(),
                valid: "`sum`, `mean`, `avg`, `min`, `max`".into(),
            }),
        }
    }
}

/// Collective operations among the ranks of one job. Every rank must call the same operations
/// in the same order (with equal dtypes and element counts where noted); every blocking call
/// honours the group's timeout and returns an error naming the rank at fault rather than hanging.
pub trait Collective: Send + Sync {
    /// This rank's index in `0..world_size`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Combines `data` of every rank element-wise; every rank gets the result. Dtype and element
    /// count must match across ranks.
    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CollectiveError>;

    /// Returns rank `src`'s `data` on every rank. The other ranks' `data` is ignored, so its
    /// shape may differ (it may be a placeholder).
    fn broadcast(&self, data: TensorData, src: usize) -> Result<TensorData, CollectiveError>;

    /// Every rank's `data`, indexed by rank. Dtype and shape must match across ranks.
    fn all_gather(&self, data: TensorData) -> Result<Vec<TensorData>, CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CollectiveError>;
}
