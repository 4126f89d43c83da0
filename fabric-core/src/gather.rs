//! Whole parameters from shards, inside autodiff (what FSDP's forward runs on): an operation
//! whose forward all-gathers a rank's flat shard into the whole flat parameter and whose backward
//! reduce-scatters the whole parameter's gradient back into the shard's gradient, so that a
//! rank's backward leaves it only its own part of each gradient, already averaged.
//!
//! The collective is behind [`ShardExchange`] (a strategy implements it), so this crate knows
//! nothing of engines. An exchange moves host data, or, where its engine exchanges buffers where
//! they lie (NCCL between GPUs, the fused engine for ranks sharing one), tensors
//! ([`DeviceShards`]). The backward runs inside Burn's backward pass, where an error cannot be
//! returned: an exchange records its first error itself and answers with zeros, and the strategy
//! reports it when the backward pass ends.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorMetadata, TensorPrimitive};
use std::any::{Any, TypeId};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::watch::GradSink;
use burn::module::ParamId;

/// The collectives behind a sharded parameter, on host data of one dimension.
pub trait ShardExchange: Send + Sync {
    /// The whole flat parameter: every rank's `shard` concatenated in rank order (an
    /// all-gather). On failure: zeros of that length, the error kept for the strategy.
    fn gather(&self, shard: TensorData) -> TensorData;

    /// This rank's part of `grad` (the whole gradient of parameter `id`, flat) averaged over
    /// the ranks (a reduce-scatter), for backward to add to the shard's gradient. On failure:
    /// zeros of the shard's length, the error kept. `None` when the exchange delivers that
    /// part itself, later (its strategy adds it to the gradient of `id` when backward ends),
    /// so that backward goes on while it travels.
    fn scatter(&self, id: ParamId, grad: TensorData) -> Option<TensorData>;

    /// Starts [`gather`](Self::gather) of `shard` and returns the wait for its result, so that
    /// the caller computes while it travels (FSDP's prefetch of the next unit). The exchange
    /// runs what was started and the later calls in the order they were made. By default the
    /// gather runs now and the wait returns it.
    fn start_gather(&self, shard: TensorData) -> Started {
        let whole = self.gather(shard);
        Box::new(move || whole)
    }

    /// The exchange on tensors where they lie, when its engine has such a path; the gather
    /// operation tries it first. `None` (the default): everything goes through host data.
    fn device(&self) -> Option<&dyn DeviceShards> {
        None
    }
}

/// [`ShardExchange::gather`] and [`ShardExchange::scatter`] on tensors where they lie (device
/// memory), for the one backend the exchange was made for: the backend under autodiff whose
/// tensors FSDP's parameters are.
///
/// A tensor travels in a slot, `&mut Option<Tensor<B, 1>>` as `&mut dyn Any`: the method takes
/// it and puts the result in its place (`true`), or, when the slot is not of its backend (or
/// the exchange has no device path for this operation), leaves it as it was (`false`) for the
/// caller to go through the host. Failures are kept and answered with zeros, as on the host.
pub trait DeviceShards: Send + Sync {
    /// The whole flat parameter from the shard in `slot` (an all-gather).
    fn gather(&self, slot: &mut dyn Any) -> bool;

    /// This rank's part of the whole flat gradient in `slot`, averaged over the ranks (a
    /// reduce-scatter); never delivered later.
    fn scatter(&self, slot: &mut dyn Any) -> bool;
}

/// `op` of `exchange`'s device path on `tensor`: `Ok` with the result when it ran there, `Err`
/// with `tensor` unchanged when the exchange has no device path for it.
fn on_device<B: Backend>(
    exchange: &dyn ShardExchange,
    tensor: FloatTensor<B>,
    op: impl FnOnce(&dyn DeviceShards, &mut dyn Any) -> bool,
) -> Result<FloatTensor<B>, FloatTensor<B>> {
    let Some(device) = exchange.device() else {
        return Err(tensor);
    };
    let mut slot = Some(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(
        tensor,
    )));
    let done = op(device, &mut slot);
    match slot {
        Some(tensor) if done => Ok(tensor.into_primitive().tensor()),
        Some(tensor) => Err(tensor.into_primitive().tensor()),
        None => unreachable!("a device path puts a tensor back in the slot it takes from"),
    }
}

/// `exchange`'s gather of `shard`: on the device when the exchange can, else through host data.
fn gather_whole<B: Backend>(exchange: &dyn ShardExchange, shard: FloatTensor<B>) -> FloatTensor<B> {
    on_device::<B>(exchange, shard, |device, slot| device.gather(slot))
        .unwrap_or_else(|shard| through_host::<B>(shard, |s| exchange.gather(s)))
}

/// A gather under way ([`ShardExchange::start_gather`]): call it to wait for the whole flat
/// parameter.
pub type Started = Box<dyn FnOnce() -> TensorData + Send>;

/// An exchange whose first gather was started ahead ([`ShardExchange::start_gather`]): that
/// gather waits for the started one; later gathers (backward's, when the forward's result was
/// released) and scatters go to the exchange.
pub struct Prefetched {
    started: std::sync::Mutex<Option<Started>>,
    exchange: Arc<dyn ShardExchange>,
}

impl Prefetched {
    /// `started`, a gather of `exchange`, as the first gather of the returned exchange.
    pub fn new(started: Started, exchange: Arc<dyn ShardExchange>) -> Self {
        Self {
            started: std::sync::Mutex::new(Some(started)),
            exchange,
        }
    }
}

impl ShardExchange for Prefetched {
    fn gather(&self, shard: TensorData) -> TensorData {
        let started = self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match started {
            Some(started) => started(),
            None => self.exchange.gather(shard),
        }
    }

    fn scatter(&self, id: ParamId, grad: TensorData) -> Option<TensorData> {
        self.exchange.scatter(id, grad)
    }

    fn start_gather(&self, shard: TensorData) -> Started {
        self.exchange.start_gather(shard)
    }
}

/// A backend on which a forward pass can gather whole parameters from shards.
///
/// The provided method gathers without a gradient (inference on a plain backend); `Autodiff`
/// overrides it with the operation of this module.
pub trait GatherParam: Backend {
    /// `exchange.gather(shard)` as a tensor on `shard`'s device. Under autodiff the result is
    /// tracked: its gradient reaches `shard` as `exchange.scatter` of the whole gradient (of
    /// parameter `id`, whose shard `shard` is).
    ///
    /// `after`, the input of the unit that uses the parameter, orders the backward pass: the
    /// reduce-scatter then runs as soon as the unit's backward is done (and the whole gradient
    /// is freed then), instead of at the end of the backward pass. It receives no gradient
    /// from this operation.
    ///
    /// With `release`, backward gathers the parameter again instead of keeping the result
    /// alive from forward to backward (effective when the autodiff backend checkpoints
    /// memory-bound operations, `Autodiff<_, BalancedCheckpointing>`; the default keeps it).
    fn gather_param(
        shard: Tensor<Self, 1>,
        id: ParamId,
        after: Option<FloatTensor<Self>>,
        exchange: Arc<dyn ShardExchange>,
        release: bool,
    ) -> Tensor<Self, 1> {
        let _ = (id, after, release);
        gather_untracked(shard, exchange.as_ref())
    }

    /// `param` unchanged; under autodiff its gradient from this use goes to `sink` (not to
    /// `param`) right after the consumers of `after`, the input of the unit that uses it, are
    /// done (see [`crate::watch`]). The identity elsewhere.
    fn watch_param(
        param: FloatTensor<Self>,
        after: FloatTensor<Self>,
        sink: Arc<dyn GradSink>,
        id: ParamId,
    ) -> FloatTensor<Self> {
        let _ = (after, sink, id);
        param
    }
}

/// `exchange.gather(shard)` as a tensor of any backend, without a gradient.
pub fn gather_untracked<B: Backend>(
    shard: Tensor<B, 1>,
    exchange: &dyn ShardExchange,
) -> Tensor<B, 1> {
    let whole = gather_whole::<B>(exchange, shard.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(whole))
}

/// [`GatherParam::gather_param`] of one backend `B` (the training backend), callable from code
/// generic over any backend: on tensors of `B` it is the tracked gather, on any other backend
/// (the inference module, `model.valid()`) [`gather_untracked`].
#[derive(Clone, Copy)]
pub struct TrackedGather {
    backend: TypeId,
    gather: ErasedGather,
    watch: ErasedWatch,
}

type ErasedGather = fn(
    Box<dyn Any>,
    ParamId,
    Option<Box<dyn Any>>,
    Arc<dyn ShardExchange>,
    bool,
) -> Option<Box<dyn Any>>;

type ErasedWatch =
    fn(Box<dyn Any>, Box<dyn Any>, Arc<dyn GradSink>, ParamId) -> Option<Box<dyn Any>>;

/// `B::watch_param` on boxed `FloatTensor<B>`s.
fn erased_watch<B: GatherParam>(
    param: Box<dyn Any>,
    after: Box<dyn Any>,
    sink: Arc<dyn GradSink>,
    id: ParamId,
) -> Option<Box<dyn Any>> {
    let param = param.downcast::<FloatTensor<B>>().ok()?;
    let after = after.downcast::<FloatTensor<B>>().ok()?;
    Some(Box::new(B::watch_param(*param, *after, sink, id)))
}

/// `B::gather_param` on boxed `Tensor<B, 1>` and `FloatTensor<B>`.
fn erased<B: GatherParam>(
    shard: Box<dyn Any>,
    id: ParamId,
    after: Option<Box<dyn Any>>,
    exchange: Arc<dyn ShardExchange>,
    release: bool,
) -> Option<Box<dyn Any>> {
    let shard = shard.downcast::<Tensor<B, 1>>().ok()?;
    let after = after.and_then(|t| t.downcast::<FloatTensor<B>>().ok().map(|t| *t));
    Some(Box::new(B::gather_param(
        *shard, id, after, exchange, release,
    )))
}

impl TrackedGather {
    /// The tracked gather of `B`.
    pub fn of<B: GatherParam>() -> Self {
        Self {
            backend: TypeId::of::<B>(),
            gather: erased::<B>,
            watch: erased_watch::<B>,
        }
    }

    /// Whether `BT` is the training backend these operations track.
    pub fn tracks<BT: Backend>(&self) -> bool {
        TypeId::of::<BT>() == self.backend
    }

    /// The watch of `param` (see [`GatherParam::watch_param`]) when `BT` is the training
    /// backend; `param` itself on any other backend.
    pub fn watch<BT: Backend, const D: usize>(
        &self,
        param: Tensor<BT, D>,
        after: FloatTensor<BT>,
        sink: &Arc<dyn GradSink>,
        id: ParamId,
    ) -> Tensor<BT, D> {
        if TypeId::of::<BT>() != self.backend {
            return param;
        }
        let param = Box::new(param.into_primitive().tensor());
        let watched = (self.watch)(param, Box::new(after), Arc::clone(sink), id);
        match watched.and_then(|w| w.downcast::<FloatTensor<BT>>().ok()) {
            Some(watched) => Tensor::from_primitive(TensorPrimitive::Float(*watched)),
            // `BT` is the backend `watch` was made for, so both casts hold.
            None => unreachable!("the tracked watch's backend is BT"),
        }
    }

    /// The gather of `shard`, parameter `id`'s (see [`GatherParam::gather_param`] for `after`
    /// and `release`).
    pub fn gather<BT: Backend>(
        &self,
        shard: Tensor<BT, 1>,
        id: ParamId,
        after: Option<FloatTensor<BT>>,
        exchange: &Arc<dyn ShardExchange>,
        release: bool,
    ) -> Tensor<BT, 1> {
        if TypeId::of::<BT>() != self.backend {
            return gather_untracked(shard, exchange.as_ref());
        }
        let after = after.map(|t| Box::new(t) as Box<dyn Any>);
        let whole = (self.gather)(Box::new(shard), id, after, Arc::clone(exchange), release);
        match whole.and_then(|w| w.downcast::<Tensor<BT, 1>>().ok()) {
            Some(whole) => *whole,
            // `BT` is the backend `gather` was made for, so both casts hold.
            None => unreachable!("the tracked gather's backend is BT"),
        }
    }
}

/// The exchange, the parameter it gathers and the length of the shard, carried through the
/// autodiff graph as the operation's state.
#[derive(Clone)]
struct Exchange(Arc<dyn ShardExchange>, ParamId, usize);

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShardExchange")
    }
}

/// Runs `op` on a float primitive of backend `B` through host data, keeping its dtype.
fn through_host<B: Backend>(
    primitive: FloatTensor<B>,
    op: impl FnOnce(TensorData) -> TensorData,
) -> FloatTensor<B> {
    let device = B::float_device(&primitive);
    let data = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(primitive)).into_data();
    B::float_from_data(op(data), &device)
}

/// Backward of the gather: the reduce-scatter of the whole gradient into the shard's. The
/// second parent (the unit's input, or the shard itself) only orders the step.
#[derive(Debug)]
struct Scatter;

impl<B: Backend> Backward<B, 2> for Scatter {
    type State = Exchange;

    fn backward(self, ops: Ops<Exchange, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [shard, _after] = ops.parents;
        // The sum over every use of the gathered parameter: all its consumers ran before this.
        let grad = grads.consume::<B>(&ops.node);
        if let Some(shard) = shard {
            let Exchange(exchange, id, len) = ops.state;
            let grad = match on_device::<B>(&*exchange, grad, |device, slot| device.scatter(slot)) {
                Ok(part) => {
                    grads.register::<B>(shard.id, part);
                    return;
                }
                Err(grad) => grad,
            };
            let (device, dtype) = (B::float_device(&grad), grad.dtype());
            let grad = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grad)).into_data();
            let part = match exchange.scatter(id, grad) {
                Some(part) => B::float_from_data(part, &device),
                // The exchange delivers the part after backward; the operations between the
                // parameter and its shard (a reshape, a cast) still need a gradient to pass on.
                None => B::float_zeros([len].into(), &device, dtype.into()),
            };
            grads.register::<B>(shard.id, part);
        }
    }
}

/// Gathers the parameter again when backward needs it (the forward's copy was released).
struct Regather<B> {
    shard: NodeId,
    /// The ordering parent, when tracked: the checkpointer counted one use of it for this
    /// recomputation, which must take it once.
    after: Option<NodeId>,
    exchange: Exchange,
    _backend: PhantomData<fn() -> B>,
}

impl<B> fmt::Debug for Regather<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Regather({:?})", self.shard)
    }
}

impl<B: Backend> RetroForward for Regather<B> {
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        let shard: FloatTensor<B> = states.get_state(&self.shard);
        if let Some(after) = &self.after {
            let _: FloatTensor<B> = states.get_state(after);
        }
        states.save(out, gather_whole::<B>(&*self.exchange.0, shard));
    }
}

impl<B: Backend, C: CheckpointStrategy> GatherParam for Autodiff<B, C> {
    fn watch_param(
        param: FloatTensor<Self>,
        after: FloatTensor<Self>,
        sink: Arc<dyn GradSink>,
        id: ParamId,
    ) -> FloatTensor<Self> {
        crate::watch::watch::<B, C>(param, after, sink, id)
    }

    fn gather_param(
        shard: Tensor<Self, 1>,
        id: ParamId,
        after: Option<FloatTensor<Self>>,
        exchange: Arc<dyn ShardExchange>,
        release: bool,
    ) -> Tensor<Self, 1> {
        let shard = shard.into_primitive().tensor();
        let len = shard.primitive.shape().num_elements();
        let exchange = Exchange(exchange, id, len);
        let whole = gather_whole::<B>(&*exchange.0, shard.primitive.clone());
        let release = release && shard.is_tracked();
        // Without a unit's input the shard orders itself: no effect on when the step runs.
        let after = after.unwrap_or_else(|| shard.clone());
        let ordered = after.node.id != shard.node.id && after.is_tracked();
        let prep = Scatter.prepare::<C>([shard.node.clone(), after.node.clone()]);
        let prep = match release {
            true => {
                // Only tracked parents may be listed (an untracked one would make the operation
                // compute-bound, its result kept), each once.
                let parents: Vec<_> = std::iter::once(&shard)
                    .chain(ordered.then_some(&after))
                    .collect();
                prep.memory_bound()
                    .retro_forward(Regather::<B> {
                        shard: shard.node.id,
                        after: ordered.then_some(after.node.id),
                        exchange: exchange.clone(),
                        _backend: PhantomData,
                    })
                    .parents(parents)
            }
            false => prep.compute_bound(),
        };
        let out = match prep.stateful() {
            OpsKind::Tracked(prep) => prep.finish(exchange, whole),
            OpsKind::UnTracked(prep) => prep.finish(whole),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use std::sync::Mutex;

    /// One rank: the gather and the scatter are identities that write their name to a log.
    struct Logged {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl ShardExchange for Logged {
        fn gather(&self, shard: TensorData) -> TensorData {
            self.log
                .lock()
                .unwrap()
                .push(format!("gather {}", self.name));
            shard
        }

        fn scatter(&self, _: ParamId, grad: TensorData) -> Option<TensorData> {
            self.log
                .lock()
                .unwrap()
                .push(format!("scatter {}", self.name));
            Some(grad)
        }
    }

    /// Two units `relu(x W1) W2`, each weight gathered by the operation, unit 2's after its
    /// input (with `ordered`); unit 2's input passes a logging identity so that the log shows
    /// when unit 2's backward is done. Returns the log and the weights' gradients.
    fn two_units<B: GatherParam + burn::tensor::backend::AutodiffBackend>(
        ordered: bool,
        release: bool,
    ) -> (Vec<String>, Vec<Vec<f32>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let exchange = |name| -> Arc<dyn ShardExchange> {
            Arc::new(Logged {
                name,
                log: Arc::clone(&log),
            })
        };
        let device = Default::default();
        let values = |n: usize, salt: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32) * 0.37 + salt).sin()).collect()
        };
        let x = Tensor::<B, 2>::from_data(TensorData::new(values(6, 0.1), [2, 3]), &device);
        let w1 = Tensor::<B, 1>::from_data(TensorData::new(values(12, 0.2), [12]), &device)
            .require_grad();
        let w2 =
            Tensor::<B, 1>::from_data(TensorData::new(values(8, 0.3), [8]), &device).require_grad();
        let g1 = B::gather_param(w1.clone(), ParamId::new(), None, exchange("w1"), release);
        let y1 = burn::tensor::activation::relu(x.matmul(g1.reshape([3, 4])));
        let hooked = B::gather_param(
            y1.reshape([8]),
            ParamId::new(),
            None,
            exchange("unit 2's input"),
            false,
        )
        .reshape([2, 4]);
        let after = ordered.then(|| hooked.clone().into_primitive().tensor());
        let g2 = B::gather_param(w2.clone(), ParamId::new(), after, exchange("w2"), release);
        let loss = hooked.matmul(g2.reshape([4, 2])).sum();
        let grads = loss.backward();
        let grad = |w: &Tensor<B, 1>| -> Vec<f32> {
            w.grad(&grads).unwrap().into_data().to_vec().unwrap()
        };
        let grads = vec![grad(&w1), grad(&w2)];
        let log = log.lock().unwrap().clone();
        (log, grads)
    }

    fn scatters(log: &[String]) -> Vec<&str> {
        log.iter()
            .filter_map(|e| e.strip_prefix("scatter "))
            .collect()
    }

    #[test]
    fn an_ordered_gather_reduce_scatters_right_after_its_unit() {
        type B = Autodiff<Flex>;
        let (log, ordered) = two_units::<B>(true, false);
        assert_eq!(scatters(&log), ["w2", "unit 2's input", "w1"], "{log:?}");
        // Unordered, both weights wait for the end of backward.
        let (log, unordered) = two_units::<B>(false, false);
        assert_eq!(scatters(&log)[0], "unit 2's input", "{log:?}");
        assert_eq!(ordered, unordered, "the order changes when, not what");
    }

    /// Keeps each scattered gradient to deliver later.
    #[derive(Default)]
    struct Later(Mutex<Vec<(ParamId, Vec<f32>)>>);

    impl ShardExchange for Later {
        fn gather(&self, shard: TensorData) -> TensorData {
            shard
        }
        fn scatter(&self, id: ParamId, grad: TensorData) -> Option<TensorData> {
            self.0.lock().unwrap().push((id, grad.to_vec().unwrap()));
            None
        }
    }

    #[test]
    fn a_scatter_delivered_later_leaves_backward_a_zero_gradient_to_pass_on() {
        type B = Autodiff<Flex>;
        let device = Default::default();
        let later = Arc::new(Later::default());
        // A [2, 3] parameter whose shard reaches the gather through a reshape (as FSDP's do).
        let param =
            Tensor::<B, 2>::from_floats([[1., 2., 3.], [4., 5., 6.]], &device).require_grad();
        let id = ParamId::new();
        let whole = B::gather_param(param.clone().reshape([6]), id, None, later.clone(), false);
        let grads = (whole.clone() * whole).sum().backward();
        let kept = later.0.lock().unwrap().clone();
        assert_eq!(kept, [(id, vec![2., 4., 6., 8., 10., 12.])]);
        let passed: Vec<f32> = param.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert_eq!(passed, [0.; 6]);
    }

    #[test]
    fn a_released_gather_is_gathered_again_for_backward() {
        type Balanced = Autodiff<Flex, BalancedCheckpointing>;
        let count = |log: &[String]| log.iter().filter(|e| *e == "gather w2").count();
        let (log, released) = two_units::<Balanced>(true, true);
        // Unit 2 needs its weight for its input's gradient; unit 1's input is data, so its
        // weight is not needed again.
        assert_eq!(count(&log), 2, "{log:?}");
        assert_eq!(
            log.iter().filter(|e| *e == "gather w1").count(),
            1,
            "{log:?}"
        );
        let (log, kept) = two_units::<Balanced>(true, false);
        assert_eq!(count(&log), 1, "{log:?}");
        assert_eq!(released, kept);
        let (log, _) = two_units::<Autodiff<Flex>>(true, true);
        assert_eq!(count(&log), 1, "the default autodiff keeps it: {log:?}");
    }
}
