//! Grouping many small tensors into few large buffers, one collective per buffer (PyTorch DDP's
//! gradient buckets).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use std::ops::Range;

/// A run of consecutive tensors that travel together; all share one dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Indices of the tensors in the flattened list.
    pub tensors: Range<usize>,
    /// Their common dtype.
    pub dtype: DType,
}

/// Splits tensors of the given `(numel, dtype)` into buckets of at most `cap_bytes` each,
/// keeping order. A tensor larger than the cap gets a bucket of its own; a change of dtype
/// starts a new bucket. The plan depends only on the sizes, so it is the same on every rank.
pub fn plan_buckets(tensors: &[(usize, DType)], cap_bytes: usize) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut bytes = 0;
    for (i, &(numel, dtype)) in tensors.iter().enumerate() {
        let size = numel * dtype.size();
        match buckets.last_mut() {
            Some(last) if last.dtype == dtype && bytes + size <= cap_bytes => {
                last.tensors.end = i + 1;
                bytes += size;
            }
            _ => {
                buckets.push(Bucket {
                    tensors: i..i + 1,
                    dtype,
                });
                bytes = size;
            }
        }
    }
    buckets
}

/// Splits a packed buffer back into tensors of `sizes` elements on `device` (views of one
/// allocation where the backend allows).
pub fn unpack<B: Backend>(
    data: TensorData,
    sizes: Vec<usize>,
    device: &B::Device,
) -> Vec<Tensor<B, 1>> {
    let dtype = data.dtype;
    Tensor::<B, 1>::from_data(data, (device, dtype)).split_with_sizes(sizes, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_splits_into_tensors() {
        type F = burn::backend::Flex;
        let data = TensorData::new(vec![1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0], [6]);
        let back = unpack::<F>(data, vec![2, 1, 3], &Default::default());
        let values: Vec<Vec<f32>> = back
            .into_iter()
            .map(|t| t.into_data().to_vec().unwrap())
            .collect();
        assert_eq!(values, vec![vec![1.0, 2.0], vec![3.0], vec![0.0; 3]]);
    }

    #[test]
    fn fills_buckets_up_to_the_cap() {
        let f = DType::F32;
        let plan = plan_buckets(&[(10, f), (10, f), (10, f), (100, f), (1, f)], 80);
        let ranges: Vec<_> = plan.iter().map(|b| b.tensors.clone()).collect();
        assert_eq!(ranges, vec![0..2, 2..3, 3..4, 4..5]);
    }

    #[test]
    fn splits_on_dtype_change() {
        let plan = plan_buckets(
            &[(1, DType::F32), (1, DType::F16), (1, DType::F16)],
            1 << 20,
        );
        assert_eq!(plan.len(), 2);
        assert_eq!(
            plan[1],
            Bucket {
                tensors: 1..3,
                dtype: DType::F16
            }
        );
    }

    #[test]
    fn empty_input_has_no_buckets() {
        assert!(plan_buckets(&[], 8).is_empty());
    }
}
