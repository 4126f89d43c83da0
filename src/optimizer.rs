//! The optimizer as Fabric hands it back from `setup`: it steps with the gradients that
//! `Fabric::backward` stored (averaged across ranks), so there is no way to step with gradients
//! that skipped the strategy.

use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use fabric_core::FabricError;
use fabric_core::grads::GradStore;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A Burn optimizer bound to one rank's gradient store.
pub struct FabricOptimizer<B, M, O> {
    optimizer: O,
    grads: Arc<Mutex<GradStore>>,
    _types: PhantomData<fn() -> (B, M)>,
}

pub(crate) fn lock(store: &Mutex<GradStore>) -> MutexGuard<'_, GradStore> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B, M, O> FabricOptimizer<B, M, O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    pub(crate) fn new(optimizer: O, grads: Arc<Mutex<GradStore>>) -> Self {
        Self {
            optimizer,
            grads,
            _types: PhantomData,
        }
    }

    /// Updates `model` with learning rate `lr` using the gradients accumulated by
    /// `Fabric::backward` since the last step, and clears them (PyTorch's `step()` followed by
    /// `zero_grad()`). Parameters without a gradient are left untouched.
    pub fn step(&mut self, lr: f64, model: M) -> Result<M, FabricError> {
        let grads = lock(&self.grads).take::<B, M>(&model);
        Ok(self.optimizer.step(lr, model, grads))
    }

    /// Discards `model`'s accumulated gradients without stepping.
    pub fn zero_grad(&mut self, model: &M) {
        drop(lock(&self.grads).take::<B, M>(model));
    }

    /// The wrapped Burn optimizer.
    pub fn inner(&self) -> &O {
        &self.optimizer
    }

    /// The optimizer's state (per-parameter records), as `Optimizer::to_record`.
    pub fn to_record(&self) -> O::Record {
        self.optimizer.to_record()
    }

    /// Restores the optimizer's state.
    pub fn load_record(self, record: O::Record) -> Self {
        Self {
            optimizer: self.optimizer.load_record(record),
            ..self
        }
    }

    /// Unwraps the Burn optimizer.
    pub fn into_inner(self) -> O {
        self.optimizer
    }
}
