//! Whole parameters from shards, inside autodiff (what FSDP's forward runs on): an operation
//! whose forward all-gathers a rank's flat shard into the whole flat parameter and whose backward
//! reduce-scatters the whole parameter's gradient back into the shard's gradient, so that a
//! rank's backward leaves it only its own part of each gradient, already averaged.
//!
//! The collective is behind [`ShardExchange`] (a strategy implements it), so this crate knows
//! nothing of engines. The backward runs inside Burn's backward pass, where an error cannot be
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
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// The collectives behind a sharded parameter, on host data of one dimension.
pub trait ShardExchange: Send + Sync {
    /// The whole flat parameter: every rank's `shard` concatenated in rank order (an
    /// all-gather). On failure: zeros of that length, the error kept for the strategy.
    fn gather(&self, shard: TensorData) -> TensorData;

    /// This rank's part of `grad` (the whole flat parameter's gradient) averaged over the ranks
    /// (a reduce-scatter). On failure: zeros of the shard's length, the error kept.
    fn scatter(&self, grad: TensorData) -> TensorData;
}

/// A backend on which a forward pass can gather whole parameters from shards.
///
/// The provided method gathers without a gradient (inference on a plain backend); `Autodiff`
/// overrides it with the operation of this module.
pub trait GatherParam: Backend {
    /// `exchange.gather(shard)` as a tensor on `shard`'s device. Under autodiff the result is
    /// tracked: its gradient reaches `shard` as `exchange.scatter` of the whole gradient. With
    /// `release`, backward gathers the parameter again instead of keeping the result alive from
    /// forward to backward (effective when the autodiff backend checkpoints memory-bound
    /// operations, `Autodiff<_, BalancedCheckpointing>`; the default keeps it).
    fn gather_param(
        shard: Tensor<Self, 1>,
        exchange: Arc<dyn ShardExchange>,
        release: bool,
    ) -> Tensor<Self, 1> {
        let _ = release;
        gather_untracked(shard, exchange.as_ref())
    }
}

/// `exchange.gather(shard)` as a tensor of any backend, without a gradient.
pub fn gather_untracked<B: Backend>(
    shard: Tensor<B, 1>,
    exchange: &dyn ShardExchange,
) -> Tensor<B, 1> {
    let shard = shard.into_primitive().tensor();
    let whole = through_host::<B>(shard, |s| exchange.gather(s));
    Tensor::from_primitive(TensorPrimitive::Float(whole))
}

/// [`GatherParam::gather_param`] of `B` when `BT` is `B` (the training backend), otherwise
/// [`gather_untracked`] (a forward pass of the inference module, `model.valid()`).
pub fn gather_on<B: GatherParam, BT: Backend>(
    shard: Tensor<BT, 1>,
    exchange: &Arc<dyn ShardExchange>,
    release: bool,
) -> Tensor<BT, 1> {
    let shard: Box<dyn Any> = Box::new(shard);
    match shard.downcast::<Tensor<B, 1>>() {
        Ok(shard) => {
            let whole: Box<dyn Any> =
                Box::new(B::gather_param(*shard, Arc::clone(exchange), release));
            match whole.downcast::<Tensor<BT, 1>>() {
                Ok(whole) => *whole,
                Err(_) => unreachable!("BT is B"),
            }
        }
        Err(shard) => match shard.downcast::<Tensor<BT, 1>>() {
            Ok(shard) => gather_untracked(*shard, exchange.as_ref()),
            Err(_) => unreachable!("boxed as BT"),
        },
    }
}

/// The exchange, carried through the autodiff graph as the operation's state.
#[derive(Clone)]
struct Exchange(Arc<dyn ShardExchange>);

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

/// Backward of the gather: the reduce-scatter of the whole gradient into the shard's.
#[derive(Debug)]
struct Scatter;

impl<B: Backend> Backward<B, 1> for Scatter {
    type State = Exchange;

    fn backward(self, ops: Ops<Exchange, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [shard] = ops.parents;
        // The sum over every use of the gathered parameter: all its consumers ran before this.
        let grad = grads.consume::<B>(&ops.node);
        if let Some(shard) = shard {
            let exchange = ops.state.0;
            grads.register::<B>(shard.id, through_host::<B>(grad, |g| exchange.scatter(g)));
        }
    }
}

/// Gathers the parameter again when backward needs it (the forward's copy was released).
struct Regather<B> {
    shard: NodeId,
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
        let exchange = &self.exchange.0;
        states.save(out, through_host::<B>(shard, |s| exchange.gather(s)));
    }
}

impl<B: Backend, C: CheckpointStrategy> GatherParam for Autodiff<B, C> {
    fn gather_param(
        shard: Tensor<Self, 1>,
        exchange: Arc<dyn ShardExchange>,
        release: bool,
    ) -> Tensor<Self, 1> {
        let shard = shard.into_primitive().tensor();
        let exchange = Exchange(exchange);
        let whole = through_host::<B>(shard.primitive.clone(), |s| exchange.0.gather(s));
        let prep = Scatter.prepare::<C>([shard.node.clone()]);
        let prep = match release && shard.is_tracked() {
            true => prep
                .memory_bound()
                .retro_forward(Regather::<B> {
                    shard: shard.node.id,
                    exchange: exchange.clone(),
                    _backend: PhantomData,
                })
                .parents([&shard]),
            false => prep.compute_bound(),
        };
        let out = match prep.stateful() {
            OpsKind::Tracked(prep) => prep.finish(exchange, whole),
            OpsKind::UnTracked(prep) => prep.finish(whole),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
