//! FSDP's collectives behind the gather operation ([`ShardExchange`]): the rank's collective
//! driven from its [communication thread](crate::comm_thread), so that the gathers of the
//! next unit (started ahead) and the reduce-scatters of the units backward has finished travel
//! while the rank computes.
//!
//! Every rank asks for the same gathers and scatters in the same order, and the thread runs
//! them in that order. A reduce-scatter is handed over and backward goes on; the strategy adds
//! the shards' parts to the gradients when backward ends ([`CollectiveExchange::deliver`]).
//! Errors cannot be returned from inside module mapping and autodiff: the first is kept for
//! the strategy, and the failed collective answers with zeros.
//!
//! With a device engine ([`CollectiveExchange::on_device`]: NCCL between GPUs, the fused engine
//! for ranks sharing one), the gathers and reduce-scatters that stay within this process run on
//! the tensors where they lie ([`OnDevice`]), on the rank's own thread: the engine orders them
//! on the device, and a communication thread beside it would meet the other ranks out of order.

use crate::comm_thread::{CommThread, stopped};
use crate::fsdp::shard_group;
use crate::module::ParamSlot;
use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use fabric_collective::{Collective, DeviceCollective, ReduceOp, slice_flat};
use fabric_core::CollectiveError;
use fabric_core::gather::{DeviceShards, ShardExchange, Started};
use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

/// The rank's collective as a [`ShardExchange`].
pub(crate) struct CollectiveExchange {
    collective: Arc<dyn Collective>,
    /// `hybrid_shard`: gather within the process, average over every rank.
    hybrid: bool,
    comm: CommThread,
    error: Arc<Mutex<Option<CollectiveError>>>,
    /// Whether backward hands its reduce-scatters over and goes on.
    overlap: bool,
    /// Bytes of whole gradients the travelling reduce-scatters may hold at once.
    in_flight_bytes: usize,
    /// Reduce-scatters handed over, by parameter.
    scattered: Mutex<Scatters>,
    /// The path on tensors where they lie, when there is a device engine.
    device: Option<Box<dyn DeviceShards>>,
}

/// The reduce-scatters handed over since the last delivery, oldest first. Each travelling one
/// holds its parameter's whole gradient until it is done, so a backward that outruns the
/// communication waits for the oldest rather than piling them up (PyTorch's FSDP bounds them
/// alike).
#[derive(Default)]
struct Scatters {
    /// Parameter, the wait, the bytes of its whole gradient.
    travelling: VecDeque<(ParamId, Started, usize)>,
    arrived: Vec<(ParamId, TensorData)>,
}

/// A collective of the exchange, run with the rank's collective and the `hybrid` flag.
type Op = Box<dyn FnOnce(&dyn Collective, bool) -> Result<TensorData, CollectiveError> + Send>;

impl CollectiveExchange {
    /// The exchange over `collective` (cutting parameters within each process under `hybrid`);
    /// with `overlap`, backward's reduce-scatters travel while it goes on, holding at most
    /// `in_flight_bytes` of whole gradients (or one gradient) at once.
    pub(crate) fn new(
        collective: Arc<dyn Collective>,
        hybrid: bool,
        overlap: bool,
        in_flight_bytes: usize,
    ) -> Self {
        Self {
            comm: CommThread::new(collective.rank()),
            collective,
            hybrid,
            error: Arc::default(),
            overlap,
            in_flight_bytes,
            scattered: Mutex::default(),
            device: None,
        }
    }

    /// The exchange that gathers and reduce-scatters through `engine` (the device engine of
    /// this process's ranks, for tensors of backend `IB`) what stays within this process, on
    /// the rank's thread: nothing is handed to the communication thread then, so no
    /// reduce-scatter travels while backward goes on, not even those that still go through the
    /// host.
    pub(crate) fn on_device<IB: Backend>(mut self, engine: Arc<dyn DeviceCollective<IB>>) -> Self {
        self.overlap = false;
        self.device = Some(Box::new(OnDevice {
            engine,
            collective: Arc::clone(&self.collective),
            hybrid: self.hybrid,
            error: Arc::clone(&self.error),
        }));
        self
    }

    /// The first error since the last call.
    pub(crate) fn take_error(&self) -> Option<CollectiveError> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Waits for the reduce-scatters handed over during backward and adds each shard's part to
    /// its parameter's gradient in `grads` (in `layout` order, on `device`). After it the
    /// rank's collective is free for the strategy's own collectives.
    pub(crate) fn deliver<IB: Backend>(
        &self,
        layout: &[ParamSlot],
        grads: &mut [Option<Tensor<IB, 1>>],
        device: &IB::Device,
    ) {
        let Scatters {
            travelling,
            arrived,
            ..
        } = std::mem::take(&mut *self.lock_scattered());
        if travelling.is_empty() && arrived.is_empty() {
            return;
        }
        let index: HashMap<ParamId, usize> = layout
            .iter()
            .enumerate()
            .map(|(i, slot)| (slot.id, i))
            .collect();
        let travelled = travelling
            .into_iter()
            .map(|(id, started, _)| (id, started()));
        for (id, part) in arrived.into_iter().chain(travelled) {
            // A parameter of another module (its backward was not Fabric's): waited for only.
            let Some(&i) = index.get(&id) else {
                continue;
            };
            let dtype = part.dtype;
            let part = Tensor::<IB, 1>::from_data(part, (device, dtype));
            let part = match layout[i].dtype == dtype {
                true => part,
                false => part.cast(FloatDType::from(layout[i].dtype)),
            };
            grads[i] = Some(match grads[i].take() {
                Some(grad) => grad + part,
                None => part,
            });
        }
    }

    /// Waits for the reduce-scatters of a backward pass whose gradients will not be delivered
    /// (it failed, or ran outside the strategy) and drops them.
    pub(crate) fn discard(&self) {
        let Scatters { travelling, .. } = std::mem::take(&mut *self.lock_scattered());
        for (_, started, _) in travelling {
            started();
        }
    }

    /// Returns once the communication thread has run everything handed to it (prefetched
    /// gathers, travelling reduce-scatters), so that the rank may run collectives of its own.
    pub(crate) fn wait_idle(&self) {
        self.comm.wait_idle();
    }

    fn lock_scattered(&self) -> std::sync::MutexGuard<'_, Scatters> {
        self.scattered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `op` to the communication thread and returns the wait for its result (see
    /// [`settle`]).
    fn start(&self, operation: &'static str, len: usize, dtype: DType, op: Op) -> Started {
        let (collective, hybrid) = (Arc::clone(&self.collective), self.hybrid);
        let result = self.comm.run(move || op(&*collective, hybrid));
        let (kept, rank) = (Arc::clone(&self.error), self.collective.rank());
        Box::new(move || settle(result.recv().ok(), &kept, rank, operation, len, dtype))
    }

    /// Runs `op` after what the communication thread has (here when it has nothing) and
    /// returns its result (see [`settle`]).
    fn call(&self, operation: &'static str, len: usize, dtype: DType, op: Op) -> TensorData {
        let (collective, hybrid) = (Arc::clone(&self.collective), self.hybrid);
        let result = self.comm.call(move || op(&*collective, hybrid));
        let rank = self.collective.rank();
        settle(result, &self.error, rank, operation, len, dtype)
    }

    /// The all-gather of `shard` (within the process under `hybrid`): the operation and the
    /// length and dtype of its result.
    fn gather_op(&self, shard: TensorData) -> (usize, DType, Op) {
        let (len, dtype) = (shard.num_elements(), shard.dtype);
        let parts = shard_group(&*self.collective, self.hybrid).world_size();
        let op: Op =
            Box::new(move |world, hybrid| shard_group(world, hybrid).all_gather_flat(shard));
        (len * parts, dtype, op)
    }
}

/// FSDP's exchange on tensors of backend `IB` where they lie, through the device engine of this
/// process's ranks: gathers when the ranks that share parameters are this process's (every rank
/// of a one-process job, or `hybrid_shard`'s group), reduce-scatters when every rank is. What
/// spans processes goes through the host.
struct OnDevice<IB: Backend> {
    engine: Arc<dyn DeviceCollective<IB>>,
    collective: Arc<dyn Collective>,
    hybrid: bool,
    /// The exchange's first error.
    error: Arc<Mutex<Option<CollectiveError>>>,
}

impl<IB: Backend> OnDevice<IB> {
    /// The tensor in `slot` when it is one of `IB`.
    fn take(slot: &mut dyn Any) -> Option<(&mut Option<Tensor<IB, 1>>, Tensor<IB, 1>)> {
        let slot = slot.downcast_mut::<Option<Tensor<IB, 1>>>()?;
        let tensor = slot.take()?;
        Some((slot, tensor))
    }

    /// `result`'s tensor, or (the error kept unless one is already) `len` zeros of `dtype`.
    fn settle(
        &self,
        result: Result<Tensor<IB, 1>, CollectiveError>,
        len: usize,
        device: &IB::Device,
        dtype: DType,
    ) -> Tensor<IB, 1> {
        result.unwrap_or_else(|error| {
            keep(&self.error, error);
            Tensor::zeros([len], (device, dtype))
        })
    }
}

impl<IB: Backend> DeviceShards for OnDevice<IB> {
    fn gather(&self, slot: &mut dyn Any) -> bool {
        let across_processes = self.collective.within_process().is_some();
        if across_processes && !self.hybrid {
            return false;
        }
        let Some((slot, shard)) = Self::take(slot) else {
            return false;
        };
        let group = shard_group(&*self.collective, self.hybrid);
        let len = shard.shape().num_elements() * group.world_size();
        let (device, dtype) = (shard.device(), shard.dtype());
        let whole = self.engine.all_gather(group, shard);
        *slot = Some(self.settle(whole, len, &device, dtype));
        true
    }

    /// Reduces in f32 whatever the gradient's dtype, as the host path does.
    fn scatter(&self, slot: &mut dyn Any) -> bool {
        if self.collective.within_process().is_some() {
            return false;
        }
        let Some((slot, grad)) = Self::take(slot) else {
            return false;
        };
        let len = grad.shape().num_elements() / self.collective.world_size().max(1);
        let (device, dtype) = (grad.device(), grad.dtype());
        let grad = match dtype {
            DType::F32 | DType::F64 => grad,
            _ => grad.cast(FloatDType::F32),
        };
        let part = self
            .engine
            .reduce_scatter(&*self.collective, grad, ReduceOp::Mean)
            .map(|part| match part.dtype() == dtype {
                true => part,
                false => part.cast(FloatDType::from(dtype)),
            });
        *slot = Some(self.settle(part, len, &device, dtype));
        true
    }
}

/// Keeps `error` in `kept` unless an earlier one is there: the strategy reports the first.
fn keep(kept: &Mutex<Option<CollectiveError>>, error: CollectiveError) {
    kept.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert(error);
}

/// The data of an exchange's collective, or (when it failed, or the communication thread
/// stopped: `None`) `len` zeros of `dtype`, the error kept in `kept` unless one is already.
fn settle(
    result: Option<Result<TensorData, CollectiveError>>,
    kept: &Mutex<Option<CollectiveError>>,
    rank: usize,
    operation: &'static str,
    len: usize,
    dtype: DType,
) -> TensorData {
    let error = match result {
        Some(Ok(data)) => return data,
        Some(Err(error)) => error,
        None => stopped(rank, "fsdp", operation),
    };
    keep(kept, error);
    TensorData::zeros::<f32, _>([len]).convert_dtype(dtype)
}

/// The averaged gradient's part for this rank's shard: a reduce-scatter over every rank, or
/// under `hybrid_shard` across processes an all-reduce over every rank and this rank's block of
/// its process's cut.
fn average(
    world: &dyn Collective,
    hybrid: bool,
    grad: TensorData,
) -> Result<TensorData, CollectiveError> {
    let Some(group) = world.within_process().filter(|_| hybrid) else {
        return world.reduce_scatter(grad, ReduceOp::Mean);
    };
    let len = grad.num_elements() / group.world_size().max(1);
    let start = group.rank() * len;
    let whole = world.all_reduce(grad, ReduceOp::Mean)?;
    slice_flat(&whole, start..start + len).ok_or_else(|| CollectiveError::InvalidShape {
        rank: world.rank(),
        operation: "reduce_scatter",
        shape: whole.shape.to_vec(),
        valid: format!("a length that divides into {} shards", group.world_size()),
    })
}

impl ShardExchange for CollectiveExchange {
    fn device(&self) -> Option<&dyn DeviceShards> {
        self.device.as_deref()
    }

    fn gather(&self, shard: TensorData) -> TensorData {
        let (len, dtype, op) = self.gather_op(shard);
        self.call("all_gather", len, dtype, op)
    }

    fn start_gather(&self, shard: TensorData) -> Started {
        let (len, dtype, op) = self.gather_op(shard);
        self.start("all_gather", len, dtype, op)
    }

    /// With `overlap`, hands the reduce-scatter to the communication thread and lets backward
    /// go on (`None`): [`deliver`](CollectiveExchange::deliver) adds the result; otherwise
    /// returns it. Reduces in f32 whatever the gradient's dtype (half-precision gradients of
    /// `*-mixed`).
    fn scatter(&self, id: ParamId, grad: TensorData) -> Option<TensorData> {
        let (len, dtype) = (grad.num_elements(), grad.dtype);
        let parts = shard_group(&*self.collective, self.hybrid)
            .world_size()
            .max(1);
        let grad = match dtype {
            DType::F32 | DType::F64 => grad,
            _ => grad.convert::<f32>(),
        };
        let op: Op = Box::new(move |world, hybrid| {
            let shard = average(world, hybrid, grad)?;
            Ok(match shard.dtype == dtype {
                true => shard,
                false => shard.convert_dtype(dtype),
            })
        });
        if !self.overlap {
            return Some(self.call("reduce_scatter", len / parts, dtype, op));
        }
        let started = self.start("reduce_scatter", len / parts, dtype, op);
        let bytes = len * dtype.size();
        let mut scattered = self.lock_scattered();
        scattered.travelling.push_back((id, started, bytes));
        let held = |s: &Scatters| {
            s.travelling
                .iter()
                .map(|(_, _, bytes)| bytes)
                .sum::<usize>()
        };
        while held(&scattered) > self.in_flight_bytes && scattered.travelling.len() > 1 {
            if let Some((id, started, _)) = scattered.travelling.pop_front() {
                scattered.arrived.push((id, started()));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use fabric_collective::ThreadGroup;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    /// Backward does not wait for a reduce-scatter: rank 0 hands its gradient over and goes on
    /// before rank 1 has even reached its own (a scatter that waited would time out here), and
    /// the averaged part arrives with `deliver`.
    #[test]
    fn a_scatter_lets_backward_go_on_and_its_part_arrives_when_delivered() {
        let group = ThreadGroup::new(2, Duration::from_secs(5));
        let id = ParamId::new();
        let layout = [ParamSlot {
            id,
            numel: 2,
            dtype: DType::F32,
        }];
        let (handed, go) = channel::<()>();
        let mut go = Some(go);
        let threads: Vec<_> = (0..2)
            .map(|rank| {
                let member: Arc<dyn Collective> = Arc::new(group.member(rank));
                let go = if rank == 1 { go.take() } else { None };
                let handed = handed.clone();
                std::thread::spawn(move || {
                    let exchange = CollectiveExchange::new(member, false, true, 1 << 20);
                    if let Some(go) = go {
                        go.recv().unwrap();
                    }
                    let grad = TensorData::new(vec![1.0 + rank as f32; 4], [4]);
                    assert!(exchange.scatter(id, grad).is_none());
                    // Rank 1 has dropped the receiver by now: only rank 0's word counts.
                    handed.send(()).ok();
                    let device = Default::default();
                    let mut grads = vec![Some(Tensor::<Flex, 1>::from_floats([10., 20.], &device))];
                    exchange.deliver(&layout, &mut grads, &device);
                    assert!(exchange.take_error().is_none());
                    grads[0]
                        .take()
                        .unwrap()
                        .into_data()
                        .to_vec::<f32>()
                        .unwrap()
                })
            })
            .collect();
        let results: Vec<Vec<f32>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // Each rank's part of the mean of [1; 4] and [2; 4], added to what backward left.
        assert_eq!(results, [vec![11.5, 21.5], vec![11.5, 21.5]]);
    }

    /// Counts the exchanges that reach it and runs them through the host.
    struct Counting(Arc<[std::sync::atomic::AtomicUsize; 2]>);

    impl DeviceCollective<Flex> for Counting {
        fn all_reduce(
            &self,
            host: &dyn Collective,
            tensor: Tensor<Flex, 1>,
            op: ReduceOp,
        ) -> Result<Tensor<Flex, 1>, CollectiveError> {
            fabric_collective::ThroughHost.all_reduce(host, tensor, op)
        }

        fn all_gather(
            &self,
            host: &dyn Collective,
            tensor: Tensor<Flex, 1>,
        ) -> Result<Tensor<Flex, 1>, CollectiveError> {
            self.0[0].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            fabric_collective::ThroughHost.all_gather(host, tensor)
        }

        fn reduce_scatter(
            &self,
            host: &dyn Collective,
            tensor: Tensor<Flex, 1>,
            op: ReduceOp,
        ) -> Result<Tensor<Flex, 1>, CollectiveError> {
            self.0[1].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            fabric_collective::ThroughHost.reduce_scatter(host, tensor, op)
        }

        fn wait(&self) -> Result<(), CollectiveError> {
            Ok(())
        }
    }

    /// With a device engine the gather operation hands the engine the tensors themselves, one
    /// all-gather forward and one reduce-scatter backward per rank, and the shard's gradient is
    /// there when backward returns (nothing is delivered later, even with overlap asked for).
    #[test]
    fn a_device_engine_gathers_and_scatters_the_tensors() {
        use burn::backend::Autodiff;
        use fabric_core::gather::GatherParam;
        type B = Autodiff<Flex>;
        let group = ThreadGroup::new(2, Duration::from_secs(5));
        let counts: Arc<[std::sync::atomic::AtomicUsize; 2]> = Arc::default();
        let threads: Vec<_> = (0..2)
            .map(|rank| {
                let member: Arc<dyn Collective> = Arc::new(group.member(rank));
                let engine: Arc<dyn DeviceCollective<Flex>> =
                    Arc::new(Counting(Arc::clone(&counts)));
                std::thread::spawn(move || {
                    let exchange = CollectiveExchange::new(member, false, true, 1 << 20);
                    let exchange: Arc<dyn ShardExchange> = Arc::new(exchange.on_device(engine));
                    let device = Default::default();
                    let r = rank as f32;
                    let shard =
                        Tensor::<B, 1>::from_floats([1. + r, 2. + r], &device).require_grad();
                    let whole =
                        B::gather_param(shard.clone(), ParamId::new(), None, exchange, false);
                    let weights = Tensor::<B, 1>::from_floats([1., 2., 3., 4.], &device) * (r + 1.);
                    let grads = (whole.clone() * weights).sum().backward();
                    let values = |t: Tensor<Flex, 1>| t.into_data().to_vec::<f32>().unwrap();
                    (values(whole.inner()), values(shard.grad(&grads).unwrap()))
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for (whole, _) in &results {
            assert_eq!(whole, &[1., 2., 2., 3.]);
        }
        // The mean of [1, 2, 3, 4] and twice that, cut in two.
        assert_eq!(results[0].1, [1.5, 3.]);
        assert_eq!(results[1].1, [4.5, 6.]);
        let count = |i: usize| counts[i].load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            (count(0), count(1)),
            (2, 2),
            "gathers and scatters through the engine"
        );
    }
}
