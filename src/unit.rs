//! Forward passes under FSDP, and FSDP units (PyTorch's `fully_shard` on a submodule).
//!
//! `Fabric::forward` hands the user's forward a view of the model whose sharded parameters are
//! lazy: each is gathered (with the autodiff operation whose backward reduce-scatters its
//! gradient) when the forward first uses it, in the order the forward uses them, which is the
//! same on every rank. A [`unit`] gathers its module's parameters together just before the
//! module runs, ordered after the unit's input, so that backward reduce-scatters their
//! gradients as soon as the unit's backward is done.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use fabric_core::config::AutoWrap;
use fabric_core::gather::Started;
use fabric_strategies::{ParamGather, ParamWatch, UnitOrder, gather_whole};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

thread_local! {
    /// The forward pass running on this thread under FSDP, or under DDP with overlapped
    /// averaging.
    static PASS: RefCell<Option<Pass>> = const { RefCell::new(None) };
}

/// A forward pass of a strategy that does something with units.
enum Pass {
    /// FSDP: how it gathers, and the flat shard (a boxed `Tensor<BT, 1>`) behind each lazy
    /// parameter of its view.
    Gather {
        gather: ParamGather,
        shards: HashMap<ParamId, Box<dyn Any>>,
        ahead: Option<Ahead>,
    },
    /// DDP: units' parameters are watched, their gradients averaged while backward goes on.
    Watch(ParamWatch),
}

/// Makes `pass` the thread's current one until dropped, then restores the previous one.
struct Current(Option<Pass>);

impl Current {
    fn set(pass: Pass) -> Self {
        Current(PASS.with(|p| p.replace(Some(pass))))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let previous = self.0.take();
        PASS.with(|p| *p.borrow_mut() = previous);
    }
}

/// Runs `body` on the view of `model` whose sharded parameters are gathered when first used
/// (with the other parameters of their automatic unit, if the policy puts them in one).
pub(crate) fn forward_pass<BT: Backend, M: Module<BT>, R>(
    gather: &ParamGather,
    model: &M,
    body: impl FnOnce(&M) -> R,
) -> R {
    let mut lazy = Lazy {
        gather,
        shards: HashMap::new(),
        units: Arc::default(),
        open: vec![Frame::default()],
    };
    let view = model.clone().map(&mut lazy);
    // The root module is a unit too when the policy says so.
    if let Some(root) = lazy.open.pop() {
        lazy.close(root);
    }
    // The first unit's gathers travel while the pass maps and runs what comes before it.
    let ahead = gather.prefetch.as_ref().map(|order| {
        let mut ahead = Ahead {
            order: Arc::clone(order),
            previous: None,
            started: HashMap::new(),
        };
        ahead.start::<BT>(&order.first(), gather, &lazy.shards);
        ahead
    });
    let _current = Current::set(Pass::Gather {
        gather: gather.clone(),
        shards: lazy.shards,
        ahead,
    });
    body(&view)
}

/// A pass's gathers started ahead of their unit (FSDP's forward prefetch).
struct Ahead {
    order: Arc<UnitOrder>,
    /// The key of the unit the pass entered last.
    previous: Option<ParamId>,
    /// Gathers started and not used yet, by parameter.
    started: HashMap<ParamId, Started>,
}

impl Ahead {
    /// Starts the gathers of the parameters `ids` that have a shard in `shards` and none under
    /// way, in the order given (the same on every rank).
    fn start<BT: Backend>(
        &mut self,
        ids: &[ParamId],
        gather: &ParamGather,
        shards: &HashMap<ParamId, Box<dyn Any>>,
    ) {
        for id in ids {
            let shard = shards
                .get(id)
                .and_then(|s| s.downcast_ref::<Tensor<BT, 1>>());
            if let Some(shard) = shard.filter(|_| !self.started.contains_key(id)) {
                let started = gather.exchange.start_gather(shard.clone().into_data());
                self.started.insert(*id, started);
            }
        }
    }

    /// A unit of the sharded parameters `ids` starts: their gathers and then the next unit's
    /// are started (those not under way already), and the unit's order is remembered.
    fn enter<BT: Backend>(
        &mut self,
        ids: &[ParamId],
        gather: &ParamGather,
        shards: &HashMap<ParamId, Box<dyn Any>>,
    ) {
        self.start::<BT>(ids, gather, shards);
        let next = self.order.entered(self.previous, ids);
        if let Some(&key) = ids.first() {
            self.previous = Some(key);
        }
        self.start::<BT>(&next, gather, shards);
    }
}

impl Drop for Ahead {
    /// Waits for the gathers nobody used, so that the rank's collective is free when the pass
    /// ends (their errors are kept for the strategy like any other).
    fn drop(&mut self) {
        for (_, started) in self.started.drain() {
            started();
        }
    }
}

/// Runs `body` as a forward pass whose units watch their parameters (DDP).
pub(crate) fn watched<R>(watch: ParamWatch, body: impl FnOnce() -> R) -> R {
    let _current = Current::set(Pass::Watch(watch));
    body()
}

/// Replaces each sharded parameter by a lazy one that gathers it on first use, and groups them
/// into the automatic units of `gather.auto_wrap`.
struct Lazy<'a> {
    gather: &'a ParamGather,
    shards: HashMap<ParamId, Box<dyn Any>>,
    units: Arc<Mutex<AutoUnits>>,
    /// The fields being mapped, innermost last.
    open: Vec<Frame>,
}

/// A field being mapped (Burn enters and exits each field of a module, naming the module's type
/// as the container): its parameters not in a unit yet (id, elements), and the type of the
/// module it holds, learnt when its own fields are entered.
#[derive(Default)]
struct Frame {
    params: Vec<(ParamId, usize)>,
    module_type: Option<String>,
}

impl Lazy<'_> {
    /// A field is done: the module it holds becomes a unit if the policy wraps it, otherwise
    /// its parameters wait in the enclosing field.
    fn close(&mut self, field: Frame) {
        let count = field.params.iter().map(|(_, n)| n).sum();
        // A field holding a parameter itself (no fields of its own) is no module to wrap.
        let wraps = |module_type: &str| self.gather.auto_wrap.wraps(module_type, count);
        if !field.params.is_empty() && field.module_type.as_deref().is_some_and(wraps) {
            let mut units = self.units.lock().unwrap_or_else(PoisonError::into_inner);
            let unit = units.members.len();
            units
                .members
                .push(field.params.iter().map(|(id, _)| *id).collect());
            units
                .unit_of
                .extend(field.params.iter().map(|(id, _)| (*id, unit)));
        } else if let Some(outer) = self.open.last_mut() {
            outer.params.extend(field.params);
        }
    }
}

/// A parameter's gather, type-erased for its unit's other parameters to run.
type Gatherer = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;

/// The automatic units of one forward pass: each parameter's unit, the gathers not run yet and
/// the results run for a unit's other parameters.
#[derive(Default)]
struct AutoUnits {
    unit_of: HashMap<ParamId, usize>,
    members: Vec<Vec<ParamId>>,
    pending: HashMap<ParamId, Gatherer>,
    gathered: HashMap<ParamId, Box<dyn Any + Send>>,
}

impl AutoUnits {
    /// Parameter `id` is used for the first time: its result if another parameter of its unit
    /// gathered it, or `None` when it must gather itself (its gather is then taken out of the
    /// pending ones).
    fn claim(&mut self, id: ParamId) -> Option<Box<dyn Any + Send>> {
        match self.gathered.remove(&id) {
            Some(done) => Some(done),
            None => {
                self.pending.remove(&id);
                None
            }
        }
    }

    /// Gathers the parameters of `id`'s unit not gathered yet, in visit order (the same on
    /// every rank), for their first use.
    fn gather_unit_of(&mut self, id: ParamId) {
        let Some(members) = self.unit_of.get(&id).and_then(|u| self.members.get(*u)) else {
            return;
        };
        for member in members.clone() {
            if let Some(gather) = self.pending.remove(&member) {
                self.gathered.insert(member, gather());
            }
        }
    }
}

impl<BT: Backend> ModuleMapper<BT> for Lazy<'_> {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        if let Some(holder) = self.open.last_mut() {
            holder.module_type = Some(container_type.to_string());
        }
        self.open.push(Frame::default());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if let Some(field) = self.open.pop() {
            self.close(field);
        }
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<BT, D>>) -> Param<Tensor<BT, D>> {
        let Some(shape) = self.gather.shapes.get(&param.id) else {
            return param;
        };
        let (id, shard, _) = param.consume();
        let len = shard.shape().num_elements();
        let shard = shard.reshape([len]);
        let device = shard.device();
        let require_grad = shard.is_require_grad();
        self.shards.insert(id, Box::new(shard.clone()));
        let gather = {
            let (gather, shape, shard) = (self.gather.clone(), shape.clone(), shard.clone());
            move || gather_whole::<BT, D>(&gather, id, shard.clone(), &shape, None, None)
        };
        // Without a policy no parameter joins a unit: nothing to record.
        if *self.gather.auto_wrap != AutoWrap::Off {
            if let Some(field) = self.open.last_mut() {
                field.params.push((id, shape.iter().product()));
            }
            let boxed = gather.clone();
            let mut units = self.units.lock().unwrap_or_else(PoisonError::into_inner);
            units.pending.insert(
                id,
                Box::new(move || Box::new(boxed()) as Box<dyn Any + Send>),
            );
        }
        let units = self.units.clone();
        let init = move |_: &BT::Device, _: bool| {
            let lock = || units.lock().unwrap_or_else(PoisonError::into_inner);
            let claimed = lock().claim(id);
            // Another parameter's result always has that parameter's type: a miss cannot happen.
            let whole = match claimed.map(|done| done.downcast::<Tensor<BT, D>>()) {
                Some(Ok(whole)) => *whole,
                _ => gather(),
            };
            lock().gather_unit_of(id);
            whole
        };
        let shape = burn::tensor::Shape::from(shape.clone());
        Param::uninitialized(id, init, device, require_grad, shape)
    }
}

/// Runs `forward(module, input)` as one unit of the model: under `fsdp`, inside
/// `Fabric::forward`, `module`'s parameters are gathered together just before `forward` runs
/// (and released after it under `full_shard` with a checkpointing autodiff backend), and their
/// gradients are reduce-scattered as soon as the unit's backward is done, so that a rank holds
/// the whole gradients of one unit at a time rather than of the whole model. Under `ddp`
/// (`*-true` precisions), the unit's gradients are averaged across ranks on a communication
/// thread while the rest of backward runs. Elsewhere (another strategy, or outside
/// `Fabric::forward`) it is `forward(module, input)`.
///
/// Wrap each repeated block of a model (a transformer layer, a residual block) in its forward:
///
/// ```text
/// for block in &self.blocks {
///     x = burn_fabric::unit(block, x, |block, x| block.forward(x));
/// }
/// ```
///
/// Every rank must run the same units in the same order. A clone of the module inside
/// `forward` gathers its parameters again.
pub fn unit<BT: Backend, M: Module<BT>, const D: usize, R>(
    module: &M,
    input: Tensor<BT, D>,
    forward: impl FnOnce(&M, Tensor<BT, D>) -> R,
) -> R {
    let gathered = PASS.with(|pass| {
        let mut pass = pass.borrow_mut();
        let after = input.clone().into_primitive().tensor();
        match pass.as_mut()? {
            Pass::Gather {
                gather,
                shards,
                ahead,
            } => {
                if let Some(ahead) = ahead.as_mut() {
                    let mut lazy = LazyIds {
                        shards,
                        ids: Vec::new(),
                    };
                    module.visit(&mut lazy);
                    ahead.enter::<BT>(&lazy.ids, gather, shards);
                }
                Some(module.clone().map(&mut Unit {
                    gather,
                    shards,
                    started: ahead.as_mut().map(|a| &mut a.started),
                    after,
                }))
            }
            Pass::Watch(watch) => Some(module.clone().map(&mut Watch { watch, after })),
        }
    });
    match gathered {
        Some(module) => forward(&module, input),
        None => forward(module, input),
    }
}

/// The ids of a module's lazy parameters that have shards, in visit order.
struct LazyIds<'a> {
    shards: &'a HashMap<ParamId, Box<dyn Any>>,
    ids: Vec<ParamId>,
}

impl<BT: Backend> ModuleVisitor<BT> for LazyIds<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<BT, D>>) {
        if !param.is_initialized() && self.shards.contains_key(&param.id) {
            self.ids.push(param.id);
        }
    }
}

/// Gathers the lazy parameters of a unit's module, ordered after the unit's input (waiting for
/// the gathers already started).
struct Unit<'a, BT: Backend> {
    gather: &'a ParamGather,
    shards: &'a HashMap<ParamId, Box<dyn Any>>,
    started: Option<&'a mut HashMap<ParamId, Started>>,
    after: FloatTensor<BT>,
}

impl<BT: Backend> ModuleMapper<BT> for Unit<'_, BT> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<BT, D>>) -> Param<Tensor<BT, D>> {
        // Gathered already (used before this unit ran), or not sharded.
        if param.is_initialized() {
            return param;
        }
        let shard = self.shards.get(&param.id);
        let shard = shard.and_then(|s| s.downcast_ref::<Tensor<BT, 1>>());
        let (Some(shard), Some(shape)) = (shard, self.gather.shapes.get(&param.id)) else {
            return param;
        };
        let after = Some(self.after.clone());
        let started = self.started.as_mut().and_then(|s| s.remove(&param.id));
        let whole =
            gather_whole::<BT, D>(self.gather, param.id, shard.clone(), shape, after, started);
        Param::initialized(param.id, whole)
    }
}

/// Watches the trainable parameters of a unit's module, ordered after the unit's input.
struct Watch<'a, BT: Backend> {
    watch: &'a ParamWatch,
    after: FloatTensor<BT>,
}

impl<BT: Backend> ModuleMapper<BT> for Watch<'_, BT> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<BT, D>>) -> Param<Tensor<BT, D>> {
        let value = param.val();
        if !value.is_require_grad() || !self.watch.tracked.tracks::<BT>() {
            return param;
        }
        let numel = value.shape().num_elements();
        self.watch.sink.watch(param.id, numel, value.dtype());
        let sink = self.watch.sink.clone().as_sink();
        let watched = self
            .watch
            .tracked
            .watch(value, self.after.clone(), &sink, param.id);
        Param::initialized(param.id, watched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;
    use fabric_core::gather::{ShardExchange, TrackedGather};

    type B = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        l1: Linear<B>,
        l2: Linear<B>,
    }

    /// One rank's exchange that records the length of each gather.
    #[derive(Default)]
    struct Recording(Mutex<Vec<usize>>);

    impl ShardExchange for Recording {
        fn gather(&self, shard: TensorData) -> TensorData {
            self.0.lock().unwrap().push(shard.num_elements());
            shard
        }
        fn scatter(&self, _: ParamId, grad: TensorData) -> Option<TensorData> {
            Some(grad)
        }
    }

    /// What a forward pass over `model` needs to gather its parameters through `exchange`.
    fn param_gather<M: Module<B>>(
        model: &M,
        exchange: Arc<dyn ShardExchange>,
        auto_wrap: AutoWrap,
        prefetch: bool,
    ) -> ParamGather {
        let mut shapes = HashMap::new();
        let mut collect = fabric_strategies::CollectParams::<B>::default();
        model.visit(&mut collect);
        for (id, shape) in collect.ids.iter().zip(&collect.shapes) {
            shapes.insert(*id, shape.clone());
        }
        ParamGather {
            shapes: Arc::new(shapes),
            exchange,
            tracked: TrackedGather::of::<B>(),
            release: false,
            auto_wrap: Arc::new(auto_wrap),
            prefetch: prefetch.then(Arc::default),
        }
    }

    /// The lengths gathered, in order, by a pass that uses `l2.weight`, then all of `l1`,
    /// then `l2.bias`.
    fn gathers(auto_wrap: AutoWrap) -> Vec<usize> {
        let device = Default::default();
        let model = Two::<B> {
            l1: LinearConfig::new(2, 3).init(&device),
            l2: LinearConfig::new(3, 5).init(&device),
        };
        let exchange = Arc::new(Recording::default());
        let gather = param_gather(&model, exchange.clone(), auto_wrap, false);
        forward_pass(&gather, &model, |m| {
            let _ = m.l2.weight.val();
            let _ = m.l1.forward(Tensor::<B, 2>::ones([1, 2], &device));
            let _ = m.l2.bias.as_ref().map(|b| b.val());
        });
        exchange.0.lock().unwrap().clone()
    }

    #[test]
    fn an_automatic_unit_gathers_its_parameters_together() {
        // Without units each parameter is gathered when first used.
        assert_eq!(gathers(AutoWrap::Off), [15, 6, 3, 5]);
        // Each Linear is a unit: using l2.weight gathers l2.bias with it.
        assert_eq!(gathers(AutoWrap::module_types(["Linear"])), [15, 5, 6, 3]);
        // 10 parameters or more: l2 (20) is a unit, l1 (9) is not; the root holds both.
        assert_eq!(gathers(AutoWrap::MinParams(10)), [15, 5, 6, 3]);
        // The root (29 parameters) is one unit: everything at the first use.
        assert_eq!(gathers(AutoWrap::MinParams(29)), [15, 6, 3, 5]);
    }

    #[derive(Module, Debug)]
    struct Three<B: Backend> {
        l1: Linear<B>,
        l2: Linear<B>,
        l3: Linear<B>,
    }

    /// One rank's exchange that logs when a gather starts (`start N`, N its length), when a
    /// started one is waited for (`wait N`) and a gather run on the spot (`gather N`).
    struct Timeline(Arc<Mutex<Vec<String>>>);

    impl ShardExchange for Timeline {
        fn gather(&self, shard: TensorData) -> TensorData {
            let entry = format!("gather {}", shard.num_elements());
            self.0.lock().unwrap().push(entry);
            shard
        }
        fn scatter(&self, _: ParamId, grad: TensorData) -> Option<TensorData> {
            Some(grad)
        }
        fn start_gather(&self, shard: TensorData) -> Started {
            let len = shard.num_elements();
            self.0.lock().unwrap().push(format!("start {len}"));
            let log = Arc::clone(&self.0);
            Box::new(move || {
                log.lock().unwrap().push(format!("wait {len}"));
                shard
            })
        }
    }

    /// The logs of three passes through the units `l1`, `l2`, `l3` (the third skips `l2`),
    /// each forward logging `forward lK`.
    fn timeline(prefetch: bool) -> Vec<Vec<String>> {
        let device = Default::default();
        let model = Three::<B> {
            l1: LinearConfig::new(2, 3).init(&device),
            l2: LinearConfig::new(3, 4).init(&device),
            l3: LinearConfig::new(4, 5).init(&device),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let exchange = Arc::new(Timeline(log.clone()));
        let gather = param_gather(&model, exchange, AutoWrap::Off, prefetch);
        let run = |name: &'static str, layer: &Linear<B>, x: Tensor<B, 2>| {
            crate::unit(layer, x, |layer, x| {
                log.lock().unwrap().push(format!("forward {name}"));
                layer.forward(x)
            })
        };
        let mut passes = Vec::new();
        for skip in [false, false, true] {
            forward_pass(&gather, &model, |m| {
                let x = run("l1", &m.l1, Tensor::ones([1, 2], &device));
                let x = match skip {
                    true => Tensor::ones([1, 4], &device),
                    false => run("l2", &m.l2, x),
                };
                run("l3", &m.l3, x)
            });
            passes.push(std::mem::take(&mut *log.lock().unwrap()));
        }
        passes
    }

    #[test]
    fn a_unit_starts_the_next_units_gathers_before_it_runs() {
        let passes = timeline(true);
        let at = |pass: &[String], entry: &str| pass.iter().position(|e| e == entry).unwrap();
        // First pass: the order is not known yet; each unit starts its own gathers together.
        assert_eq!(
            passes[0][..5],
            ["start 6", "start 3", "wait 6", "wait 3", "forward l1"]
        );
        assert!(at(&passes[0], "start 12") > at(&passes[0], "forward l1"));
        // Second pass: l1's gathers start with the pass, l2's before l1 runs, l3's before l2.
        let second = &passes[1];
        assert_eq!(second[..2], ["start 6", "start 3"]);
        assert!(
            at(second, "start 12") < at(second, "forward l1"),
            "{second:?}"
        );
        assert!(
            at(second, "start 4") < at(second, "forward l1"),
            "{second:?}"
        );
        assert!(
            at(second, "start 20") < at(second, "forward l2"),
            "{second:?}"
        );
        assert!(
            !second.iter().any(|e| e.starts_with("gather")),
            "{second:?}"
        );
        // Third pass skips l2: its gathers, started before l1 ran, are waited for by the end
        // of the pass all the same, and l3's run.
        let third = &passes[2];
        for len in [6, 3, 12, 4, 20, 5] {
            let (start, wait) = (format!("start {len}"), format!("wait {len}"));
            assert!(at(third, &start) < at(third, &wait), "{third:?}");
        }
        assert!(at(third, "wait 12") > at(third, "forward l3"), "{third:?}");
    }

    #[test]
    fn without_prefetch_each_parameter_is_gathered_when_its_unit_runs() {
        let passes = timeline(false);
        let second = &passes[1];
        assert_eq!(
            second[..3],
            ["gather 6", "gather 3", "forward l1"],
            "{second:?}"
        );
        assert!(!second.iter().any(|e| e.starts_with("start")), "{second:?}");
    }
}
