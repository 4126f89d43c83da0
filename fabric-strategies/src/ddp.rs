//! Distributed data parallel: every rank holds the whole model and its own optimizer; gradients
//! are averaged across ranks after each synchronised backward pass, in buckets.

use crate::bucket::{broadcast_buckets, reduce_buckets, reduce_buckets_on_device};
use crate::module::FlatGrad;
use crate::rank_state::RankState;
use crate::strategy::Strategy;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fabric_collective::DeviceCollective;
use fabric_core::FabricError;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Lightning's `DDPStrategy`. Gradients are flattened into buckets of about `bucket_bytes`
/// (module-visit order, identical on every rank), one all-reduce per bucket (see
/// [`reduce_bucket`](crate::bucket::reduce_bucket) for parameters only some ranks used). With a
/// device engine ([`with_engine`](Self::with_engine), NCCL on CUDA) the buckets are averaged in
/// device memory instead of through the host collective.
pub struct Ddp<B: AutodiffBackend> {
    state: RankState<B>,
    engine: Option<Box<dyn DeviceCollective<Inner<B>>>>,
}

impl<B: AutodiffBackend> Ddp<B> {
    /// DDP for the rank `state` describes.
    pub fn new(state: RankState<B>) -> Self {
        Self {
            state,
            engine: None,
        }
    }

    /// Averages the gradient buckets through `engine` (on the devices) rather than the host
    /// collective, which still serves everything else.
    pub fn with_engine(mut self, engine: Box<dyn DeviceCollective<Inner<B>>>) -> Self {
        self.engine = Some(engine);
        self
    }
}

impl<B: AutodiffBackend> Strategy<B> for Ddp<B> {
    fn name(&self) -> &'static str {
        "ddp"
    }

    fn rank_state(&self) -> &RankState<B> {
        &self.state
    }

    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError> {
        let state = &self.state;
        broadcast_buckets::<Inner<B>>(
            state.collective(),
            state.device(),
            params,
            state.bucket_bytes(),
            0,
        )
    }

    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<Inner<B>>>,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError> {
        let state = &self.state;
        if let Some(engine) = &self.engine {
            return reduce_buckets_on_device::<Inner<B>>(
                state.collective(),
                engine.as_ref(),
                state.device(),
                grads,
                state.bucket_bytes(),
            );
        }
        reduce_buckets::<Inner<B>>(
            state.collective(),
            state.device(),
            grads,
            state.bucket_bytes(),
            None,
        )
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        let collective = self.state.collective();
        Some((collective.world_size(), collective.rank()))
    }
}
