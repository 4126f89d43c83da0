//! Distributed data parallel: every rank holds the whole model and its own optimizer; gradients
//! are averaged across ranks after each synchronised backward pass, in buckets.

use crate::bucket::plan_buckets;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use fabric_core::FabricError;
use fabric_core::collective::{Collective, ReduceOp};
use fabric_core::strategy::{FlatGrad, Strategy};
use half::{bf16, f16};

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
        let mut sizes = Vec::with_capacity(k + 1);
        let mut flags = Vec::with_capacity(k);
        let mut parts = Vec::with_capacity(k + 1);
        for member in members {
            sizes.push(member.numel);
            flags.push(if member.grad.is_some() { 1.0f32 } else { 0.0 });
            parts.push(
                member
                    .grad
                    .unwrap_or_else(|| Tensor::zeros([member.numel], (&self.device, dtype))),
            );
        }
        parts.push(Tensor::from_data(
            TensorData::new(flags, [k]),
            (&self.device, dtype),
        ));
        sizes.push(k);
        let data = Tensor::cat(parts, 0).into_data();
        let data = self.collective.all_reduce(data, ReduceOp::Mean)?;
        let present = presence(&data, k)?;
        let flat = Tensor::<Inner<B>, 1>::from_data(data, (&self.device, dtype));
        Ok(flat
            .split_with_sizes(sizes.clone(), 0)
            .into_iter()
            .zip(sizes)
            .zip(present)
            .map(|((grad, numel), present)| FlatGrad {
                numel,
                dtype,
                grad: present.then_some(grad),
            })
            .collect())
    }
}

/// Reads the `k` presence flags at the end of a reduced bucket.
fn presence(data: &TensorData, k: usize) -> Result<Vec<bool>, FabricError> {
    let tail = |n: usize| n.saturating_sub(k)..n;
    let bad = |e: burn::tensor::DataError| FabricError::Data {
        context: "ddp gradient bucket",
        message: format!("{e:?}"),
    };
    let n = data.num_elements();
    Ok(match data.dtype {
        DType::F32 | DType::Flex32 => data.as_slice::<f32>().map_err(bad)?[tail(n)]
            .iter()
            .map(|v| *v > 0.0)
            .collect(),
        DType::F64 => data.as_slice::<f64>().map_err(bad)?[tail(n)]
            .iter()
            .map(|v| *v > 0.0)
            .collect(),
        DType::F16 => data.as_slice::<f16>().map_err(bad)?[tail(n)]
            .iter()
            .map(|v| v.to_f32() > 0.0)
            .collect(),
        DType::BF16 => data.as_slice::<bf16>().map_err(bad)?[tail(n)]
            .iter()
            .map(|v| v.to_f32() > 0.0)
            .collect(),
        other => {
            return Err(FabricError::Data {
                context: "ddp gradient bucket",
                message: format!("gradients must be floats, found {other:?}"),
            });
        }
    })
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
            let members: Vec<_> = params.by_ref().take(bucket.tensors.len()).collect();
            let sizes: Vec<usize> = layout[bucket.tensors].iter().map(|(n, _)| *n).collect();
            let data = Tensor::cat(members, 0).into_data();
            let data = self.collective.broadcast(data, 0)?;
            let flat = Tensor::<Inner<B>, 1>::from_data(data, (&self.device, bucket.dtype));
            out.extend(flat.split_with_sizes(sizes, 0));
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
