//! Forward passes under FSDP, and FSDP units (PyTorch's `fully_shard` on a submodule).
//!
//! `Fabric::forward` hands the user's forward a view of the model whose sharded parameters are
//! lazy: each is gathered (with the autodiff operation whose backward reduce-scatters its
//! gradient) when the forward first uses it, in the order the forward uses them, which is the
//! same on every rank. A [`unit`] gathers its module's parameters together just before the
//! module runs, ordered after the unit's input, so that backward reduce-scatters their
//! gradients as soon as the unit's backward is done.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use fabric_strategies::{ParamGather, gather_whole};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// The forward pass running on this thread under FSDP.
    static PASS: RefCell<Option<Pass>> = const { RefCell::new(None) };
}

/// A forward pass under FSDP: how it gathers, and the flat shard (a boxed `Tensor<BT, 1>`)
/// behind each lazy parameter of its view.
struct Pass {
    gather: ParamGather,
    shards: HashMap<ParamId, Box<dyn Any>>,
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

/// Runs `body` on the view of `model` whose sharded parameters are gathered when first used.
pub(crate) fn forward_pass<BT: Backend, M: Module<BT>, R>(
    gather: &ParamGather,
    model: &M,
    body: impl FnOnce(&M) -> R,
) -> R {
    let mut lazy = Lazy {
        gather,
        shards: HashMap::new(),
    };
    let view = model.clone().map(&mut lazy);
    let _current = Current::set(Pass {
        gather: gather.clone(),
        shards: lazy.shards,
    });
    body(&view)
}

/// Replaces each sharded parameter by a lazy one that gathers it on first use.
struct Lazy<'a> {
    gather: &'a ParamGather,
    shards: HashMap<ParamId, Box<dyn Any>>,
}

impl<BT: Backend> ModuleMapper<BT> for Lazy<'_> {
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
        let (gather, whole_shape) = (self.gather.clone(), shape.clone());
        let init = move |_: &BT::Device, _: bool| {
            gather_whole::<BT, D>(&gather, shard.clone(), &whole_shape, None)
        };
        let shape = burn::tensor::Shape::from(shape.clone());
        Param::uninitialized(id, init, device, require_grad, shape)
    }
}

/// Runs `forward(module, input)` as one FSDP unit: under `fsdp`, inside `Fabric::forward`,
/// `module`'s parameters are gathered together just before `forward` runs (and released after it
/// under `full_shard` with a checkpointing autodiff backend), and their gradients are
/// reduce-scattered as soon as the unit's backward is done, so that a rank holds the whole
/// gradients of one unit at a time rather than of the whole model. Elsewhere (another strategy,
/// or outside `Fabric::forward`) it is `forward(module, input)`.
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
        let pass = pass.borrow();
        let pass = pass.as_ref()?;
        let mut unit = Unit {
            pass,
            after: input.clone().into_primitive().tensor(),
        };
        Some(module.clone().map(&mut unit))
    });
    match gathered {
        Some(module) => forward(&module, input),
        None => forward(module, input),
    }
}

/// Gathers the lazy parameters of a unit's module, ordered after the unit's input.
struct Unit<'a, BT: Backend> {
    pass: &'a Pass,
    after: burn::tensor::ops::FloatTensor<BT>,
}

impl<BT: Backend> ModuleMapper<BT> for Unit<'_, BT> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<BT, D>>) -> Param<Tensor<BT, D>> {
        // Gathered already (used before this unit ran), or not sharded.
        if param.is_initialized() {
            return param;
        }
        let shard = self.pass.shards.get(&param.id);
        let shard = shard.and_then(|s| s.downcast_ref::<Tensor<BT, 1>>());
        let (Some(shard), Some(shape)) = (shard, self.pass.gather.shapes.get(&param.id)) else {
            return param;
        };
        let after = Some(self.after.clone());
        let whole = gather_whole::<BT, D>(&self.pass.gather, shard.clone(), shape, after);
        Param::initialized(param.id, whole)
    }
}
