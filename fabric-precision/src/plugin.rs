//! What a precision does to a rank's module, inputs, outputs and loss.

use crate::cast::CastParams;
use crate::grad_scaler::GradScaler;
use crate::support::{check_available, compute_dtype};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};
use fabric_core::FabricError;
use fabric_core::config::Precision;

/// Whether parameters live in the compute dtype or stay f32 with a half view per forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecisionMode {
    /// `*-true`: parameters are converted once; no master weights.
    True,
    /// `*-mixed`: f32 master parameters, half-precision forward and backward.
    Mixed,
}

/// One rank's precision plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionPlugin {
    precision: Precision,
    dtype: FloatDType,
    mode: PrecisionMode,
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
    /// The plugin of `precision`; Transformer Engine precisions are refused.
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

    /// A fresh loss scaler when the precision uses one (`16-mixed`).
    pub fn grad_scaler(&self) -> Option<GradScaler> {
        (self.precision == Precision::HalfMixed).then(GradScaler::default)
    }

    fn is_identity(&self) -> bool {
        self.mode == PrecisionMode::True && self.dtype == FloatDType::F32
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

    /// For `*-mixed`, the half-precision view of `model` a forward pass runs on (on an autodiff
    /// backend a differentiable cast: gradients reach the f32 parameters). `None` when the
    /// model is used as it is. Works for training modules and their `valid()` inner modules.
    pub fn forward_module<BK: Backend, M: Module<BK>>(&self, model: &M) -> Option<M> {
        (self.mode == PrecisionMode::Mixed).then(|| {
            model.clone().map(&mut CastParams {
                dtype: self.dtype,
                detach: false,
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
                .grad_scaler()
                .is_some()
        );
        assert!(
            PrecisionPlugin::new(Precision::Bf16Mixed)
                .unwrap()
                .grad_scaler()
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
