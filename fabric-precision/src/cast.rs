//! Converting a module's float parameters to another dtype.

use burn::module::{ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

/// Casts every float parameter to a dtype.
///
/// * `detach = true` makes the cast parameters new leaves (a permanent conversion: the
///   optimizer then updates them in the new dtype).
/// * `detach = false` keeps the cast in the autodiff graph (a per-forward view: gradients flow
///   back through the cast to the original parameters, in their dtype).
#[derive(Debug, Clone, Copy)]
pub struct CastParams {
    /// The target dtype.
    pub dtype: FloatDType,
    /// Whether the results become new leaves.
    pub detach: bool,
}

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let mut cast = tensor.cast(self.dtype);
        if self.detach {
            cast = cast.detach();
            if require_grad {
                cast = cast.require_grad();
            }
        }
        Param::from_mapped_value(id, cast, mapper)
    }
}

/// What a forward pass takes as its input: a float tensor, cast to the precision's compute
/// dtype, or an integer or boolean tensor (token ids, masks), passed as it is.
pub trait ForwardInput<B: Backend>: Sized {
    /// The input as the forward pass under `plugin` takes it.
    fn to_compute(self, plugin: &crate::PrecisionPlugin) -> Self;
}

impl<B: Backend, const D: usize> ForwardInput<B> for Tensor<B, D> {
    fn to_compute(self, plugin: &crate::PrecisionPlugin) -> Self {
        plugin.convert_input(self)
    }
}

impl<B: Backend, const D: usize> ForwardInput<B> for Tensor<B, D, burn::tensor::Int> {
    fn to_compute(self, _: &crate::PrecisionPlugin) -> Self {
        self
    }
}

impl<B: Backend, const D: usize> ForwardInput<B> for Tensor<B, D, burn::tensor::Bool> {
    fn to_compute(self, _: &crate::PrecisionPlugin) -> Self {
        self
    }
}
