//! The optimizer as Fabric hands it back from `setup`: it steps with the gradients that
//! `Fabric::backward` stored (averaged across ranks), so there is no way to step with gradients
//! that skipped the strategy.

use crate::checkpoint::{decode_record, encode_record};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use fabric_core::FabricError;
use fabric_core::checkpoint::{Settings, retain_record};
use fabric_core::grads::{AssignParams, CollectParams, GradStore, trainable_layout};
use fabric_core::strategy::Strategy;
use fabric_precision::GradScaler;
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// What `backward` leaves for the optimizer step of one rank.
#[derive(Debug, Default)]
pub(crate) struct StepState {
    /// Accumulated (and, after a synchronised backward, averaged) gradients.
    pub grads: GradStore,
    /// `16-mixed`'s loss scaler.
    pub scaler: Option<GradScaler>,
    /// Whether a gradient since the last step held an inf or NaN (agreed across ranks at each
    /// synchronisation).
    pub overflow: bool,
}

/// A Burn optimizer bound to one rank's gradient store.
pub struct FabricOptimizer<B: AutodiffBackend, M, O> {
    optimizer: O,
    state: Arc<Mutex<StepState>>,
    strategy: Arc<dyn Strategy<B>>,
    device: B::Device,
    /// A loaded record may hold other ranks' state (a consolidated checkpoint under ZeRO):
    /// the next step keeps only this rank's.
    prune: bool,
    _types: PhantomData<fn() -> (B, M)>,
}

pub(crate) fn lock(state: &Mutex<StepState>) -> MutexGuard<'_, StepState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B, M, O> FabricOptimizer<B, M, O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    pub(crate) fn new(
        optimizer: O,
        state: Arc<Mutex<StepState>>,
        strategy: Arc<dyn Strategy<B>>,
        device: B::Device,
    ) -> Self {
        Self {
            optimizer,
            state,
            strategy,
            device,
            prune: false,
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
        // Only a sharding strategy needs the layout: DDP's step walks no extra visitor.
        let owned = if self.strategy.shards_optimizer() {
            self.strategy
                .owned_parameters(&trainable_layout::<B, M>(&model))
        } else {
            None
        };
        let mut state = lock(&self.state);
        let grads = match &owned {
            Some(owned) => state.grads.take_owned::<B, M>(&model, owned),
            None => state.grads.take::<B, M>(&model),
        };
        let overflow = std::mem::take(&mut state.overflow);
        if let Some(scaler) = state.scaler.as_mut()
            && !scaler.update(!overflow)
        {
            return Ok(model);
        }
        drop(state);
        if let Some(owned) = owned.as_deref().filter(|_| self.prune) {
            self.keep_own_state(&model, owned)?;
        }
        let model = self.optimizer.step(lr, model, grads);
        let Some(owned) = owned else {
            return Ok(model);
        };
        let mut collect = CollectParams::<B>::trainable_only();
        model.visit(&mut collect);
        let values = self.strategy.sync_parameters(collect.values, &owned)?;
        Ok(model.map(&mut AssignParams::<B, _>::new(values.into_iter()).trainable_only()))
    }

    /// Notes that a record was loaded (it may hold state this rank does not own).
    pub(crate) fn mark_loaded(&mut self) {
        self.prune = self.strategy.shards_optimizer();
    }

    /// Drops the state of parameters other ranks own from the optimizer's record.
    fn keep_own_state(&mut self, model: &M, owned: &[bool]) -> Result<(), FabricError> {
        let mut collect = CollectParams::<B>::trainable_only();
        model.visit(&mut collect);
        let keep: BTreeSet<String> = collect
            .ids
            .into_iter()
            .zip(owned)
            .filter(|(_, mine)| **mine)
            .map(|(id, _)| id.serialize())
            .collect();
        let failed = |reason: String| FabricError::Data {
            context: "optimizer state",
            message: reason,
        };
        let bytes =
            encode_record::<B, _>(self.optimizer.to_record(), Settings::Full).map_err(failed)?;
        let kept = retain_record(&bytes, &keep).map_err(failed)?;
        let record =
            decode_record::<B, O::Record>(&kept, Settings::Full, &self.device).map_err(failed)?;
        self.set_record(record);
        self.prune = false;
        Ok(())
    }

    /// Discards `model`'s accumulated gradients without stepping.
    pub fn zero_grad(&mut self, model: &M) {
        drop(lock(&self.state).grads.take::<B, M>(model));
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
