//! A parameter's gradient handed out the moment backward computes it (PyTorch DDP's gradient
//! hooks): an autodiff operation whose forward is the identity and whose backward gives the
//! gradient to a [`GradSink`] instead of the parameter. With the input of the unit that uses the
//! parameter as an ordering parent, the backward step runs right after that unit's backward,
//! so a strategy can start averaging a unit's gradients while the backward pass goes on.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use std::fmt;
use std::sync::Arc;

/// Where a watched parameter's gradient goes during backward.
pub trait GradSink: Send + Sync {
    /// The gradient of one watched use of parameter `id`, flattened to host data, as soon as
    /// the backward pass has it. The parameter itself receives nothing from that use.
    fn ready(&self, id: ParamId, grad: TensorData);
}

/// The sink and the parameter, carried through the autodiff graph as the operation's state.
#[derive(Clone)]
struct Watcher {
    sink: Arc<dyn GradSink>,
    id: ParamId,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GradSink({})", self.id)
    }
}

/// Backward of the watch: the gradient goes to the sink. The second parent (the unit's input)
/// only orders the step.
#[derive(Debug)]
struct Hand;

impl<B: Backend> Backward<B, 2> for Hand {
    type State = Watcher;

    fn backward(self, ops: Ops<Watcher, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        // The sum over every use of this watched value: all its consumers ran before this.
        let grad = grads.consume::<B>(&ops.node);
        let numel = grad.shape().num_elements();
        let flat = B::float_reshape(grad, Shape::new([numel]));
        let flat = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(flat));
        ops.state.sink.ready(ops.state.id, flat.into_data());
    }
}

/// The watch on `Autodiff<B, C>`: `param` (tracked) unchanged, its gradient from this
/// use handed to `sink` right after `after`'s consumers are done.
pub(crate) fn watch<B: Backend, C: CheckpointStrategy>(
    param: FloatTensor<Autodiff<B, C>>,
    after: FloatTensor<Autodiff<B, C>>,
    sink: Arc<dyn GradSink>,
    id: ParamId,
) -> FloatTensor<Autodiff<B, C>> {
    let out = param.primitive.clone();
    match Hand
        .prepare::<C>([param.node.clone(), after.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Watcher { sink, id }, out),
        OpsKind::UnTracked(_) => param,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gather::{GatherParam, ShardExchange};
    use burn::backend::Flex;
    use std::sync::Mutex;

    type B = Autodiff<Flex>;

    /// Writes each gradient's arrival (and the logging identity's backward) to one log.
    #[derive(Default)]
    struct Log(Mutex<Vec<(String, Vec<f32>)>>);

    impl GradSink for Log {
        fn ready(&self, id: ParamId, grad: TensorData) {
            let grad = grad.to_vec().unwrap();
            self.0.lock().unwrap().push((id.to_string(), grad));
        }
    }

    impl ShardExchange for Log {
        fn gather(&self, shard: TensorData) -> TensorData {
            shard
        }
        fn scatter(&self, _: ParamId, grad: TensorData) -> Option<TensorData> {
            self.0
                .lock()
                .unwrap()
                .push(("unit 2's input".into(), Vec::new()));
            Some(grad)
        }
    }

    /// `relu(x W1) W2` with both weights watched, each after its unit's input, and unit 2's
    /// input passed through a logging identity; plain autodiff's gradients of the same model.
    #[test]
    fn a_watched_gradient_arrives_right_after_its_unit_and_equals_autodiff() {
        let device = Default::default();
        let values = |n: usize, salt: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32) * 0.37 + salt).sin()).collect()
        };
        let x = Tensor::<B, 2>::from_data(TensorData::new(values(6, 0.1), [2, 3]), &device);
        let w1 = Tensor::<B, 2>::from_data(TensorData::new(values(12, 0.2), [3, 4]), &device)
            .require_grad();
        let w2 = Tensor::<B, 2>::from_data(TensorData::new(values(8, 0.3), [4, 2]), &device)
            .require_grad();
        let plain = {
            let loss = burn::tensor::activation::relu(x.clone().matmul(w1.clone()))
                .matmul(w2.clone())
                .sum();
            let grads = loss.backward();
            let grad = |w: &Tensor<B, 2>| -> Vec<f32> {
                w.grad(&grads).unwrap().into_data().to_vec().unwrap()
            };
            [grad(&w1), grad(&w2)]
        };
        let log = Arc::new(Log::default());
        let sink: Arc<dyn GradSink> = log.clone();
        let watch = |w: &Tensor<B, 2>, after: &Tensor<B, 2>, id: u64| {
            let param = w.clone().into_primitive().tensor();
            let after = after.clone().into_primitive().tensor();
            let watched = B::watch_param(param, after, sink.clone(), ParamId::from(id));
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(watched))
        };
        let y1 = burn::tensor::activation::relu(x.clone().matmul(watch(&w1, &x, 1)));
        let input = B::gather_param(y1.reshape([8]), ParamId::new(), None, log.clone(), false)
            .reshape([2, 4]);
        let loss = input.clone().matmul(watch(&w2, &input, 2)).sum();
        let grads = loss.backward();
        assert!(
            w1.grad(&grads).is_none(),
            "a watched weight receives nothing itself"
        );
        let log = log.0.lock().unwrap().clone();
        let order: Vec<&str> = log.iter().map(|(name, _)| name.as_str()).collect();
        let (one, two) = (ParamId::from(1).to_string(), ParamId::from(2).to_string());
        assert_eq!(order, [two.as_str(), "unit 2's input", one.as_str()]);
        assert_eq!(log[2].1, plain[0]);
        assert_eq!(log[0].1, plain[1]);
    }
}
