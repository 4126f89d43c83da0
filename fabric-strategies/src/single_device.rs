//! One device, one rank: nothing is exchanged.

use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fabric_core::FabricError;
use fabric_core::collective::{Collective, SingleProcess};
use fabric_core::strategy::{FlatGrad, Strategy};
use std::marker::PhantomData;

/// Lightning's `SingleDeviceStrategy`: ranks 0 of 1, every collective the identity.
pub struct SingleDevice<B> {
    collective: SingleProcess,
    _backend: PhantomData<fn() -> B>,
}

impl<B> Default for SingleDevice<B> {
    fn default() -> Self {
        Self {
            collective: SingleProcess,
            _backend: PhantomData,
        }
    }
}

impl<B: AutodiffBackend> Strategy<B> for SingleDevice<B> {
    fn name(&self) -> &'static str {
        "single_device"
    }

    fn collective(&self) -> &dyn Collective {
        &self.collective
    }

    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<B::InnerBackend, 1>>,
    ) -> Result<Vec<Tensor<B::InnerBackend, 1>>, FabricError> {
        Ok(params)
    }

    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<B::InnerBackend>>,
    ) -> Result<Vec<FlatGrad<B::InnerBackend>>, FabricError> {
        Ok(grads)
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        None
    }
}
