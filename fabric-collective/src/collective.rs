//! The collective seam: the operations ranks use to exchange tensors. One trait, one
//! implementation per engine: [`SingleProcess`] (world size 1), [`ThreadGroup`] (ranks are threads
//! of one process); MPI implements the same trait behind its feature. NCCL reduces gradient
//! buckets in device memory through the [`device`] seam instead.
//!
//! Buffers travel as [`TensorData`]: dtype-tagged host bytes. Moving a CPU tensor into
//! `TensorData` and back is free for Flex when the tensor is not shared, so the in-process engine
//! reduces straight in the tensors' own memory.

use crate::host::{pack, split};
use burn::tensor::{DType, TensorData};
use fabric_core::CollectiveError;
use fabric_core::FabricError;
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

    /// [`all_reduce`](Self::all_reduce) of several buffers in one operation (a gradient bucket
    /// without packing it first). Every rank passes the same number of buffers with matching
    /// dtypes and element counts. The default packs the buffers of each dtype into one
    /// contiguous buffer, reduces it, and cuts it back; engines that can reduce buffers where
    /// they lie override it.
    fn all_reduce_many(
        &self,
        data: Vec<TensorData>,
        op: ReduceOp,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        let shapes: Vec<Vec<usize>> = data.iter().map(|d| d.shape.to_vec()).collect();
        let dtypes: Vec<DType> = data.iter().map(|d| d.dtype).collect();
        let mut groups: Vec<DType> = Vec::new();
        for dtype in &dtypes {
            if !groups.contains(dtype) {
                groups.push(*dtype);
            }
        }
        let mut parts: Vec<Option<TensorData>> = data.into_iter().map(Some).collect();
        let mut out: Vec<Option<TensorData>> = vec![None; parts.len()];
        for dtype in groups {
            let members: Vec<usize> = (0..dtypes.len()).filter(|&i| dtypes[i] == dtype).collect();
            let packed = pack(
                members.iter().filter_map(|&i| parts[i].take()).collect(),
                dtype,
            );
            let reduced = self.all_reduce(packed, op)?;
            let member_shapes: Vec<Vec<usize>> =
                members.iter().map(|&i| shapes[i].clone()).collect();
            for (i, part) in members.into_iter().zip(split(&reduced, &member_shapes)) {
                out[i] = Some(part);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Combines each buffer across ranks like [`all_reduce_many`](Self::all_reduce_many), but
    /// only rank `dst` receives the result (`Some`); the others get `None` and their buffers are
    /// freed. The default reduces everywhere and drops the result off `dst`; engines override it
    /// to move less.
    fn reduce_many(
        &self,
        data: Vec<TensorData>,
        op: ReduceOp,
        dst: usize,
    ) -> Result<Option<Vec<TensorData>>, CollectiveError> {
        check_rank(dst, self.world_size())?;
        let reduced = self.all_reduce_many(data, op)?;
        Ok((self.rank() == dst).then_some(reduced))
    }

    /// Returns rank `src`'s `data` on every rank. The other ranks' `data` is ignored, so its
    /// shape may differ (it may be a placeholder).
    fn broadcast(&self, data: TensorData, src: usize) -> Result<TensorData, CollectiveError>;

    /// Every rank's `data`, indexed by rank. Dtype and shape must match across ranks.
    fn all_gather(&self, data: TensorData) -> Result<Vec<TensorData>, CollectiveError>;

    /// Reduces `data` (one dimension, its length a multiple of the world size, the same on every
    /// rank) across the ranks with `op` and returns this rank's part of the result: elements
    /// `[rank * n / world, (rank + 1) * n / world)` (PyTorch's `reduce_scatter_tensor`).
    ///
    /// Every engine does it natively: no rank computes the parts of the others. A buffer of
    /// another shape is [`CollectiveError::InvalidShape`]; dtypes or lengths that differ across
    /// ranks are [`CollectiveError::Mismatch`]; dtypes and ops are those of
    /// [`all_reduce`](Self::all_reduce).
    fn reduce_scatter(&self, data: TensorData, op: ReduceOp)
    -> Result<TensorData, CollectiveError>;

    /// Concatenates every rank's `data` (one dimension, the same length and dtype on every rank)
    /// in rank order into one flat buffer (PyTorch's `all_gather_into_tensor`).
    ///
    /// A buffer of more (or fewer) dimensions is [`CollectiveError::InvalidShape`]; dtypes or
    /// lengths that differ across ranks are [`CollectiveError::Mismatch`].
    fn all_gather_flat(&self, data: TensorData) -> Result<TensorData, CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CollectiveError>;

    /// The ranks of this rank's process as a collective of their own (ranks numbered within the
    /// process, `0..ranks_per_process`) when the job spans several processes; `None` when this
    /// process holds the whole job. FSDP's `hybrid_shard` shards within it.
    fn within_process(&self) -> Option<&dyn Collective> {
        None
    }
}

/// The length of `data` if `operation` can take it as a flat buffer: one dimension, a dtype that
/// is not quantized, and with `multiple_of` (the world size) a length that is a multiple of it.
/// `rank` (global) names the caller in the error.
pub(crate) fn flat_len(
    data: &TensorData,
    operation: &'static str,
    rank: usize,
    multiple_of: Option<usize>,
) -> Result<usize, CollectiveError> {
    flat_len_of(&data.shape, data.dtype, operation, rank, multiple_of)
}

/// [`flat_len`] of a buffer of `shape` and `dtype` wherever it lies (the device engines').
pub(crate) fn flat_len_of(
    shape: &[usize],
    dtype: DType,
    operation: &'static str,
    rank: usize,
    multiple_of: Option<usize>,
) -> Result<usize, CollectiveError> {
    if let DType::QFloat(_) = dtype {
        return Err(CollectiveError::UnsupportedDtype {
            operation,
            dtype: format!("{dtype:?}"),
        });
    }
    let shape = shape.to_vec();
    let world = multiple_of.unwrap_or(1).max(1);
    match shape.as_slice() {
        [n] if n.is_multiple_of(world) => Ok(*n),
        _ => {
            let valid = match multiple_of {
                Some(_) => {
                    let n: usize = shape.iter().product();
                    let below = n / world * world;
                    format!(
                        "it takes one dimension whose length is a multiple of the world size {world}, e.g. {below} or {} (pad the buffer, or flatten it first)",
                        below + world
                    )
                }
                None => "it takes one dimension (flatten the tensor first)".into(),
            };
            Err(CollectiveError::InvalidShape {
                rank,
                operation,
                shape,
                valid,
            })
        }
    }
}

/// [`Collective::all_reduce`] of one number: every rank gets the combined value.
pub fn all_reduce_scalar(
    collective: &dyn Collective,
    value: f64,
    op: ReduceOp,
) -> Result<f64, FabricError> {
    let data = collective.all_reduce(TensorData::new(vec![value], [1]), op)?;
    data.as_slice::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .ok_or_else(|| FabricError::Data {
            context: "all_reduce_scalar",
            message: "the reduced value is missing".into(),
        })
}

/// `InvalidRank` unless `rank < world_size` (the root of a broadcast or reduce).
pub fn check_rank(rank: usize, world_size: usize) -> Result<(), CollectiveError> {
    if rank < world_size {
        Ok(())
    } else {
        Err(CollectiveError::InvalidRank {
            src: rank,
            world_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadCollective;
    use crate::launcher::{ThreadLaunch, launch_threads};
    use std::time::Duration;

    /// Forwards everything but `all_reduce_many`, so the trait's packing default runs.
    struct PackingOnly(ThreadCollective);

    impl Collective for PackingOnly {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn all_reduce(
            &self,
            data: TensorData,
            op: ReduceOp,
        ) -> Result<TensorData, CollectiveError> {
            self.0.all_reduce(data, op)
        }
        fn broadcast(&self, data: TensorData, src: usize) -> Result<TensorData, CollectiveError> {
            self.0.broadcast(data, src)
        }
        fn all_gather(&self, data: TensorData) -> Result<Vec<TensorData>, CollectiveError> {
            self.0.all_gather(data)
        }
        fn reduce_scatter(
            &self,
            data: TensorData,
            op: ReduceOp,
        ) -> Result<TensorData, CollectiveError> {
            self.0.reduce_scatter(data, op)
        }
        fn all_gather_flat(&self, data: TensorData) -> Result<TensorData, CollectiveError> {
            self.0.all_gather_flat(data)
        }
        fn barrier(&self) -> Result<(), CollectiveError> {
            self.0.barrier()
        }
    }

    /// Rank r's buffers: f32 [5], f64 [3], i32 [2, 2], each holding r + index.
    fn buffers(rank: usize) -> Vec<TensorData> {
        let r = rank as f64;
        vec![
            TensorData::new(
                (0..5).map(|i| (r + i as f64) as f32).collect::<Vec<_>>(),
                [5],
            ),
            TensorData::new((0..3).map(|i| r + i as f64).collect::<Vec<_>>(), [3]),
            TensorData::new((0..4).map(|i| rank as i32 + i).collect::<Vec<_>>(), [2, 2]),
        ]
    }

    fn check(results: Vec<TensorData>, world: usize) {
        let sum_r: f64 = (0..world).map(|r| r as f64).sum();
        let expect = |i: usize| sum_r + (world * i) as f64;
        assert_eq!(
            results[0].to_vec::<f32>().unwrap(),
            (0..5).map(|i| expect(i) as f32).collect::<Vec<_>>()
        );
        assert_eq!(
            results[1].to_vec::<f64>().unwrap(),
            (0..3).map(expect).collect::<Vec<_>>()
        );
        assert_eq!(results[2].shape.to_vec(), vec![2, 2]);
        assert_eq!(
            results[2].to_vec::<i32>().unwrap(),
            (0..4).map(|i| expect(i) as i32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn all_reduce_many_in_place_and_packed_agree() {
        for world in [1, 2, 3] {
            let launch = ThreadLaunch {
                world_size: world,
                first_rank: 0,
                timeout: Duration::from_secs(30),
                threads_per_rank: Some(1),
            };
            let direct = launch_threads(&launch, |rank, c| {
                c.all_reduce_many(buffers(rank), ReduceOp::Sum)
                    .map_err(|e| e.to_string())
            })
            .unwrap();
            check(direct, world);
            let packed = launch_threads(&launch, |rank, c| {
                PackingOnly(c)
                    .all_reduce_many(buffers(rank), ReduceOp::Sum)
                    .map_err(|e| e.to_string())
            })
            .unwrap();
            check(packed, world);
        }
    }

    #[test]
    fn reduce_op_names_parse() {
        assert_eq!("AVG".parse::<ReduceOp>().unwrap(), ReduceOp::Mean);
        assert_eq!("sum".parse::<ReduceOp>().unwrap(), ReduceOp::Sum);
        let err = "product".parse::<ReduceOp>().unwrap_err().to_string();
        assert!(err.contains("product") && err.contains("`max`"), "{err}");
    }
}
