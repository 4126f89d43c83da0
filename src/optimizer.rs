//! The optimizer as Fabric hands it back from `setup`: it steps with the gradients that
//! `Fabric::backward` stored (averaged across ranks), through the rank's strategy, so there is
//! no way to step with gradients that skipped the strategy.

use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use fabric_core::FabricError;
use fabric_strategies::{OptimizerStep, Params, Strategy};
use std::marker::PhantomData;
use std::sync::Arc;

/// A Burn optimizer bound to one rank's strategy.
pub struct FabricOptimizer<B: AutodiffBackend, M, O> {
    optimizer: O,
    strategy: Arc<dyn Strategy<B>>,
    /// A record was loaded since the last step (under ZeRO it may hold other ranks' state,
    /// which the next step drops).
    loaded: bool,
    _types: PhantomData<fn() -> (B, M)>,
}

impl<B, M, O> FabricOptimizer<B, M, O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    pub(crate) fn new(optimizer: O, strategy: Arc<dyn Strategy<B>>) -> Self {
        Self {
            optimizer,
            strategy,
            loaded: false,
            _types: PhantomData,
        }
    }

    /// Updates `model` with learning rate `lr` using the gradients accumulated by
    /// `Fabric::backward` since the last step, and clears them (PyTorch's `step()` followed by
    /// `zero_grad()`). Parameters without a gradient are left untouched.
    ///
    /// Under `16-mixed`, a step whose gradients held an inf or NaN on any rank is skipped on
    /// every rank (the model comes back unchanged) and the loss scale halves.
    ///
    /// Under ZeRO (`zero1`, `zero2`) each rank steps only the parameters it owns, so its
    /// optimizer state covers only those, and the owners then broadcast the updated values: the
    /// model comes back the same on every rank. Every rank must call `step` together.
    pub fn step(&mut self, lr: f64, model: M) -> Result<M, FabricError> {
        let device = self.strategy.device().clone();
        let mut target = OptimizerStep::new(model, &mut self.optimizer, &device, &mut self.loaded);
        self.strategy.optimizer_step(lr, &mut target)?;
        target.into_model().ok_or(FabricError::Data {
            context: "optimizer step",
            message: "the model was lost in the step".into(),
        })
    }

    /// Notes that a record was loaded (it may hold state this rank does not own).
    pub(crate) fn mark_loaded(&mut self) {
        self.loaded = true;
    }

    /// Discards `model`'s accumulated gradients without stepping.
    pub fn zero_grad(&mut self, model: &M) {
        self.strategy.zero_grad(&Params(model));
    }

    /// The wrapped Burn optimizer.
    pub fn inner(&self) -> &O {
        &self.optimizer
    }

    /// The optimizer's state (per-parameter records), as `Optimizer::to_record`.
    pub fn to_record(&self) -> O::Record {
        self.optimizer.to_record()
    }

    /// Restores the optimizer's state in place.
    pub fn set_record(&mut self, record: O::Record) {
        self.optimizer = self.optimizer.clone().load_record(record);
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
