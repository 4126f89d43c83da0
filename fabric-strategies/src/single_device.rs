//! One device, one rank: nothing is exchanged.

use crate::module::FlatGrad;
use crate::rank_state::RankState;
use crate::strategy::Strategy;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fabric_core::FabricError;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Lightning's `SingleDeviceStrategy`: rank 0 of 1, every collective the identity.
pub struct SingleDevice<B: AutodiffBackend> {
    state: RankState<B>,
}

impl<B: AutodiffBackend> SingleDevice<B> {
    /// The strategy of the one rank `state` describes (its collective is `SingleProcess`).
    pub fn new(state: RankState<B>) -> Self {
        Self { state }
    }
}

impl<B: AutodiffBackend> Strategy<B> for SingleDevice<B> {
    fn name(&self) -> &'static str {
        "single_device"
    }

    fn rank_state(&self) -> &RankState<B> {
        &self.state
    }

    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError> {
        Ok(params)
    }

    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<Inner<B>>>,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError> {
        Ok(grads)
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        None
    }
}
