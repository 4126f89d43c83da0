//! The collective of a job with one rank: every operation is the identity.

use crate::{Collective, ReduceOp};
use burn::tensor::TensorData;
use fabric_core::CollectiveError;

/// World size 1: nothing to exchange, nothing to wait for.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CollectiveError> {
        super::reduce::check_supported(&data, op)?;
        Ok(data)
    }

    fn all_reduce_many(
        &self,
        data: Vec<TensorData>,
        op: ReduceOp,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        for buffer in &data {
            super::reduce::check_supported(buffer, op)?;
        }
        Ok(data)
    }

    fn broadcast(&self, data: TensorData, src: usize) -> Result<TensorData, CollectiveError> {
        if src != 0 {
            return Err(CollectiveError::InvalidRank { src, world_size: 1 });
        }
        Ok(data)
    }

    fn all_gather(&self, data: TensorData) -> Result<Vec<TensorData>, CollectiveError> {
        Ok(vec![data])
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}
