//! What every strategy holds for its rank: the collective, the device, the precision plugin,
//! the gradient store and the bucket size.

use crate::grads::GradStore;
use burn::tensor::backend::AutodiffBackend;
use fabric_collective::Collective;
use fabric_precision::PrecisionPlugin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// One rank's parts, owned by its strategy.
pub struct RankState<B: AutodiffBackend> {
    collective: Arc<dyn Collective>,
    device: B::Device,
    precision: PrecisionPlugin,
    grads: Arc<Mutex<GradStore<B::InnerBackend>>>,
    bucket_bytes: usize,
}

impl<B: AutodiffBackend> RankState<B> {
    /// The rank talking through `collective` on `device` in `precision`, exchanging tensors in
    /// buckets of about `bucket_bytes`.
    pub fn new(
        collective: Box<dyn Collective>,
        device: B::Device,
        precision: PrecisionPlugin,
        bucket_bytes: usize,
    ) -> Self {
        Self {
            collective: Arc::from(collective),
            device,
            precision,
            grads: Arc::default(),
            bucket_bytes: bucket_bytes.max(1),
        }
    }

    /// The rank's collective.
    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// The rank's collective, for work that outlives a borrow (autodiff operations).
    pub fn shared_collective(&self) -> Arc<dyn Collective> {
        Arc::clone(&self.collective)
    }

    /// The rank's device.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The rank's precision plugin.
    pub fn precision(&self) -> &PrecisionPlugin {
        &self.precision
    }

    /// The rank's gradients (only the rank's own thread takes this lock).
    pub fn grads(&self) -> MutexGuard<'_, GradStore<B::InnerBackend>> {
        self.grads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The rank's gradients, for work that outlives a borrow (DDP's overlapped averaging).
    pub fn shared_grads(&self) -> Arc<Mutex<GradStore<B::InnerBackend>>> {
        Arc::clone(&self.grads)
    }

    /// The bucket size cap in bytes.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }
}
