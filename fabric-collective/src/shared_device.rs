//! The device engine for ranks that share one CubeCL device (Wgpu's default adapter, Mesa's
//! lavapipe on a CPU-only machine; several ranks on one GPU): DDP's gradient buckets are
//! averaged, and FSDP's shards gathered and reduce-scattered, in device memory, never copied to
//! the host.
//!
//! Each rank hands its buffer to a mailbox and meets the others at a barrier of its host
//! collective; rank 0 then makes the result and posts it, which every rank takes after a second
//! barrier (rank 0 posts its error too, so that every rank returns it and the ranks stay in
//! step). For a reduction rank 0 folds the buffers in rank order with [`sum_scale_cast`] (an
//! f32 running sum, the last pass dividing by the world size and writing the bucket's dtype, as
//! the host engine rounds); for a gather it concatenates them. The result is one buffer that the
//! ranks share read-only: CubeCL copies before writing to a buffer with several owners; a
//! reduce-scatter's rank keeps its block of the reduced buffer. Buffers the kernel has no type for
//! (`f64`) and operations other than sum and mean go through the host ([`ThroughHost`]).

use crate::collective::flat_len_of;
use crate::cube::{CubeBackend, CubeRuntime, CubeTensor, FusionClient, from_cube, into_cube};
use crate::device::same_type;
use crate::fused::{FloatKind, Operand, Path, sum_scale_cast};
use crate::{Collective, DeviceCollective, DeviceEngine, ReduceOp, ThroughHost};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_cubecl::kernel::into_contiguous;
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

/// What the ranks of one engine exchange: each rank's buffer, then rank 0's result.
struct Mailbox<R: CubeRuntime> {
    inputs: Mutex<Vec<Option<CubeTensor<R>>>>,
    /// Rank 0's result of the latest operation (or why there is none). It stays here until
    /// the next one is posted: while the mailbox holds the buffer, no rank's tensor is its only
    /// owner, so no rank writes to it in place while another rank's queued kernels may still
    /// read it (the ranks' streams are not ordered with each other). Emptying it as soon as
    /// every rank had taken it made DDP's and FSDP's ranks diverge on Wgpu in most runs. The
    /// hold ends with the next operation, which in practice comes after the readers have run,
    /// but nothing orders them: a copy per rank would be the guarantee.
    result: Mutex<Option<Result<CubeTensor<R>, String>>>,
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
    fn fail(&self, operation: &'static str, message: impl Into<String>) -> CollectiveError {
        CollectiveError::Engine {
            rank: self.rank,
            engine: "fused",
            operation,
            message: message.into(),
        }
    }

    fn lock<'a, T>(&self, mutex: &'a Mutex<T>) -> MutexGuard<'a, T> {
        // A rank that panicked holding the lock left whole values (no update is half done).
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Rank 0's part: the sum of every rank's buffer, folded in rank order, divided by the
    /// world size for a mean.
    fn combine(&self, inputs: Vec<CubeTensor<R>>, kind: FloatKind, op: ReduceOp) -> CubeTensor<R> {
        let first = &inputs[0];
        let shape = first.meta.shape();
        let len = shape.num_elements();
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
        CubeTensor::new_contiguous(
            client.clone(),
            first.device.clone(),
            shape.clone(),
            sum.0,
            first.dtype,
        )
    }
}

impl<B, C, R> RankEngine<B, C, R>
where
    B: Backend,
    R: CubeRuntime,
    C: FusionBackend<FloatTensorPrimitive = CubeTensor<R>> + BackendIr,
{
    /// Posts `tensor`'s buffer, lets rank 0 make the result from every rank's with `combine`
    /// once all have posted, and returns that result, which the ranks share read-only (with
    /// the fusion client `tensor` came from).
    fn rendezvous(
        &self,
        host: &dyn Collective,
        operation: &'static str,
        tensor: Tensor<B, 1>,
        combine: impl FnOnce(Vec<CubeTensor<R>>) -> CubeTensor<R>,
    ) -> Result<(CubeTensor<R>, FusionClient<C>), CollectiveError> {
        let not_fusion = || self.fail(operation, "the tensor is not of the engine's backend");
        let tensor = same_type::<_, Tensor<Fusion<C>, 1>>(tensor).ok_or_else(not_fusion)?;
        let (cube, client) = into_cube::<R, C>(tensor);
        self.lock(&self.mailbox.inputs)[self.rank] = Some(cube);
        host.barrier()?;
        if self.rank == 0 {
            // Posted even when it failed, so that every rank meets the second barrier and
            // learns of it: the ranks stay in step for the next operation.
            let result = self.gathered_inputs().map(combine);
            *self.lock(&self.mailbox.result) = Some(result);
        }
        // Rank 0 posts the next result only after the next first barrier, which every rank
        // reaches after taking this one.
        host.barrier()?;
        let result = self
            .lock(&self.mailbox.result)
            .clone()
            .unwrap_or_else(|| Err("rank 0 posted no result".into()));
        let combined = result.map_err(|message| self.fail(operation, message))?;
        Ok((combined, client))
    }

    /// Rank 0's part: every rank's posted buffer, in rank order, checked to agree in shape and
    /// dtype.
    fn gathered_inputs(&self) -> Result<Vec<CubeTensor<R>>, String> {
        let inputs: Vec<CubeTensor<R>> = self
            .lock(&self.mailbox.inputs)
            .iter_mut()
            .map(Option::take)
            .collect::<Option<_>>()
            .ok_or("a rank's buffer is missing at the rendezvous")?;
        let first = &inputs[0];
        if let Some(other) = inputs
            .iter()
            .find(|t| t.meta.shape() != first.meta.shape() || t.dtype != first.dtype)
        {
            return Err(format!(
                "ranks passed different buffers: {:?} {:?} and {:?} {:?}",
                first.meta.shape(),
                first.dtype,
                other.meta.shape(),
                other.dtype
            ));
        }
        Ok(inputs)
    }

    /// Every rank's `tensor` combined by the fused kernel (`kind` its dtype, `op` sum or mean),
    /// shared by the ranks.
    fn reduce(
        &self,
        host: &dyn Collective,
        operation: &'static str,
        tensor: Tensor<B, 1>,
        kind: FloatKind,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        let (combined, client) = self.rendezvous(host, operation, tensor, |inputs| {
            self.combine(inputs, kind, op)
        })?;
        self.back(operation, &client, combined)
    }

    /// `cube` back as a tensor of `B`.
    fn back(
        &self,
        operation: &'static str,
        client: &FusionClient<C>,
        cube: CubeTensor<R>,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        same_type::<_, Tensor<B, 1>>(from_cube::<R, C>(client, cube))
            .ok_or_else(|| self.fail(operation, "the tensor is not of the engine's backend"))
    }
}

/// The fused kernel's name for `dtype` when the kernel reduces it with `op` (sum or mean of
/// f32, f16, bf16); `None` for what goes through the host.
fn fused_kind(dtype: DType, op: ReduceOp) -> Option<FloatKind> {
    match (dtype, op) {
        (_, ReduceOp::Min | ReduceOp::Max) => None,
        (DType::F32, _) => Some(FloatKind::F32),
        (DType::F16, _) => Some(FloatKind::F16),
        (DType::BF16, _) => Some(FloatKind::BF16),
        _ => None,
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
        let Some(kind) = fused_kind(tensor.dtype(), op) else {
            return ThroughHost.all_reduce(host, tensor, op);
        };
        self.reduce(host, "all_reduce", tensor, kind, op)
    }

    /// Rank 0 concatenates the ranks' buffers on the device; every rank shares the result.
    fn all_gather(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        let (whole, client) = self.rendezvous(host, "all_gather", tensor, |inputs| {
            into_contiguous(C::float_cat(inputs, 0))
        })?;
        self.back("all_gather", &client, whole)
    }

    /// On one device the work of a reduce-scatter is the whole sum, made once by rank 0 as for
    /// [`all_reduce`](Self::all_reduce); each rank then keeps its block of it (a view).
    fn reduce_scatter(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        let (rank, world) = (host.rank(), host.world_size());
        let len = flat_len_of(
            &tensor.shape().dims::<1>(),
            tensor.dtype(),
            "reduce_scatter",
            rank,
            Some(world),
        )? / world.max(1);
        let Some(kind) = fused_kind(tensor.dtype(), op) else {
            return ThroughHost.reduce_scatter(host, tensor, op);
        };
        let start = self.rank * len;
        let whole = self.reduce(host, "reduce_scatter", tensor, kind, op)?;
        Ok(whole.narrow(0, start, len))
    }

    fn wait(&self) -> Result<(), CollectiveError> {
        // Every kernel ran on the ranks' one device, whose streams order the readers after it.
        Ok(())
    }
}
