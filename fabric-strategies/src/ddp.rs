//! Distributed data parallel: every rank holds the whole model and its own optimizer; gradients
//! are averaged across ranks after each synchronised backward pass, in buckets.

use crate::bucket::{broadcast_buckets, reduce_buckets, reduce_buckets_on_device};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fabric_core::FabricError;
use fabric_core::collective::{Collective, DeviceCollective};
use fabric_core::strategy::{FlatGrad, Strategy};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Lightning's `DDPStrategy`. Gradients are flattened into buckets of about `bucket_bytes`
/// (module-visit order, identical on every rank), one all-reduce per bucket (see
/// [`reduce_bucket`](crate::bucket::reduce_bucket) for parameters only some ranks used). With a
/// device engine ([`with_engine`](Self::with_engine), NCCL on CUDA) the buckets are averaged in
/// device memory instead of through the host collective.
pub struct Ddp<B: AutodiffBackend> {
    collective: Box<dyn Collective>,
    engine: Option<Box<dyn DeviceCollective<Inner<B>>>>,
    device: B::Device,
    bucket_bytes: usize,
}

impl<B: AutodiffBackend> Ddp<B> {
    /// DDP over `collective` for the rank whose device is `device`.
    pub fn new(collective: Box<dyn Collective>, device: B::Device, bucket_bytes: usize) -> Self {
        Self {
            collective,
            engine: None,
            device,
            bucket_bytes: bucket_bytes.max(1),
        }
    }

    /// Averages the gradient buckets through `engine` (on the devices) rather than the host
    /// collective, which still serves everything else.
    pub fn with_engine(mut self, engine: Box<dyn DeviceCollective<Inner<B>>>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// The rank's device.
    pub(crate) fn device(&self) -> &B::Device {
        &self.device
    }

    /// The bucket size cap.
    pub(crate) fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }
}

impl<B: AutodiffBackend> Strategy<B> for Ddp<B> {
    fn name(&self) -> &'static str {
        "ddp"
    }

    fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError> {
        broadcast_buckets::<Inner<B>>(
            self.collective.as_ref(),
            &self.device,
            params,
            self.bucket_bytes,
            0,
        )
    }

    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<Inner<B>>>,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError> {
        if let Some(engine) = &self.engine {
            return reduce_buckets_on_device::<Inner<B>>(
                self.collective.as_ref(),
                engine.as_ref(),
                &self.device,
                grads,
                self.bucket_bytes,
            );
        }
        reduce_buckets::<Inner<B>>(
            self.collective.as_ref(),
            &self.device,
            grads,
            self.bucket_bytes,
            None,
        )
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        Some((self.collective.world_size(), self.collective.rank()))
    }
}
