//! Distributed data parallel: every rank holds the whole model and its own optimizer; gradients
//! are averaged across ranks after each synchronised backward pass, in buckets.

use crate::bucket::{broadcast_buckets, reduce_buckets, reduce_buckets_on_device};
use crate::module::{FlatGrad, ModuleParams, ParamSlot};
use crate::overlap::{Overlap, ParamWatch};
use crate::rank_state::RankState;
use crate::strategy::Strategy;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fabric_collective::DeviceCollective;
use fabric_core::FabricError;
use fabric_core::gather::{GatherParam, TrackedGather};
use fabric_precision::PrecisionMode;
use std::sync::Arc;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Lightning's `DDPStrategy`. Gradients are flattened into buckets of about `bucket_bytes`
/// (module-visit order, identical on every rank), one all-reduce per bucket (see
/// [`reduce_bucket`](crate::bucket::reduce_bucket) for parameters only some ranks used). With a
/// device engine ([`with_engine`](Self::with_engine), NCCL on CUDA) the buckets are averaged in
/// device memory instead of through the host collective.
///
/// [`overlapped`](Self::overlapped): the parameters of each `burn_fabric::unit` run inside
/// `Fabric::forward` are averaged while backward goes on ([`Overlap`]), in buckets of their own;
/// the rest after backward.
pub struct Ddp<B: AutodiffBackend> {
    state: RankState<B>,
    engine: Option<Box<dyn DeviceCollective<Inner<B>>>>,
    /// The overlapped averaging and the training backend's watch, when turned on.
    overlap: Option<(Arc<Overlap<Inner<B>>>, TrackedGather)>,
}

impl<B: AutodiffBackend> Ddp<B> {
    /// DDP for the rank `state` describes.
    pub fn new(state: RankState<B>) -> Self {
        Self {
            state,
            engine: None,
            overlap: None,
        }
    }

    /// Averages the gradients of units' parameters while backward goes on (see [`Overlap`]);
    /// needs the training backend's autodiff operations.
    pub fn overlapped(mut self) -> Self
    where
        B: GatherParam,
    {
        let state = &self.state;
        let overlap = Arc::new(Overlap::new(
            state.shared_collective(),
            state.device().clone(),
            state.bucket_bytes(),
            state.shared_grads(),
        ));
        self.overlap = Some((overlap, TrackedGather::of::<B>()));
        self
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

    fn watch(&self) -> Option<ParamWatch> {
        let state = &self.state;
        let (overlap, tracked) = self.overlap.as_ref()?;
        let overlaps = self.engine.is_none()
            && state.collective().world_size() > 1
            && state.precision().mode() != PrecisionMode::Mixed;
        overlaps.then(|| ParamWatch {
            sink: overlap.clone(),
            tracked: *tracked,
        })
    }

    /// [`Strategy::accumulate_gradients`], with the watched parameters' gradients averaged
    /// during backward taken from [`Overlap::finish`] instead of averaged again.
    fn accumulate_gradients(
        &self,
        module: &dyn ModuleParams<B>,
        grads: Vec<Option<Tensor<Inner<B>, 1>>>,
        sync: bool,
    ) -> Result<(), FabricError> {
        let state = &self.state;
        let layout = module.layout();
        let mut new = state.precision().unscale_gradients(grads);
        let averaged = match &self.overlap {
            Some((overlap, _)) => overlap.finish(&layout, &mut new).transpose()?,
            None => None,
        };
        state.grads().accumulate(&layout, new);
        let Some(averaged) = averaged else {
            return crate::strategy::sync_stored(self, &layout, sync);
        };
        let rest: Vec<ParamSlot> = layout
            .into_iter()
            .filter(|slot| !averaged.contains_key(&slot.id))
            .collect();
        crate::strategy::sync_stored(self, &rest, true)?;
        let mut grads = state.grads();
        for (id, grad) in averaged.into_iter() {
            if let Some(grad) = grad {
                grads.set(id, grad);
            }
        }
        Ok(())
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        let collective = self.state.collective();
        Some((collective.world_size(), collective.rank()))
    }
}
