//! Grouping many small tensors into few large buffers, one collective per buffer (PyTorch DDP's
//! gradient buckets).

use crate::module::FlatGrad;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use fabric_collective::{Collective, DeviceCollective, ReduceOp, pack};
use fabric_core::FabricError;
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

/// Averages gradients across ranks in buckets of about `bucket_bytes`. With `owners` (the rank
/// that owns each gradient, ZeRO-2) each owner's gradients are bucketed together and reduced to
/// it alone, owner by owner, so the other ranks get no gradient back for them; without, every
/// bucket is all-reduced in visit order (DDP).
pub fn reduce_buckets<B: Backend>(
    collective: &dyn Collective,
    device: &B::Device,
    grads: Vec<FlatGrad<B>>,
    bucket_bytes: usize,
    owners: Option<&[usize]>,
) -> Result<Vec<FlatGrad<B>>, FabricError> {
    let layout: Vec<(usize, DType)> = grads.iter().map(|g| (g.numel, g.dtype)).collect();
    let Some(owners) = owners else {
        let mut grads = grads.into_iter();
        let mut out = Vec::with_capacity(layout.len());
        for bucket in plan_buckets(&layout, bucket_bytes) {
            let members: Vec<_> = grads.by_ref().take(bucket.tensors.len()).collect();
            out.extend(reduce_bucket(
                collective,
                device,
                members,
                bucket.dtype,
                None,
            )?);
        }
        return Ok(out);
    };
    let mut slots: Vec<Option<FlatGrad<B>>> = grads.into_iter().map(Some).collect();
    for owner in 0..collective.world_size() {
        let mine: Vec<usize> = (0..slots.len())
            .filter(|&i| owners.get(i) == Some(&owner))
            .collect();
        let sub_layout: Vec<(usize, DType)> = mine.iter().map(|&i| layout[i]).collect();
        for bucket in plan_buckets(&sub_layout, bucket_bytes) {
            let indices = &mine[bucket.tensors];
            let members: Vec<FlatGrad<B>> =
                indices.iter().filter_map(|&i| slots[i].take()).collect();
            let reduced = reduce_bucket(collective, device, members, bucket.dtype, Some(owner))?;
            for (&i, grad) in indices.iter().zip(reduced) {
                slots[i] = Some(grad);
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Averages one bucket of gradients (all of one dtype) across ranks: on every rank
/// (`dst = None`, DDP) or on rank `dst` only (ZeRO-2; the other ranks get no gradients back).
///
/// The bucket carries one extra element per gradient, set to 1 where this rank has the
/// gradient: after the reduction it tells which gradients exist on any rank, so a parameter that
/// only some ranks used is averaged with zeros from the others, and one that no rank used keeps
/// no gradient (its optimizer state is left alone, as in PyTorch).
pub fn reduce_bucket<B: Backend>(
    collective: &dyn Collective,
    device: &B::Device,
    members: Vec<FlatGrad<B>>,
    dtype: DType,
    dst: Option<usize>,
) -> Result<Vec<FlatGrad<B>>, FabricError> {
    let layout: Vec<usize> = members.iter().map(|m| m.numel).collect();
    let flags = presence_flags(&members);
    let mut buffers: Vec<TensorData> = members
        .into_iter()
        .map(|member| match member.grad {
            // Zero-copy on CPU backends when the gradient is not shared.
            Some(grad) => grad.into_data(),
            None => TensorData::full_dtype([member.numel], 0.0, dtype),
        })
        .collect();
    buffers.push(TensorData::new(flags, [layout.len()]));
    let reduced = match dst {
        None => Some(collective.all_reduce_many(buffers, ReduceOp::Mean)?),
        Some(dst) => collective.reduce_many(buffers, ReduceOp::Mean, dst)?,
    };
    let Some(mut reduced) = reduced else {
        let absent = layout.into_iter().map(|numel| FlatGrad {
            numel,
            dtype,
            grad: None,
        });
        return Ok(absent.collect());
    };
    let present = reduced
        .pop()
        .map(|flags| presence(&flags))
        .transpose()?
        .unwrap_or_default();
    Ok(reduced
        .into_iter()
        .zip(present)
        .map(|(data, present)| FlatGrad {
            numel: data.num_elements(),
            dtype,
            grad: present.then(|| Tensor::from_data(data, (device, dtype))),
        })
        .collect())
}

/// [`reduce_buckets`] for DDP through a device engine (NCCL): the buckets are concatenated,
/// averaged and split on the ranks' devices. Which gradients exist is settled first with one
/// small host all-reduce of presence flags (the same rule as [`reduce_bucket`]'s), so gradients
/// no rank has are left out of the buckets.
pub fn reduce_buckets_on_device<B: Backend>(
    collective: &dyn Collective,
    engine: &dyn DeviceCollective<B>,
    device: &B::Device,
    grads: Vec<FlatGrad<B>>,
    bucket_bytes: usize,
) -> Result<Vec<FlatGrad<B>>, FabricError> {
    let flags = presence_flags(&grads);
    let count = flags.len();
    let present =
        presence(&collective.all_reduce(TensorData::new(flags, [count]), ReduceOp::Sum)?)?;
    let mut slots: Vec<FlatGrad<B>> = grads;
    let live: Vec<usize> = (0..slots.len()).filter(|&i| present[i]).collect();
    let layout: Vec<(usize, DType)> = live
        .iter()
        .map(|&i| (slots[i].numel, slots[i].dtype))
        .collect();
    for bucket in plan_buckets(&layout, bucket_bytes) {
        let indices = &live[bucket.tensors];
        let mut members: Vec<Tensor<B, 1>> = indices
            .iter()
            .map(|&i| {
                let slot = &mut slots[i];
                slot.grad
                    .take()
                    .unwrap_or_else(|| Tensor::zeros([slot.numel], (device, slot.dtype)))
            })
            .collect();
        let sizes: Vec<usize> = indices.iter().map(|&i| slots[i].numel).collect();
        let packed = match members.len() {
            1 => members.swap_remove(0),
            _ => Tensor::cat(members, 0),
        };
        let reduced = engine.all_reduce(collective, packed, ReduceOp::Mean)?;
        for (&i, grad) in indices.iter().zip(reduced.split_with_sizes(sizes, 0)) {
            slots[i].grad = Some(grad);
        }
    }
    engine.wait()?;
    Ok(slots)
}

/// 1 where this rank has the gradient, 0 where it has none: summed or averaged over the ranks,
/// the flags say which gradients exist on any rank ([`presence`]).
fn presence_flags<B: Backend>(grads: &[FlatGrad<B>]) -> Vec<f32> {
    grads
        .iter()
        .map(|g| if g.grad.is_some() { 1.0 } else { 0.0 })
        .collect()
}

/// Reads the reduced presence flags: a gradient exists if any rank had it.
fn presence(flags: &TensorData) -> Result<Vec<bool>, FabricError> {
    let flags = flags.as_slice::<f32>().map_err(|e| FabricError::Data {
        context: "gradient bucket",
        message: format!("{e:?}"),
    })?;
    Ok(flags.iter().map(|v| *v > 0.0).collect())
}

/// Makes every rank hold rank `src`'s `params` (flattened), one broadcast per bucket of about
/// `bucket_bytes`. The other ranks' `params` give the expected sizes and dtypes, so a model
/// that differs from `src`'s is an error rather than garbage.
pub fn broadcast_buckets<B: Backend>(
    collective: &dyn Collective,
    device: &B::Device,
    params: Vec<Tensor<B, 1>>,
    bucket_bytes: usize,
    src: usize,
) -> Result<Vec<Tensor<B, 1>>, FabricError> {
    let layout: Vec<(usize, DType)> = params
        .iter()
        .map(|p| (p.shape().num_elements(), p.dtype()))
        .collect();
    let mut params = params.into_iter();
    let mut out = Vec::with_capacity(layout.len());
    for bucket in plan_buckets(&layout, bucket_bytes) {
        let members: Vec<TensorData> = params
            .by_ref()
            .take(bucket.tensors.len())
            .map(Tensor::into_data)
            .collect();
        let sizes: Vec<usize> = layout[bucket.tensors].iter().map(|(n, _)| *n).collect();
        let data = collective.broadcast(pack(members, bucket.dtype), src)?;
        let expected: usize = sizes.iter().sum();
        if data.num_elements() != expected || data.dtype != bucket.dtype {
            return Err(FabricError::Data {
                context: "setup",
                message: format!(
                    "rank {}'s model differs from rank {src}'s: a parameter bucket holds {} {:?} values on rank {src} and {expected} {:?} here",
                    collective.rank(),
                    data.num_elements(),
                    data.dtype,
                    bucket.dtype
                ),
            });
        }
        out.extend(unpack::<B>(data, sizes, device));
    }
    Ok(out)
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

    /// Rank `r`'s gradients: sizes that make several buckets at a 64-byte cap; gradient 1 only
    /// on rank 0, gradient 3 on no rank.
    fn rank_grads<B: Backend>(rank: usize, device: &B::Device) -> Vec<FlatGrad<B>> {
        [7usize, 3, 20, 5, 1, 9]
            .into_iter()
            .enumerate()
            .map(|(i, numel)| {
                let has = match i {
                    1 => rank == 0,
                    3 => false,
                    _ => true,
                };
                let values: Vec<f32> = (0..numel)
                    .map(|j| ((rank * 31 + i * 7 + j) % 11) as f32 * 0.37 - 1.5)
                    .collect();
                FlatGrad {
                    numel,
                    dtype: DType::F32,
                    grad: has.then(|| Tensor::from_data(TensorData::new(values, [numel]), device)),
                }
            })
            .collect()
    }

    fn values<B: Backend>(grads: Vec<FlatGrad<B>>) -> Vec<Option<Vec<f32>>> {
        grads
            .into_iter()
            .map(|g| g.grad.map(|t| t.into_data().to_vec().unwrap()))
            .collect()
    }

    #[test]
    fn device_path_equals_host_path() {
        use fabric_collective::launcher::{ThreadLaunch, launch_threads};
        type F = burn::backend::Flex;
        for world in [1, 2, 3] {
            let launch = ThreadLaunch {
                world_size: world,
                first_rank: 0,
                timeout: std::time::Duration::from_secs(30),
                threads_per_rank: Some(1),
            };
            let (host, on_device) = launch_threads(&launch, |rank, c| {
                let device = Default::default();
                let host = reduce_buckets::<F>(&c, &device, rank_grads(rank, &device), 64, None);
                let engine = fabric_collective::ThroughHost;
                let grads = rank_grads(rank, &device);
                let on_device = reduce_buckets_on_device::<F>(&c, &engine, &device, grads, 64);
                match (host, on_device) {
                    (Ok(h), Ok(d)) => Ok((values(h), values(d))),
                    (h, d) => Err(format!("{:?} / {:?}", h.err(), d.err())),
                }
            })
            .unwrap();
            assert_eq!(host, on_device, "world {world}");
            assert!(
                on_device[3].is_none(),
                "a gradient no rank has stays absent"
            );
            // Gradient 1 exists only on rank 0: the others count as zeros in the mean.
            let alone: Vec<f32> = (0..3).map(|j| ((7 + j) % 11) as f32 * 0.37 - 1.5).collect();
            let expect: Vec<f32> = alone.iter().map(|v| v / world as f32).collect();
            let got = on_device[1].clone().unwrap();
            for (g, e) in got.iter().zip(&expect) {
                assert!(
                    (g - e).abs() <= 1e-6 * e.abs().max(1.0),
                    "{got:?} vs {expect:?}"
                );
            }
        }
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
