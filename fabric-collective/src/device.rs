//! Collectives on tensors where they lie (device memory), for engines that exchange without a
//! round trip through the host: NCCL on CUDA (feature `cuda`), the fused kernel for ranks that
//! share one device. The host [`Collective`] stays the engine for everything else (the façade's
//! collectives, CPU ranks, MPI processes); DDP and FSDP ask for a [`DeviceEngine`] at
//! configuration time and, where there is one, DDP averages its gradient buckets and FSDP
//! gathers and reduce-scatters its shards through it.
//!
//! [`Collective`]: crate::Collective

use crate::{Collective, ReduceOp};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use fabric_core::CollectiveError;
use std::sync::Arc;

/// Reduces one rank's tensors with the other local ranks' on their own devices. Every rank of
/// the engine calls the same operations in the same order, with equal shapes and dtypes.
pub trait DeviceCollective<B: Backend>: Send + Sync {
    /// Combines `tensor` across the ranks element-wise (in place when the tensor is contiguous
    /// and not shared). Only [`ReduceOp::Sum`] and [`ReduceOp::Mean`] are device operations;
    /// the others are [`CollectiveError::Engine`] errors. `host` is the rank's host
    /// collective, for engines that meet the other ranks through it.
    fn all_reduce(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError>;

    /// Concatenates every rank's `tensor` (the same length and dtype on every rank) in rank
    /// order (PyTorch's `all_gather_into_tensor`). By default through the host
    /// ([`Collective::all_gather_flat`]); engines that move device buffers override it.
    fn all_gather(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        through_host(tensor, |data| host.all_gather_flat(data))
    }

    /// Combines `tensor` (its length a multiple of the world size, the same on every rank)
    /// across the ranks with `op` and returns this rank's part: elements
    /// `[rank * n / world, (rank + 1) * n / world)` (PyTorch's `reduce_scatter_tensor`). By
    /// default through the host ([`Collective::reduce_scatter`]); engines that move device
    /// buffers override it.
    fn reduce_scatter(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        through_host(tensor, |data| host.reduce_scatter(data, op))
    }

    /// Returns once every collective this rank issued has finished, so the results can be read
    /// and written by whatever runs next.
    fn wait(&self) -> Result<(), CollectiveError>;
}

/// `exchange` of `tensor`'s data on the host, the result back on `tensor`'s device in its dtype.
fn through_host<B: Backend>(
    tensor: Tensor<B, 1>,
    exchange: impl FnOnce(TensorData) -> Result<TensorData, CollectiveError>,
) -> Result<Tensor<B, 1>, CollectiveError> {
    let (device, dtype) = (tensor.device(), tensor.dtype());
    Ok(Tensor::from_data(
        exchange(tensor.into_data())?,
        (&device, dtype),
    ))
}

/// The device collective that goes through the host: the tensor is read into host memory,
/// exchanged by the rank's host collective and written back to its device. Engines fall back to
/// it for what their kernels do not cover (`f64` buffers, say); tests use it to run device-path
/// logic on CPU backends.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThroughHost;

impl<B: Backend> DeviceCollective<B> for ThroughHost {
    fn all_reduce(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        through_host(tensor, |data| host.all_reduce(data, op))
    }

    fn wait(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Makes each local rank's [`DeviceCollective`]; shared by the ranks of one process.
#[derive(Clone)]
pub struct DeviceEngine<B: Backend> {
    name: &'static str,
    make: Arc<dyn Fn(usize) -> Box<dyn DeviceCollective<B>> + Send + Sync>,
}

impl<B: Backend> DeviceEngine<B> {
    /// An engine whose rank `r` collective is `make(r)`.
    pub fn new(
        name: &'static str,
        make: impl Fn(usize) -> Box<dyn DeviceCollective<B>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            make: Arc::new(make),
        }
    }

    /// The engine's name (`"nccl"`, `"fused"`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The collective of local rank `local_rank`.
    pub fn for_rank(&self, local_rank: usize) -> Box<dyn DeviceCollective<B>> {
        (self.make)(local_rank)
    }
}

impl<B: Backend> std::fmt::Debug for DeviceEngine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEngine")
            .field("name", &self.name)
            .finish()
    }
}

/// `value` as type `U`, which it is (checked by the caller's `TypeId` test): how a concrete
/// engine serves a generic backend without specialisation. `None` when the types differ.
pub fn same_type<T: 'static, U: 'static>(value: T) -> Option<U> {
    (Box::new(value) as Box<dyn std::any::Any>)
        .downcast::<U>()
        .ok()
        .map(|boxed| *boxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_type_casts_only_to_the_same_type() {
        assert_eq!(same_type::<u32, u32>(7), Some(7));
        assert_eq!(same_type::<u32, i32>(7), None);
    }
}
