//! Callbacks: user objects whose hooks the training loop calls through `Fabric::call` (typed
//! hooks) or `Fabric::call_hook` (a named hook with JSON arguments, Lightning's
//! `fabric.call("name", ...)`). Every hook has a no-op default, so a callback implements only
//! what it needs.

use std::collections::BTreeMap;

/// What a training step reports to `on_train_batch_end`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBatchEnd {
    /// The rank calling.
    pub rank: usize,
    /// Epoch (from 0).
    pub epoch: u64,
    /// Batch index in the epoch.
    pub batch: usize,
    /// Optimizer steps so far.
    pub global_step: u64,
    /// The batch's loss.
    pub loss: f64,
}

/// What a validation pass reports to `on_validation_end`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationEnd {
    /// The rank calling.
    pub rank: usize,
    /// Epoch (from 0).
    pub epoch: u64,
    /// Metrics by name.
    pub metrics: BTreeMap<String, f64>,
}

/// A callback. Implement the hooks you need.
pub trait Callback: Send {
    /// After `Fabric::setup_module` (and `setup`) on this rank.
    fn on_after_setup(&mut self) {}

    /// Before each training epoch (epoch from 0).
    fn on_train_epoch_start(&mut self, _epoch: u64) {}

    /// Before each training batch (epoch from 0, batch index in the epoch).
    fn on_train_batch_start(&mut self, _epoch: u64, _batch: usize) {}

    /// After each training batch.
    fn on_train_batch_end(&mut self, _event: &TrainBatchEnd) {}

    /// Before each optimizer step (`global_step`: steps taken so far), after the gradients
    /// are synchronised: the place to inspect or clip them.
    fn on_before_optimizer_step(&mut self, _global_step: u64) {}

    /// After each training epoch.
    fn on_train_epoch_end(&mut self, _epoch: u64) {}

    /// Before a validation pass (Lightning's `on_validation_epoch_start`).
    fn on_validation_epoch_start(&mut self, _epoch: u64) {}

    /// After a validation pass, with its metrics (Lightning's `on_validation_epoch_end`).
    fn on_validation_end(&mut self, _event: &ValidationEnd) {}

    /// Any other hook, by name, with JSON arguments.
    fn on_hook(&mut self, _name: &str, _args: &serde_json::Value) {}
}
