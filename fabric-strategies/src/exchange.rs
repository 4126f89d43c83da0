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

use crate::comm_thread::{CommThread, stopped};
use crate::fsdp::shard_group;
use crate::module::ParamSlot;
use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use fabric_collective::{Collective, ReduceOp, slice_flat};
use fabric_core::CollectiveError;
use fabric_core::gather::{ShardExchange, Started};
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
        }
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
    kept.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert(error);
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
}
