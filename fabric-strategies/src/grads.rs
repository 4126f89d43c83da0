//! A rank's gradients between `backward` and the optimizer step, like PyTorch's `.grad`: they
//! accumulate across backward passes until a step takes them. Kept flattened and keyed by
//! parameter id; every walk goes in a module's layout (visit) order.

use crate::module::{FlatGrad, ModuleParams, ParamSlot};
use crate::rank_state::RankState;
use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use fabric_core::FabricError;
use std::collections::HashMap;

/// Accumulated, possibly synchronised, gradients of every module a rank trains.
pub struct GradStore<B: Backend> {
    grads: HashMap<ParamId, Tensor<B, 1>>,
}

impl<B: Backend> Default for GradStore<B> {
    fn default() -> Self {
        Self {
            grads: HashMap::new(),
        }
    }
}

impl<B: Backend> GradStore<B> {
    /// Adds one backward pass's gradients (in `layout` order) to what is stored.
    pub fn accumulate(&mut self, layout: &[ParamSlot], grads: Vec<Option<Tensor<B, 1>>>) {
        for (slot, grad) in layout.iter().zip(grads) {
            let Some(grad) = grad else { continue };
            let sum = match self.grads.remove(&slot.id) {
                Some(old) => old + grad,
                None => grad,
            };
            self.grads.insert(slot.id, sum);
        }
    }

    /// Removes and returns the gradients of `layout`'s parameters, in its order (`None` where a
    /// parameter has none); other parameters' gradients stay.
    pub fn take(&mut self, layout: &[ParamSlot]) -> Vec<FlatGrad<B>> {
        layout
            .iter()
            .map(|slot| FlatGrad {
                numel: slot.numel,
                dtype: slot.dtype,
                grad: self.grads.remove(&slot.id),
            })
            .collect()
    }

    /// Stores `grads` (in `layout` order) in place of what was there.
    pub fn put(&mut self, layout: &[ParamSlot], grads: Vec<FlatGrad<B>>) {
        for (slot, grad) in layout.iter().zip(grads) {
            match grad.grad {
                Some(grad) => self.grads.insert(slot.id, grad),
                None => self.grads.remove(&slot.id),
            };
        }
    }

    /// Stores `grad` as parameter `id`'s gradient, in place of what was there.
    pub fn set(&mut self, id: ParamId, grad: Tensor<B, 1>) {
        self.grads.insert(id, grad);
    }

    /// Removes and returns parameter `id`'s gradient, if stored.
    pub fn remove(&mut self, id: ParamId) -> Option<Tensor<B, 1>> {
        self.grads.remove(&id)
    }

    /// The gradient of parameter `id`, flattened, if stored.
    pub fn get(&self, id: ParamId) -> Option<Tensor<B, 1>> {
        self.grads.get(&id).cloned()
    }

    /// This rank's part of the `norm_type`-norm of `layout`'s gradients: `sum |g|^p` (or
    /// `max |g|` for the infinity norm), 0 without gradients. One device read.
    pub fn partial_norm(&self, layout: &[ParamSlot], norm_type: f64) -> f64 {
        let parts = layout.iter().filter_map(|slot| {
            let abs = self.grads.get(&slot.id)?.clone().abs();
            Some(if norm_type.is_infinite() {
                abs.max()
            } else if norm_type == 2.0 {
                abs.square().sum()
            } else {
                abs.powf_scalar(norm_type).sum()
            })
        });
        parts
            .reduce(|a, b| {
                if norm_type.is_infinite() {
                    a.max_pair(b)
                } else {
                    a + b
                }
            })
            .map_or(0.0, |total| total.into_scalar().elem())
    }

    /// Applies `f` to each stored gradient of `layout`.
    pub fn map(&mut self, layout: &[ParamSlot], f: impl Fn(Tensor<B, 1>) -> Tensor<B, 1>) {
        for slot in layout {
            if let Some(grad) = self.grads.remove(&slot.id) {
                self.grads.insert(slot.id, f(grad));
            }
        }
    }
}

/// Scales `module`'s stored gradients so that their joint `norm_type`-norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`, coefficient `max_norm / (norm + 1e-6)` capped at 1) and returns
/// the norm before clipping. `norm_type` may be `f64::INFINITY`.
///
/// `combine` turns this rank's partial norm ([`GradStore::partial_norm`]) into the job's: the
/// identity when every rank holds every gradient (DDP), a reduction across ranks when each holds
/// a shard (ZeRO).
pub fn clip_norm<B: AutodiffBackend>(
    state: &RankState<B>,
    module: &dyn ModuleParams<B>,
    max_norm: f64,
    norm_type: f64,
    combine: impl FnOnce(f64) -> Result<f64, FabricError>,
) -> Result<f64, FabricError> {
    if norm_type.is_nan() || norm_type <= 0.0 {
        return Err(FabricError::InvalidArgument {
            name: "norm_type",
            value: norm_type.to_string(),
            reason: "must be positive (2.0 for the Euclidean norm, f64::INFINITY for the max norm)"
                .into(),
        });
    }
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(FabricError::InvalidArgument {
            name: "max_norm",
            value: max_norm.to_string(),
            reason: "must be zero or positive".into(),
        });
    }
    let layout = module.layout();
    let partial = state.grads().partial_norm(&layout, norm_type);
    let total = combine(partial)?;
    let norm = if norm_type.is_infinite() {
        total
    } else {
        total.powf(1.0 / norm_type)
    };
    if !norm.is_finite() {
        return Err(FabricError::NonFiniteNorm { norm_type, norm });
    }
    let coefficient = max_norm / (norm + 1e-6);
    if coefficient < 1.0 {
        state.grads().map(&layout, |g| g.mul_scalar(coefficient));
    }
    Ok(norm)
}

/// Clamps every stored gradient of `module` into `[-clip_value, clip_value]`.
pub fn clip_value<B: AutodiffBackend>(
    state: &RankState<B>,
    module: &dyn ModuleParams<B>,
    clip_value: f64,
) -> Result<(), FabricError> {
    if clip_value.is_nan() || clip_value < 0.0 {
        return Err(FabricError::InvalidArgument {
            name: "clip_value",
            value: clip_value.to_string(),
            reason: "must be zero or positive".into(),
        });
    }
    state
        .grads()
        .map(&module.layout(), |g| g.clamp(-clip_value, clip_value));
    Ok(())
}
