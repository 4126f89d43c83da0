//! The module seam: how a strategy sees a Burn module without naming its type. Strategies work on
//! a module's trainable parameters flattened in module-visit order (the same on every rank,
//! whatever the random `ParamId`s are); [`Params`] and [`OptimizerStep`] adapt any
//! `AutodiffModule` (and its optimizer) to that view.

use crate::fsdp::ParamGather;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};
use fabric_core::checkpoint::{Settings, decode_record, encode_record, retain_record};
use fabric_core::gather::{Prefetched, Started, gather_untracked};
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::sync::Arc;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// One trainable parameter as strategies see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamSlot {
    /// Its id (rank 0's after `setup`, so the same on every rank).
    pub id: ParamId,
    /// Number of elements.
    pub numel: usize,
    /// Dtype of the parameter (and of its gradient).
    pub dtype: DType,
}

/// One parameter's gradient, flattened to one dimension.
#[derive(Debug, Clone)]
pub struct FlatGrad<B: burn::tensor::backend::Backend> {
    /// Number of elements of the parameter.
    pub numel: usize,
    /// Dtype of the parameter (and of its gradient).
    pub dtype: DType,
    /// The gradient, or `None` if this rank's backward did not reach the parameter.
    pub grad: Option<Tensor<B, 1>>,
}

/// One float parameter at `setup`, flattened, as a strategy places it on its rank.
#[derive(Debug, Clone)]
pub struct SetupParam<B: burn::tensor::backend::Backend> {
    /// Its id.
    pub id: ParamId,
    /// The shape it is kept in.
    pub shape: Vec<usize>,
    /// Whether it requires grad.
    pub trainable: bool,
    /// Its value, flattened.
    pub value: Tensor<B, 1>,
}

/// A module's trainable parameters, in visit order.
pub trait ModuleParams<B: AutodiffBackend> {
    /// Id, element count and dtype of each trainable parameter.
    fn layout(&self) -> Vec<ParamSlot>;

    /// Removes each trainable parameter's gradient from the output of one backward pass,
    /// flattened, in [`layout`](Self::layout) order.
    fn gradients(&self, grads: &mut B::Gradients) -> Vec<Option<Tensor<Inner<B>, 1>>>;
}

/// A module and its optimizer at the optimizer step: what a strategy needs to step it.
pub trait StepTarget<B: AutodiffBackend> {
    /// Id, element count and dtype of each trainable parameter of the module.
    fn layout(&self) -> Vec<ParamSlot>;

    /// Steps the optimizer with learning rate `lr` and `grads` (in layout order; `None`: the
    /// parameter is left untouched).
    fn step(&mut self, lr: f64, grads: Vec<FlatGrad<Inner<B>>>);

    /// The trainable parameters' values, flattened, in layout order.
    fn values(&self) -> Vec<Tensor<Inner<B>, 1>>;

    /// Overwrites the trainable parameters with `values` (flattened, layout order).
    fn assign(&mut self, values: Vec<Tensor<Inner<B>, 1>>);

    /// Whether an optimizer record was loaded since the last step (it may hold state of
    /// parameters another rank owns); clears the mark.
    fn take_loaded(&mut self) -> bool;

    /// Keeps only the optimizer state of the parameters whose serialised ids are in `keep`.
    fn retain_state(&mut self, keep: &BTreeSet<String>) -> Result<(), String>;
}

/// Any Burn module as [`ModuleParams`].
pub struct Params<'a, M>(pub &'a M);

impl<B: AutodiffBackend, M: AutodiffModule<B>> ModuleParams<B> for Params<'_, M> {
    fn layout(&self) -> Vec<ParamSlot> {
        layout::<B, M>(self.0)
    }

    fn gradients(&self, grads: &mut B::Gradients) -> Vec<Option<Tensor<Inner<B>, 1>>> {
        struct Take<'a, B: AutodiffBackend> {
            grads: &'a mut B::Gradients,
            out: Vec<Option<Tensor<Inner<B>, 1>>>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if !trainable(param) {
                    return;
                }
                let numel = param.lazy_shape().num_elements();
                let grad = param.val().grad_remove(self.grads);
                self.out.push(grad.map(|g| g.reshape([numel])));
            }
        }
        let mut take = Take::<B> {
            grads,
            out: Vec::new(),
        };
        self.0.visit(&mut take);
        take.out
    }
}

/// A module (taken by value, as Burn's optimizers take it) and its optimizer as a
/// [`StepTarget`].
pub struct OptimizerStep<'a, B: AutodiffBackend, M, O> {
    model: Option<M>,
    optimizer: &'a mut O,
    device: &'a B::Device,
    loaded: &'a mut bool,
}

impl<'a, B, M, O> OptimizerStep<'a, B, M, O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    /// `model` and `optimizer` (on `device`); `loaded` marks a freshly loaded optimizer record.
    pub fn new(
        model: M,
        optimizer: &'a mut O,
        device: &'a B::Device,
        loaded: &'a mut bool,
    ) -> Self {
        Self {
            model: Some(model),
            optimizer,
            device,
            loaded,
        }
    }

    /// The model after the step.
    pub fn into_model(self) -> Option<M> {
        self.model
    }

    fn visit(&self, visitor: &mut impl ModuleVisitor<B>) {
        if let Some(model) = &self.model {
            model.visit(visitor);
        }
    }
}

impl<B, M, O> StepTarget<B> for OptimizerStep<'_, B, M, O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    fn layout(&self) -> Vec<ParamSlot> {
        self.model.as_ref().map(layout::<B, M>).unwrap_or_default()
    }

    fn step(&mut self, lr: f64, grads: Vec<FlatGrad<Inner<B>>>) {
        let mut params = GradientsParams::new();
        self.visit(&mut Unflatten::<B> {
            store: &mut params,
            grads: grads.into_iter(),
        });
        if let Some(model) = self.model.take() {
            self.model = Some(self.optimizer.step(lr, model, params));
        }
    }

    fn values(&self) -> Vec<Tensor<Inner<B>, 1>> {
        let mut collect = CollectParams::<B>::trainable_only();
        self.visit(&mut collect);
        collect.values
    }

    fn assign(&mut self, values: Vec<Tensor<Inner<B>, 1>>) {
        if let Some(model) = self.model.take() {
            self.model = Some(
                model.map(&mut AssignParams::<B, _>::new(values.into_iter()).trainable_only()),
            );
        }
    }

    fn take_loaded(&mut self) -> bool {
        std::mem::take(self.loaded)
    }

    fn retain_state(&mut self, keep: &BTreeSet<String>) -> Result<(), String> {
        let bytes = encode_record::<B, _>(self.optimizer.to_record(), Settings::Full)?;
        let kept = retain_record(&bytes, keep)?;
        let record =
            decode_record::<B, <O as Optimizer<M, B>>::Record>(&kept, Settings::Full, self.device)?;
        *self.optimizer = self.optimizer.clone().load_record(record);
        Ok(())
    }
}

/// Whether a parameter takes part in gradient exchange. Decided from the module, identically on
/// every rank.
fn trainable<B: AutodiffBackend, const D: usize>(param: &Param<Tensor<B, D>>) -> bool {
    param.val().is_require_grad()
}

/// Id, element count and dtype of each trainable parameter of `model`, in visit order: the
/// layout every strategy works by.
pub fn layout<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> Vec<ParamSlot> {
    struct Layout(Vec<ParamSlot>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Layout {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if trainable(param) {
                self.0.push(ParamSlot {
                    id: param.id,
                    numel: param.lazy_shape().num_elements(),
                    dtype: param.val().dtype(),
                });
            }
        }
    }
    let mut layout = Layout(Vec::new());
    model.visit(&mut layout);
    layout.0
}

/// Takes `model`'s trainable parameters' gradients out of `grads` (burn-optim's
/// `GradientsParams`, keyed by parameter id, as a burn-train `TrainStep` returns them),
/// flattened, in [`layout`] order and in each parameter's dtype (a gradient of a half-precision
/// view of f32 parameters is cast to f32).
pub fn flatten_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
) -> Vec<Option<Tensor<Inner<B>, 1>>> {
    struct Take<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        out: Vec<Option<Tensor<Inner<B>, 1>>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !trainable(param) {
                return;
            }
            let numel = param.lazy_shape().num_elements();
            let dtype = param.val().dtype();
            let grad = self.grads.remove::<Inner<B>, D>(param.id).map(|g| {
                let g = g.reshape([numel]);
                match g.dtype() == dtype {
                    true => g,
                    false => g.cast(burn::tensor::FloatDType::from(dtype)),
                }
            });
            self.out.push(grad);
        }
    }
    let mut take = Take::<B> {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut take);
    take.out
}

/// Puts flattened gradients into a `GradientsParams`, in the same visit order as [`layout`].
struct Unflatten<'a, B: AutodiffBackend> {
    store: &'a mut GradientsParams,
    grads: std::vec::IntoIter<FlatGrad<Inner<B>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !trainable(param) {
            return;
        }
        if let Some(grad) = self.grads.next().and_then(|g| g.grad) {
            let grad: Tensor<Inner<B>, D> = grad.reshape(param.lazy_shape());
            self.store.register::<Inner<B>, D>(param.id, grad);
        }
    }
}

/// Overwrites float parameters with the next values from `values` (flattened, visit order),
/// keeping whether each requires grad. Installs rank 0's parameters at setup and the owners'
/// updates under ZeRO.
pub struct AssignParams<B: AutodiffBackend, I: Iterator<Item = Tensor<Inner<B>, 1>>> {
    values: I,
    ids: Option<std::vec::IntoIter<ParamId>>,
    trainable_only: bool,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend, I: Iterator<Item = Tensor<Inner<B>, 1>>> AssignParams<B, I> {
    /// Assigns `values` to every float parameter in module-visit order.
    pub fn new(values: I) -> Self {
        Self {
            values,
            ids: None,
            trainable_only: false,
            _b: PhantomData,
        }
    }

    /// Also replaces the parameters' ids (rank 0's, so that every rank keys optimizer state
    /// and checkpoints alike).
    pub fn with_ids(mut self, ids: Vec<ParamId>) -> Self {
        self.ids = Some(ids.into_iter());
        self
    }

    /// Skips parameters that do not require grad.
    pub fn trainable_only(mut self) -> Self {
        self.trainable_only = true;
        self
    }
}

impl<B: AutodiffBackend, I: Iterator<Item = Tensor<Inner<B>, 1>>> ModuleMapper<B>
    for AssignParams<B, I>
{
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.trainable_only && !trainable(&param) {
            return param;
        }
        let Some(value) = self.values.next() else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let id = self.ids.as_mut().and_then(Iterator::next).unwrap_or(id);
        let require_grad = tensor.is_require_grad();
        let mut tensor = Tensor::<B, D>::from_inner(value.reshape(tensor.shape()));
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Float parameters' values (flattened) and ids, in module-visit order.
pub struct CollectParams<B: AutodiffBackend> {
    /// The collected values.
    pub values: Vec<Tensor<Inner<B>, 1>>,
    /// Their ids.
    pub ids: Vec<ParamId>,
    /// Their shapes.
    pub shapes: Vec<Vec<usize>>,
    trainable_only: bool,
}

impl<B: AutodiffBackend> Default for CollectParams<B> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            ids: Vec::new(),
            shapes: Vec::new(),
            trainable_only: false,
        }
    }
}

impl<B: AutodiffBackend> CollectParams<B> {
    /// Collects only parameters that require grad.
    pub fn trainable_only() -> Self {
        Self {
            trainable_only: true,
            ..Self::default()
        }
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectParams<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.trainable_only && !trainable(param) {
            return;
        }
        let value = param.val().inner();
        let shape = value.shape();
        let numel = shape.num_elements();
        self.values.push(value.reshape([numel]));
        self.ids.push(param.id);
        self.shapes.push(shape.to_vec());
    }
}

/// The whole parameter `id` of `shape` from this rank's flat `shard` (see
/// [`TrackedGather::gather`](fabric_core::gather::TrackedGather::gather) for `after`); when
/// its gather was `started` ahead ([`ShardExchange::start_gather`]), its result.
pub fn gather_whole<BT: Backend, const D: usize>(
    gather: &ParamGather,
    id: ParamId,
    shard: Tensor<BT, 1>,
    shape: &[usize],
    after: Option<FloatTensor<BT>>,
    started: Option<Started>,
) -> Tensor<BT, D> {
    let exchange = match started {
        Some(started) => Arc::new(Prefetched::new(started, Arc::clone(&gather.exchange))),
        None => Arc::clone(&gather.exchange),
    };
    let whole = gather
        .tracked
        .gather(shard, id, after, &exchange, gather.release);
    unpad(whole, shape)
}

/// The gathered flat parameter `whole` without its padding rows, in its `shape`.
fn unpad<BT: Backend, const D: usize>(whole: Tensor<BT, 1>, shape: &[usize]) -> Tensor<BT, D> {
    let numel = shape.iter().product::<usize>();
    whole
        .slice(0..numel)
        .reshape(burn::tensor::Shape::from(shape.to_vec()))
}

/// Replaces every sharded parameter (those `gather` lists) by the whole parameter gathered from
/// the ranks' shards, at once and without a gradient: `Fabric::gathered`. (Forward passes
/// gather each parameter when it is first used, with one.)
pub struct GatherParams<'a> {
    gather: &'a ParamGather,
}

impl<'a> GatherParams<'a> {
    /// Gathers every parameter `gather` lists.
    pub fn new(gather: &'a ParamGather) -> Self {
        Self { gather }
    }
}

impl<BT: Backend> ModuleMapper<BT> for GatherParams<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<BT, D>>) -> Param<Tensor<BT, D>> {
        let Some(shape) = self.gather.shapes.get(&param.id) else {
            return param;
        };
        let (id, shard, mapper) = param.consume();
        let len = shard.shape().num_elements();
        let whole = gather_untracked(shard.reshape([len]), self.gather.exchange.as_ref());
        Param::from_mapped_value(id, unpad(whole, shape), mapper)
    }
}
