//! One rank's precision plugin (Lightning's `Precision`): it converts the module at setup, runs
//! the forward pass in the compute dtype, scales the loss and unscales the gradients around
//! backward, decides at the step whether the optimizer may step, and saves its own state in
//! checkpoints. All of precision lives here; strategies call it, the façade never does the
//! arithmetic itself.

use crate::cast::CastParams;
use crate::grad_scaler::{GradScaler, GradScalerState};
use crate::support::{check_available, compute_dtype};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, FloatDType, Tensor};
use fabric_collective::{Collective, ReduceOp, all_reduce_scalar};
use fabric_core::FabricError;
use fabric_core::checkpoint::{Entry, EntryKind, Settings, error};
use fabric_core::config::Precision;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Reserved checkpoint key of the loss scaler's state (saved and restored with every checkpoint
/// under `16-mixed`).
pub const GRAD_SCALER_KEY: &str = "fabric.grad_scaler";

/// Whether parameters live in the compute dtype or stay f32 with a half view per forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecisionMode {
    /// `*-true`: parameters are converted once; no master weights.
    True,
    /// `*-mixed`: f32 master parameters, half-precision forward and backward.
    Mixed,
}

/// One rank's precision plugin, with the rank's loss-scaling state.
#[derive(Debug)]
pub struct PrecisionPlugin {
    precision: Precision,
    dtype: FloatDType,
    mode: PrecisionMode,
    /// `16-mixed`'s loss scaler.
    scaler: Option<Mutex<GradScaler>>,
    /// Whether a gradient since the last step held an inf or NaN (agreed across ranks at each
    /// synchronisation).
    overflow: AtomicBool,
    /// Forward passes run through the precision context since the last backward.
    forwards: AtomicU64,
}

fn float_dtype(dtype: DType) -> FloatDType {
    match dtype {
        DType::F64 => FloatDType::F64,
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    }
}

impl PrecisionPlugin {
    /// The plugin of `precision`, with a fresh loss scaler under `16-mixed`; Transformer Engine
    /// precisions are refused.
    pub fn new(precision: Precision) -> Result<Self, FabricError> {
        check_available(precision)?;
        let dtype = float_dtype(compute_dtype(precision).unwrap_or(DType::F32));
        let mode = match precision {
            Precision::HalfMixed | Precision::Bf16Mixed => PrecisionMode::Mixed,
            _ => PrecisionMode::True,
        };
        Ok(Self {
            precision,
            dtype,
            mode,
            scaler: (precision == Precision::HalfMixed).then(|| Mutex::new(GradScaler::default())),
            overflow: AtomicBool::new(false),
            forwards: AtomicU64::new(0),
        })
    }

    /// The precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The dtype forward and backward run in.
    pub fn compute_dtype(&self) -> FloatDType {
        self.dtype
    }

    /// True or mixed.
    pub fn mode(&self) -> PrecisionMode {
        self.mode
    }

    fn is_identity(&self) -> bool {
        self.mode == PrecisionMode::True && self.dtype == FloatDType::F32
    }

    fn scaler(&self) -> Option<MutexGuard<'_, GradScaler>> {
        self.scaler
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Converts a module at setup: `*-true` parameters to the compute dtype, `*-mixed`
    /// parameters to f32 (the master weights). New leaves either way.
    pub fn convert_module<B: AutodiffBackend, M: AutodiffModule<B>>(&self, model: M) -> M {
        if self.is_identity() {
            return model;
        }
        let dtype = match self.mode {
            PrecisionMode::True => self.dtype,
            PrecisionMode::Mixed => FloatDType::F32,
        };
        model.map(&mut CastParams {
            dtype,
            detach: true,
        })
    }

    /// Runs `forward` on `model` in the precision context: `input` cast to the compute dtype (a
    /// float input; token ids and masks pass as they are), the model's half-precision view
    /// under `*-mixed`, the output cast back to f32.
    pub fn forward<BK, M, I, const DO: usize>(
        &self,
        model: &M,
        input: I,
        forward: impl FnOnce(&M, I) -> Tensor<BK, DO>,
    ) -> Tensor<BK, DO>
    where
        BK: Backend,
        M: Module<BK>,
        I: crate::ForwardInput<BK>,
    {
        let input = input.to_compute(self);
        let output = self.autocast(model, |m| forward(m, input));
        self.convert_output(output)
    }

    /// Runs `body` with the module a forward pass should use: the half-precision view of the
    /// f32 master parameters under `*-mixed` (a differentiable cast: gradients reach the f32
    /// parameters), `model` itself otherwise. Counts as a forward in the precision context.
    pub fn autocast<BK: Backend, M: Module<BK>, R>(
        &self,
        model: &M,
        body: impl FnOnce(&M) -> R,
    ) -> R {
        self.forwards.fetch_add(1, Ordering::Relaxed);
        match self.forward_module(model) {
            Some(view) => body(&view),
            None => body(model),
        }
    }

    /// For `*-mixed`, the half-precision view of `model` a forward pass runs on; `None` when the
    /// model is used as it is. Works for training modules and their `valid()` inner modules.
    pub fn forward_module<BK: Backend, M: Module<BK>>(&self, model: &M) -> Option<M> {
        (self.mode == PrecisionMode::Mixed).then(|| {
            model.clone().map(&mut CastParams {
                dtype: self.dtype,
                detach: false,
            })
        })
    }

    /// For `*-mixed`, a half-precision copy of `model` whose trainable parameters are leaves of
    /// their own, with the same ids: a step that runs its own backward pass on it (a burn-train
    /// `TrainStep`) gets gradients for them, which cast to f32 are the master weights'
    /// gradients (what the differentiable cast of [`forward_module`](Self::forward_module)
    /// would give). `None` when the model is used as it is.
    pub fn leaf_view<BK: Backend, M: Module<BK>>(&self, model: &M) -> Option<M> {
        (self.mode == PrecisionMode::Mixed).then(|| {
            model.clone().map(&mut CastParams {
                dtype: self.dtype,
                detach: true,
            })
        })
    }

    /// Casts a float input to the compute dtype.
    pub fn convert_input<BK: Backend, const D: usize>(
        &self,
        input: Tensor<BK, D>,
    ) -> Tensor<BK, D> {
        if self.is_identity() {
            return input;
        }
        input.cast(self.dtype)
    }

    /// Casts a float output back to f32, as Lightning returns outputs.
    pub fn convert_output<BK: Backend, const D: usize>(
        &self,
        output: Tensor<BK, D>,
    ) -> Tensor<BK, D> {
        if self.is_identity() {
            return output;
        }
        output.cast(FloatDType::F32)
    }

    /// Before a backward pass: under `*-mixed` a loss must come from a forward pass run through
    /// the precision context ([`forward`](Self::forward) or [`autocast`](Self::autocast)) since
    /// the last backward, or half precision silently would not apply (Lightning refuses a bare
    /// `loss.backward()` likewise). Then multiplies the loss by the loss scale (`16-mixed`).
    pub fn scale_loss<B: AutodiffBackend, const D: usize>(
        &self,
        loss: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, FabricError> {
        let forwards = self.forwards.swap(0, Ordering::Relaxed);
        if self.mode == PrecisionMode::Mixed && forwards == 0 {
            return Err(FabricError::PrecisionBypassed {
                precision: self.precision.to_string(),
            });
        }
        Ok(match self.scaler() {
            Some(scaler) => loss.mul_scalar(scaler.scale()),
            None => loss,
        })
    }

    /// After a backward pass: divides the gradients (flattened) by the loss scale so that
    /// clipping and the step see true gradients, and notes whether any holds an inf or NaN
    /// (the next step is then skipped on every rank). The identity without a loss scaler.
    pub fn unscale_gradients<BK: Backend>(
        &self,
        grads: Vec<Option<Tensor<BK, 1>>>,
    ) -> Vec<Option<Tensor<BK, 1>>> {
        let Some(scale) = self.scaler().map(|s| s.scale()) else {
            return grads;
        };
        let factor = 1.0 / scale;
        let mut sums = Vec::new();
        let grads = grads
            .into_iter()
            .map(|grad| {
                grad.map(|grad| {
                    let grad = if factor == 1.0 {
                        grad
                    } else {
                        grad.mul_scalar(factor)
                    };
                    sums.push(grad.clone().sum().cast(FloatDType::F32));
                    grad
                })
            })
            .collect();
        if !sums.is_empty() {
            // inf and NaN survive a sum: one read tells whether any gradient holds one.
            let total: f64 = Tensor::cat(sums, 0).sum().into_scalar().elem();
            if !total.is_finite() {
                self.overflow.store(true, Ordering::Relaxed);
            }
        }
        grads
    }

    /// After gradients were synchronised: every rank learns whether any rank overflowed, so
    /// that all skip the same steps. Nothing to agree on without a loss scaler.
    pub fn agree_overflow(&self, collective: &dyn Collective) -> Result<(), FabricError> {
        if self.scaler.is_none() {
            return Ok(());
        }
        let mine = f64::from(u8::from(self.overflow.load(Ordering::Relaxed)));
        let any = all_reduce_scalar(collective, mine, ReduceOp::Max)? > 0.0;
        self.overflow.store(any, Ordering::Relaxed);
        Ok(())
    }

    /// At the optimizer step: whether the optimizer may step. Under `16-mixed` a step whose
    /// gradients overflowed is skipped (and the scale backs off); otherwise the scaler counts a
    /// clean step. Always true without a loss scaler.
    pub fn step_allowed(&self) -> bool {
        let overflow = self.overflow.swap(false, Ordering::Relaxed);
        match self.scaler() {
            Some(mut scaler) => scaler.update(!overflow),
            None => true,
        }
    }

    /// The loss scaler's state under `16-mixed`, `None` otherwise.
    pub fn scaler_state(&self) -> Option<GradScalerState> {
        self.scaler().map(|s| s.state())
    }

    /// Restores the loss scaler's state; ignored without a scaler.
    pub fn load_scaler_state(&self, state: GradScalerState) {
        if let Some(mut scaler) = self.scaler() {
            scaler.load_state(state);
        }
    }

    /// Adds the precision's own checkpoint entry (the loss scaler's state under `16-mixed`).
    pub fn save_state(&self, entries: &mut Vec<Entry>) -> Result<(), String> {
        let Some(state) = self.scaler_state() else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&state)
            .map_err(|e| format!("cannot encode the loss scaler's state: {e}"))?;
        entries.push(Entry {
            key: GRAD_SCALER_KEY.into(),
            kind: EntryKind::Value,
            settings: Settings::Full,
            bytes,
        });
        Ok(())
    }

    /// Takes the precision's own entry out of a loaded checkpoint (read from `path`) and
    /// restores it; a checkpoint without one leaves the state as it is.
    pub fn load_state(&self, path: &Path, entries: &mut Vec<Entry>) -> Result<(), FabricError> {
        let Some(i) = entries.iter().position(|e| e.key == GRAD_SCALER_KEY) else {
            return Ok(());
        };
        let entry = entries.remove(i);
        let state = serde_json::from_slice(&entry.bytes)
            .map_err(|e| error(path, Some(GRAD_SCALER_KEY), e.to_string()))?;
        self.load_scaler_state(state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    type B = burn::backend::Autodiff<burn::backend::Flex>;

    fn dtypes(model: &Linear<B>) -> (DType, DType) {
        let bias = model
            .bias
            .as_ref()
            .map(|b| b.val().dtype())
            .unwrap_or(DType::F32);
        (model.weight.val().dtype(), bias)
    }

    #[test]
    fn true_precisions_convert_parameters_mixed_keep_f32_masters() {
        let device = Default::default();
        for (precision, expected) in [
            (Precision::Double, DType::F64),
            (Precision::Full, DType::F32),
            (Precision::HalfTrue, DType::F16),
            (Precision::Bf16True, DType::BF16),
            (Precision::HalfMixed, DType::F32),
            (Precision::Bf16Mixed, DType::F32),
        ] {
            let plugin = PrecisionPlugin::new(precision).unwrap();
            let model = plugin.convert_module(LinearConfig::new(3, 2).init::<B>(&device));
            assert_eq!(dtypes(&model), (expected, expected), "{precision}");
            assert!(model.weight.val().is_require_grad());
            let view = plugin.forward_module(&model);
            match plugin.mode() {
                PrecisionMode::Mixed => {
                    let half: DType = plugin.compute_dtype().into();
                    assert_eq!(dtypes(view.as_ref().unwrap()), (half, half));
                }
                PrecisionMode::True => assert!(view.is_none()),
            }
        }
        assert!(
            PrecisionPlugin::new(Precision::HalfMixed)
                .unwrap()
                .scaler_state()
                .is_some()
        );
        assert!(
            PrecisionPlugin::new(Precision::Bf16Mixed)
                .unwrap()
                .scaler_state()
                .is_none()
        );
    }

    #[test]
    fn mixed_gradients_reach_the_f32_masters_in_f32() {
        let device = Default::default();
        let plugin = PrecisionPlugin::new(Precision::Bf16Mixed).unwrap();
        let model = plugin.convert_module(LinearConfig::new(3, 2).init::<B>(&device));
        let x = plugin.convert_input(Tensor::<B, 2>::ones([4, 3], &device));
        assert_eq!(x.dtype(), DType::BF16);
        let y = plugin.forward_module(&model).unwrap().forward(x);
        let y = plugin.convert_output(y);
        assert_eq!(y.dtype(), DType::F32);
        let grads = y.sum().backward();
        let grad = model.weight.grad(&grads).unwrap();
        assert_eq!(grad.dtype(), DType::F32);
        // d(sum(xW + b))/dW = sum over the batch of x = 4 for every entry
        assert_eq!(grad.into_data().to_vec::<f32>().unwrap(), vec![4.0; 6]);
    }
}
