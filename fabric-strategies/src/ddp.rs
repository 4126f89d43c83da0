//! Distributed data parallel: every rank holds the whole model and its own optimizer; gradients
//! are averaged across ranks after each synchronised backward pass, in buckets.

use crate::bucket::{plan_buckets, unpack};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use fabric_core::FabricError;
use fabric_core::collective::{Collective, ReduceOp, pack};
use fabric_core::strategy::{FlatGrad, Strategy};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Lightning's `DDPStrategy`. Gradients are flattened into buckets of about `bucket_bytes`
/// (module-visit order, identical on every rank), one all-reduce per bucket.
///
/// Each bucket carries one extra element per gradient, set to 1 where this rank has the
/// gradient: after the reduction it tells which gradients exist on any rank, so a parameter that
/// only some ranks used is averaged with zeros from the others, and one that no rank used keeps
/// no gradient (its optimizer state is left alone, as in PyTorch).
pub struct Ddp<B: AutodiffBackend> {
    collective: Box<dyn Collective>,
    device: B::Device,
    bucket_bytes: usize,
}

impl<B: AutodiffBackend> Ddp<B> {
    /// DDP over `collective` for the rank whose device is `device`.
    pub fn new(collective: Box<dyn Collective>, device: B::Device, bucket_bytes: usize) -> Self {
        Self {
            collective,
            device,
            bucket_bytes: bucket_bytes.max(1),
        }
    }

    fn reduce_bucket(
        &self,
        members: Vec<FlatGrad<Inner<B>>>,
        dtype: DType,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError> {
        let k = members.len();
        let mut flags = Vec::with_capacity(k);
        let mut buffers = Vec::with_capacity(k + 1);
        for member in &members {
            flags.push(if member.grad.is_some() { 1.0f32 } else { 0.0 });
        }
        for member in members {
            buffers.push(match member.grad {
                // Zero-copy on CPU backends when the gradient is not shared.
                Some(grad) => grad.into_data(),
                None => TensorData::full_dtype([member.numel], 0.0, dtype),
            });
        }
        buffers.push(TensorData::new(flags, [k]));
        let mut reduced = self.collective.all_reduce_many(buffers, ReduceOp::Mean)?;
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
                grad: present.then(|| Tensor::from_data(data, (&self.device, dtype))),
            })
            .collect())
    }
}

/// Reads the reduced presence flags: a gradient exists if any rank had it.
fn presence(flags: &TensorData) -> Result<Vec<bool>, FabricError> {
    let flags = flags.as_slice::<f32>().map_err(|e| FabricError::Data {
        context: "ddp gradient bucket",
        message: format!("{e:?}"),
    })?;
    Ok(flags.iter().map(|v| *v > 0.0).collect())
}

impl<B: AutodiffBackend> Strategy<B> for Ddp<B> {
    fn name(&self) -> &'static str {
        "ddp"
    }

    fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError> {
        let layout: Vec<(usize, DType)> = params
            .iter()
            .map(|p| (p.shape().num_elements(), p.dtype()))
            .collect();
        let mut params = params.into_iter();
        let mut out = Vec::with_capacity(layout.len());
        for bucket in plan_buckets(&layout, self.bucket_bytes) {
            let members: Vec<TensorData> = params
                .by_ref()
                .take(bucket.tensors.len())
                .map(Tensor::into_data)
                .collect();
            let sizes: Vec<usize> = layout[bucket.tensors].iter().map(|(n, _)| *n).collect();
            let data = self.collective.broadcast(pack(members, bucket.dtype), 0)?;
            let expected: usize = sizes.iter().sum();
            if data.num_elements() != expected || data.dtype != bucket.dtype {
                return Err(FabricError::Data {
                    context: "setup",
                    message: format!(
                        "rank {}'s model differs from rank 0's: a parameter bucket holds {} {:?} values on rank 0 and {expected} {:?} here",
                        self.collective.rank(),
                        data.num_elements(),
                        data.dtype,
                        bucket.dtype
                    ),
                });
            }
            out.extend(unpack::<Inner<B>>(data, sizes, &self.device));
        }
        Ok(out)
    }

    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<Inner<B>>>,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError> {
        let layout: Vec<(usize, DType)> = grads.iter().map(|g| (g.numel, g.dtype)).collect();
        let mut grads = grads.into_iter();
        let mut out = Vec::with_capacity(layout.len());
        for bucket in plan_buckets(&layout, self.bucket_bytes) {
            let members: Vec<_> = grads.by_ref().take(bucket.tensors.len()).collect();
            out.extend(self.reduce_bucket(members, bucket.dtype)?);
        }
        Ok(out)
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        Some((self.collective.world_size(), self.collective.rank()))
    }
}
