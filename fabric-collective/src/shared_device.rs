//! DDP's device engine for ranks that share one CubeCL device (Wgpu's default adapter, Mesa's
//! lavapipe on a CPU-only machine; several ranks on one GPU): the gradient buckets are averaged
//! in device memory by the fused all-reduce-and-cast kernel, never copied to the host.
//!
//! Each rank hands its bucket's buffer to a mailbox and meets the others at a barrier of its host
//! collective; rank 0 then folds the buffers in rank order with [`sum_scale_cast`] (an f32
//! running sum, the last pass dividing by the world size and writing the bucket's dtype, as the
//! host engine rounds) and posts the result, which every rank takes after a second barrier. The
//! result is one buffer that the ranks share read-only: CubeCL copies before writing to a buffer
//! with several owners. Buffers the kernel has no type for (`f64`) and operations other than sum
//! and mean go through the host ([`ThroughHost`]).

use crate::cube::{CubeBackend, CubeRuntime, CubeTensor, from_cube, into_cube};
use crate::device::same_type;
use crate::fused::{FloatKind, Operand, Path, sum_scale_cast};
use crate::{Collective, DeviceCollective, DeviceEngine, ReduceOp, ThroughHost};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_fusion::{Fusion, FusionBackend};
use burn_ir::BackendIr;
use fabric_core::CollectiveError;
use std::any::TypeId;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The fused engine for local ranks on `devices`, when `B` is Burn's `Wgpu` (feature `wgpu`)
/// or `Cuda` (feature `cuda`), there are two or more ranks and they all share one device.
/// `None` otherwise: the host collective (or NCCL, for distinct GPUs) does the work.
pub fn engine<B: Backend>(devices: &[B::Device]) -> Option<DeviceEngine<B>> {
    let shared = devices.len() >= 2 && devices.iter().all(|device| *device == devices[0]);
    if !shared {
        return None;
    }
    #[cfg(feature = "wgpu")]
    if TypeId::of::<B>() == TypeId::of::<burn::backend::Wgpu>() {
        type C = CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
        return Some(make::<B, C, cubecl::wgpu::WgpuRuntime>(devices.len()));
    }
    #[cfg(feature = "cuda")]
    if TypeId::of::<B>() == TypeId::of::<burn::backend::Cuda>() {
        type C = CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
        return Some(make::<B, C, cubecl::cuda::CudaRuntime>(devices.len()));
    }
    None
}

/// The engine of `world` ranks whose backend `B` is `Fusion<C>`.
fn make<B, C, R>(world: usize) -> DeviceEngine<B>
where
    B: Backend,
    R: CubeRuntime,
    C: FusionBackend<FloatTensorPrimitive = CubeTensor<R>> + BackendIr,
{
    let mailbox = Arc::new(Mailbox {
        inputs: Mutex::new((0..world).map(|_| None).collect()),
        result: Mutex::new(None),
    });
    DeviceEngine::new("fused", move |rank| {
        Box::new(RankEngine::<B, C, R> {
            rank,
            mailbox: Arc::clone(&mailbox),
            _backend: PhantomData,
        })
    })
}

/// What the ranks of one engine exchange: each rank's bucket, then rank 0's result.
struct Mailbox<R: CubeRuntime> {
    inputs: Mutex<Vec<Option<CubeTensor<R>>>>,
    result: Mutex<Option<CubeTensor<R>>>,
}

/// One rank's side of the engine.
struct RankEngine<B, C, R: CubeRuntime> {
    rank: usize,
    mailbox: Arc<Mailbox<R>>,
    _backend: PhantomData<fn() -> (B, C)>,
}

impl<B, C, R> RankEngine<B, C, R>
where
    B: Backend,
    R: CubeRuntime,
    C: FusionBackend<FloatTensorPrimitive = CubeTensor<R>> + BackendIr,
{
    fn fail(&self, message: impl Into<String>) -> CollectiveError {
        CollectiveError::Engine {
            rank: self.rank,
            engine: "fused",
            operation: "all_reduce",
            message: message.into(),
        }
    }

    fn lock<'a, T>(&self, mutex: &'a Mutex<T>) -> MutexGuard<'a, T> {
        // A rank that panicked holding the lock left whole values (no update is half done).
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Rank 0's part: the sum of every rank's buffer, folded in rank order, divided by the
    /// world size for a mean.
    fn combine(&self, kind: FloatKind, op: ReduceOp) -> Result<CubeTensor<R>, CollectiveError> {
        let inputs: Vec<CubeTensor<R>> = self
            .lock(&self.mailbox.inputs)
            .iter_mut()
            .map(Option::take)
            .collect::<Option<_>>()
            .ok_or_else(|| self.fail("a rank's buffer is missing at the rendezvous"))?;
        let first = &inputs[0];
        let shape = first.meta.shape();
        let len = shape.num_elements();
        if let Some(other) = inputs
            .iter()
            .find(|t| t.meta.shape() != shape || t.dtype != first.dtype)
        {
            return Err(self.fail(format!(
                "ranks passed different buffers: {:?} {:?} and {:?} {:?}",
                shape,
                first.dtype,
                other.meta.shape(),
                other.dtype
            )));
        }
        let world = inputs.len();
        let client = &first.client;
        let mut sum = (first.handle.clone(), kind);
        for (i, peer) in inputs.iter().enumerate().skip(1) {
            let last = i + 1 == world;
            // Running sums stay f32; the last pass divides and writes the bucket's dtype.
            let (out, divisor) = if last {
                (
                    kind,
                    if op == ReduceOp::Mean {
                        world as f32
                    } else {
                        1.0
                    },
                )
            } else {
                (FloatKind::F32, 1.0)
            };
            let local = Operand {
                handle: &sum.0,
                kind: sum.1,
            };
            let peer = Operand {
                handle: &peer.handle,
                kind,
            };
            sum = (
                sum_scale_cast(client, local, peer, len, out, divisor, Path::Fused),
                out,
            );
        }
        Ok(CubeTensor::new_contiguous(
            client.clone(),
            first.device.clone(),
            shape.clone(),
            sum.0,
            first.dtype,
        ))
    }
}

impl<B, C, R> DeviceCollective<B> for RankEngine<B, C, R>
where
    B: Backend,
    R: CubeRuntime,
    C: FusionBackend<FloatTensorPrimitive = CubeTensor<R>> + BackendIr,
{
    fn all_reduce(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        let kind = match tensor.dtype() {
            DType::F32 => Some(FloatKind::F32),
            DType::F16 => Some(FloatKind::F16),
            DType::BF16 => Some(FloatKind::BF16),
            _ => None,
        };
        let (Some(kind), ReduceOp::Mean | ReduceOp::Sum) = (kind, op) else {
            return ThroughHost.all_reduce(host, tensor, op);
        };
        let not_fusion = || self.fail("the tensor is not of the engine's backend");
        let tensor = same_type::<_, Tensor<Fusion<C>, 1>>(tensor).ok_or_else(not_fusion)?;
        let (cube, client) = into_cube::<R, C>(tensor);
        self.lock(&self.mailbox.inputs)[self.rank] = Some(cube);
        host.barrier()?;
        if self.rank == 0 {
            let combined = self.combine(kind, op)?;
            *self.lock(&self.mailbox.result) = Some(combined);
        }
        // Rank 0 posts the next result only after the next first barrier, which every rank
        // reaches after taking this one.
        host.barrier()?;
        let combined = self
            .lock(&self.mailbox.result)
            .clone()
            .ok_or_else(|| self.fail("rank 0 posted no result"))?;
        same_type::<_, Tensor<B, 1>>(from_cube::<R, C>(&client, combined)).ok_or_else(not_fusion)
    }

    fn wait(&self) -> Result<(), CollectiveError> {
        // Every kernel ran on the ranks' one device, whose streams order the readers after it.
        Ok(())
    }
}
