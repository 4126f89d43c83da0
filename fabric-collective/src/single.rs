//! The collective of a job with one rank: every operation is the identity.

use crate::collective::flat_len;
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

    fn reduce_scatter(
        &self,
        data: TensorData,
        op: ReduceOp,
    ) -> Result<TensorData, CollectiveError> {
        flat_len(&data, "reduce_scatter", 0, Some(1))?;
        super::reduce::check_supported_in(&data, op, "reduce_scatter")?;
        Ok(data)
    }

    fn all_gather_flat(&self, data: TensorData) -> Result<TensorData, CollectiveError> {
        flat_len(&data, "all_gather_flat", 0, None)?;
        Ok(data)
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_scatter_and_all_gather_flat_of_one_rank_are_the_identity() {
        let data = || TensorData::new(vec![1.0f32, -2.0, 3.5], [3]);
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Min, ReduceOp::Max] {
            let got = SingleProcess.reduce_scatter(data(), op).unwrap();
            assert_eq!(got.to_vec::<f32>().unwrap(), vec![1.0, -2.0, 3.5]);
        }
        let got = SingleProcess.all_gather_flat(data()).unwrap();
        assert_eq!(got.to_vec::<f32>().unwrap(), vec![1.0, -2.0, 3.5]);
        let err = SingleProcess
            .all_gather_flat(TensorData::new(vec![1.0f32; 4], [2, 2]))
            .unwrap_err();
        assert!(
            matches!(err, CollectiveError::InvalidShape { ref shape, .. } if *shape == vec![2, 2]),
            "{err}"
        );
    }
}
