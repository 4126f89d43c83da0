//! A rank's gradients between `backward` and the optimizer step, like PyTorch's `.grad`: they
//! accumulate across backward passes until a step takes them. Every walk over parameters goes
//! in module-visit order, which is the same on every rank whatever the random `ParamId`s are.

use crate::FabricError;
use crate::strategy::{FlatGrad, Strategy};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Tensor};
use std::marker::PhantomData;

/// Accumulated, possibly synchronised, gradients of every module a rank trains, keyed by
/// parameter id.
#[derive(Default)]
pub struct GradStore {
    grads: GradientsParams,
}

impl std::fmt::Debug for GradStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradStore")
            .field("len", &self.grads.len())
            .finish()
    }
}

impl GradStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of parameters holding a gradient.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether no parameter holds a gradient.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Adds `new` (gradients of `model`'s parameters) to what is stored.
    pub fn accumulate<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        mut new: GradientsParams,
    ) {
        model.visit(&mut Accumulate::<B> {
            store: &mut self.grads,
            new: &mut new,
            _b: PhantomData,
        });
    }

    /// Adds `new` multiplied by `factor` (a loss scaler's `1 / scale`) to what is stored, and
    /// returns whether every added value is finite (no inf or NaN: a scaled loss overflowed).
    pub fn accumulate_scaled<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        mut new: GradientsParams,
        factor: f64,
    ) -> bool {
        let mut scale = ScaleAndSum::<B> {
            grads: &mut new,
            factor,
            sums: Vec::new(),
        };
        model.visit(&mut scale);
        let sums = std::mem::take(&mut scale.sums);
        self.accumulate::<B, M>(model, new);
        if sums.is_empty() {
            return true;
        }
        // inf and NaN survive a sum: one read tells whether any gradient holds one.
        let total: f64 = Tensor::cat(sums, 0).sum().into_scalar().elem();
        total.is_finite()
    }

    /// Replaces `model`'s stored gradients by their average over the ranks, as `strategy`
    /// computes it.
    pub fn reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        strategy: &dyn Strategy<B>,
    ) -> Result<(), FabricError> {
        let mut flatten = Flatten::<B> {
            store: &mut self.grads,
            out: Vec::new(),
        };
        model.visit(&mut flatten);
        let reduced = strategy.reduce_gradients(flatten.out)?;
        model.visit(&mut Unflatten::<B> {
            store: &mut self.grads,
            grads: reduced.into_iter(),
        });
        Ok(())
    }

    /// Removes and returns `model`'s gradients, ready for `Optimizer::step`; other modules'
    /// gradients stay.
    pub fn take<B: AutodiffBackend, M: AutodiffModule<B>>(&mut self, model: &M) -> GradientsParams {
        let mut taken = GradientsParams::new();
        model.visit(&mut Accumulate::<B> {
            store: &mut taken,
            new: &mut self.grads,
            _b: PhantomData,
        });
        taken
    }

    /// Removes and returns `model`'s gradients of the trainable parameters whose visit-order
    /// index is marked in `owned` (ZeRO: each rank steps its own partition only).
    pub fn take_owned<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        owned: &[bool],
    ) -> GradientsParams {
        let mut flatten = Flatten::<B> {
            store: &mut self.grads,
            out: Vec::new(),
        };
        model.visit(&mut flatten);
        let kept: Vec<FlatGrad<B::InnerBackend>> = flatten
            .out
            .into_iter()
            .zip(owned.iter().chain(std::iter::repeat(&false)))
            .map(|(g, &mine)| FlatGrad {
                grad: g.grad.filter(|_| mine),
                ..g
            })
            .collect();
        let mut taken = GradientsParams::new();
        model.visit(&mut Unflatten::<B> {
            store: &mut taken,
            grads: kept.into_iter(),
        });
        taken
    }

    /// `model`'s gradient of parameter `param`, if stored (for inspection and tests).
    pub fn get<B: AutodiffBackend, const D: usize>(
        &self,
        param: &Param<Tensor<B, D>>,
    ) -> Option<Tensor<B::InnerBackend, D>> {
        self.grads.get::<B::InnerBackend, D>(param.id)
    }

    /// Scales `model`'s gradients so that their joint `norm_type`-norm is at most `max_norm`
    /// (PyTorch's `clip_grad_norm_`, coefficient `max_norm / (norm + 1e-6)` capped at 1) and
    /// returns the norm before clipping. `norm_type` may be `f64::INFINITY`.
    ///
    /// `combine` turns this rank's partial `sum |g|^p` (or `max |g|`) into the job's: the
    /// identity when every rank holds every gradient (DDP), a reduction across ranks when each
    /// holds a shard (ZeRO).
    pub fn clip_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        max_norm: f64,
        norm_type: f64,
        combine: impl FnOnce(f64) -> Result<f64, FabricError>,
    ) -> Result<f64, FabricError> {
        if norm_type.is_nan() || norm_type <= 0.0 {
            return Err(FabricError::InvalidArgument {
                name: "norm_type",
                value: norm_type.to_string(),
                reason:
                    "must be positive (2.0 for the Euclidean norm, f64::INFINITY for the max norm)"
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
        let mut norms = PartNorms::<B> {
            store: &self.grads,
            norm_type,
            parts: Vec::new(),
        };
        model.visit(&mut norms);
        let partial: f64 = norms
            .parts
            .into_iter()
            .reduce(|a, b| {
                if norm_type.is_infinite() {
                    a.max_pair(b)
                } else {
                    a + b
                }
            })
            .map_or(0.0, |total| total.into_scalar().elem());
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
            self.map::<B, M>(model, |g| g.mul_scalar(coefficient));
        }
        Ok(norm)
    }

    /// Clamps every gradient of `model` into `[-clip_value, clip_value]`.
    pub fn clip_value<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        clip_value: f64,
    ) -> Result<(), FabricError> {
        if clip_value.is_nan() || clip_value < 0.0 {
            return Err(FabricError::InvalidArgument {
                name: "clip_value",
                value: clip_value.to_string(),
                reason: "must be zero or positive".into(),
            });
        }
        self.map::<B, M>(model, |g| g.clamp(-clip_value, clip_value));
        Ok(())
    }

    /// Applies `f` to each stored gradient of `model`, flattened.
    fn map<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        f: impl Fn(Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1>,
    ) {
        let mut flatten = Flatten::<B> {
            store: &mut self.grads,
            out: Vec::new(),
        };
        model.visit(&mut flatten);
        let mapped: Vec<FlatGrad<B::InnerBackend>> = flatten
            .out
            .into_iter()
            .map(|g| FlatGrad {
                grad: g.grad.map(&f),
                ..g
            })
            .collect();
        model.visit(&mut Unflatten::<B> {
            store: &mut self.grads,
            grads: mapped.into_iter(),
        });
    }
}

/// Whether a parameter takes part in gradient exchange. Decided from the module, identically on
/// every rank.
fn trainable<B: AutodiffBackend, const D: usize>(param: &Param<Tensor<B, D>>) -> bool {
    param.val().is_require_grad()
}

/// Moves each visited parameter's gradient from `new` into `store`, adding to what is there.
struct Accumulate<'a, B> {
    store: &'a mut GradientsParams,
    new: &'a mut GradientsParams,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Accumulate<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.new.remove::<B::InnerBackend, D>(param.id) {
            let sum = match self.store.remove::<B::InnerBackend, D>(param.id) {
                Some(old) => old + grad,
                None => grad,
            };
            self.store.register::<B::InnerBackend, D>(param.id, sum);
        }
    }
}

/// Multiplies each visited parameter's gradient by `factor` and records its sum (in f32).
struct ScaleAndSum<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    sums: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleAndSum<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let grad = if self.factor == 1.0 {
                grad
            } else {
                grad.mul_scalar(self.factor)
            };
            self.sums
                .push(grad.clone().sum().cast(burn::tensor::FloatDType::F32));
            self.grads.register::<B::InnerBackend, D>(param.id, grad);
        }
    }
}

/// Removes the trainable parameters' gradients, flattened, in visit order.
struct Flatten<'a, B: AutodiffBackend> {
    store: &'a mut GradientsParams,
    out: Vec<FlatGrad<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !trainable(param) {
            return;
        }
        let numel = param.lazy_shape().num_elements();
        let grad = self
            .store
            .remove::<B::InnerBackend, D>(param.id)
            .map(|g| g.reshape([numel]));
        self.out.push(FlatGrad {
            numel,
            dtype: param.val().dtype(),
            grad,
        });
    }
}

/// Puts flattened gradients back, in the same visit order as [`Flatten`].
struct Unflatten<'a, B: AutodiffBackend> {
    store: &'a mut GradientsParams,
    grads: std::vec::IntoIter<FlatGrad<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !trainable(param) {
            return;
        }
        if let Some(grad) = self.grads.next().and_then(|g| g.grad) {
            let grad: Tensor<B::InnerBackend, D> = grad.reshape(param.lazy_shape());
            self.store.register::<B::InnerBackend, D>(param.id, grad);
        }
    }
}

/// Per-parameter `sum |g|^p` (or `max |g|`), each a one-element tensor, summed later with one
/// device read.
struct PartNorms<'a, B: AutodiffBackend> {
    store: &'a GradientsParams,
    norm_type: f64,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for PartNorms<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.store.get::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let abs = grad.abs().flatten::<1>(0, D - 1);
        let part = if self.norm_type.is_infinite() {
            abs.max()
        } else if self.norm_type == 2.0 {
            abs.square().sum()
        } else {
            abs.powf_scalar(self.norm_type).sum()
        };
        self.parts.push(part);
    }
}

/// Overwrites float parameters with the next values from `values` (flattened, visit order),
/// keeping whether each requires grad. Used to install rank 0's parameters at setup and the
/// owners' updates under ZeRO.
pub struct AssignParams<B: AutodiffBackend, I: Iterator<Item = Tensor<B::InnerBackend, 1>>> {
    values: I,
    ids: Option<std::vec::IntoIter<ParamId>>,
    trainable_only: bool,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend, I: Iterator<Item = Tensor<B::InnerBackend, 1>>> AssignParams<B, I> {
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

impl<B: AutodiffBackend, I: Iterator<Item = Tensor<B::InnerBackend, 1>>> ModuleMapper<B>
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
    pub values: Vec<Tensor<B::InnerBackend, 1>>,
    /// Their ids.
    pub ids: Vec<ParamId>,
    trainable_only: bool,
}

impl<B: AutodiffBackend> Default for CollectParams<B> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            ids: Vec::new(),
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
        let numel = value.shape().num_elements();
        self.values.push(value.reshape([numel]));
        self.ids.push(param.id);
    }
}

/// Element count and dtype of each trainable parameter, in visit order: the layout every
/// strategy partitions by.
pub fn trainable_layout<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
) -> Vec<(usize, DType)> {
    struct Layout(Vec<(usize, DType)>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Layout {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if trainable(param) {
                self.0
                    .push((param.lazy_shape().num_elements(), param.val().dtype()));
            }
        }
    }
    let mut layout = Layout(Vec::new());
    model.visit(&mut layout);
    layout.0
}
