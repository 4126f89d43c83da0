//! A small trainer written only with Fabric's public API: the Burn twin of Lightning's
//! `build_your_own_trainer`. It drives a burn-train model (its `TrainStep` and, on the inner
//! module, its `InferenceStep`) through train and validation loops with gradient accumulation,
//! a learning-rate scheduler, the callback hooks Lightning users know, checkpoints of everything
//! (model, optimizer, scheduler, loop position, early-stopping state) with resume mid-epoch,
//! early stopping on the validation loss, metrics logged through Fabric's loggers, and a
//! progress bar on rank 0. Copy it and change what you need.
//!
//! Gradient accumulation adds the micro-batches' gradients (as Lightning's trainer does): a
//! `TrainStep` computes its own mean loss per micro-batch, so scale the learning rate if you
//! want the mean over the window.

use crate::progress;
use burn::lr_scheduler::LrScheduler;
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{
    AccuracyInput, AccuracyMetric, Adaptor, LossInput, LossMetric, Metric, Numeric, NumericEntry,
};
use burn::train::{InferenceStep, TrainStep};
use burn_fabric::fabric_core::callback::{TrainBatchEnd, ValidationEnd};
use burn_fabric::{
    BackendDevices, Checkpoint, Fabric, FabricError, FabricOptimizer, RankDataLoader, Restore,
    metric_metadata, newest_checkpoint, step_checkpoint,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Stops training when the validation loss has not improved by more than `min_delta` for
/// `patience` epochs in a row (Lightning's `EarlyStopping(monitor="val_loss", mode="min")`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Epochs without improvement before stopping.
    pub patience: usize,
    /// The least decrease that counts as an improvement.
    pub min_delta: f64,
    best: Option<f64>,
    bad_epochs: usize,
}

impl EarlyStopping {
    /// Stops after `patience` epochs without a decrease of more than `min_delta`.
    pub fn new(patience: usize, min_delta: f64) -> Self {
        Self {
            patience,
            min_delta,
            best: None,
            bad_epochs: 0,
        }
    }

    /// Whether the last update said to stop.
    pub fn stopped(&self) -> bool {
        self.bad_epochs > 0 && self.bad_epochs >= self.patience
    }

    /// Takes the best value and the epochs without improvement from a checkpoint's state,
    /// keeping this one's patience and minimum delta (the run's flags win).
    pub fn restore(&mut self, saved: &EarlyStopping) {
        self.best = saved.best;
        self.bad_epochs = saved.bad_epochs;
    }

    /// Records an epoch's value; returns whether training should stop now: after `patience`
    /// epochs in a row without improvement (at the first one with a patience of 0). A value
    /// that is not finite never improves.
    pub fn update(&mut self, value: f64) -> bool {
        let improved =
            value.is_finite() && self.best.is_none_or(|best| value < best - self.min_delta);
        if improved {
            self.best = Some(value);
            self.bad_epochs = 0;
            return false;
        }
        self.bad_epochs += 1;
        self.bad_epochs >= self.patience
    }
}

/// What the trainer does.
#[derive(Debug, Clone)]
pub struct Trainer {
    /// Passes over the training data.
    pub epochs: u64,
    /// Micro-batches per optimizer step (gradients synchronised on the last one only).
    pub accumulate: usize,
    /// Where checkpoints go (`step-N.ckpt`, at the end of every epoch).
    pub checkpoint_dir: Option<PathBuf>,
    /// Also save every N optimizer steps.
    pub checkpoint_every: Option<u64>,
    /// Continue from the newest complete checkpoint (also done on a `fabric run` restart).
    pub resume: bool,
    /// Stop early on the validation loss.
    pub early_stopping: Option<EarlyStopping>,
}

/// One epoch's metrics, exact over every rank's samples.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochMetrics {
    /// Epoch (from 0).
    pub epoch: u64,
    /// Mean training loss over the epoch's batches (of this run: after a mid-epoch resume,
    /// the batches since).
    pub train_loss: f64,
    /// Validation loss and accuracy (%), each sample counted once.
    pub val_loss: f64,
    /// Validation accuracy in percent.
    pub val_accuracy: f64,
    /// Validation samples counted over all ranks.
    pub val_samples: usize,
}

/// The outcome of [`Trainer::fit`].
#[derive(Debug)]
pub struct Fitted<M> {
    /// The trained model.
    pub model: M,
    /// Metrics of each epoch this run completed.
    pub history: Vec<EpochMetrics>,
    /// Optimizer steps taken in all (including before a resume).
    pub global_step: u64,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
}

/// Where the loop is: what a checkpoint restores besides the model, optimizer and scheduler.
#[derive(Clone)]
struct Position {
    epoch: u64,
    batch: usize,
    global_step: u64,
    early_stopping: Option<EarlyStopping>,
}

fn value(entry: NumericEntry) -> (f64, usize) {
    match entry {
        NumericEntry::Aggregated {
            aggregated_value,
            count,
        } => (aggregated_value, count),
        NumericEntry::Value(value) => (value, 0),
    }
}

impl Trainer {
    /// Trains `model` (set up with `optimizer` by `fabric.setup`) on `train`, validating on
    /// `valid` after every epoch (set it up with `even_batches(false)` so that each sample is
    /// counted once), stepping the learning rate from `scheduler` at every optimizer step.
    pub fn fit<B, M, O, S, TI, VI>(
        &self,
        fabric: &mut Fabric<B>,
        mut model: M,
        optimizer: &mut FabricOptimizer<B, M, O>,
        scheduler: &mut S,
        train: &mut RankDataLoader<B, TI, <M as TrainStep>::Input>,
        valid: &mut RankDataLoader<B::InnerBackend, VI, <M::InnerModule as InferenceStep>::Input>,
    ) -> Result<Fitted<M>, FabricError>
    where
        B: AutodiffBackend + BackendDevices,
        M: AutodiffModule<B> + TrainStep,
        <M as TrainStep>::Output: Adaptor<LossInput<B>>,
        M::InnerModule: InferenceStep,
        <M::InnerModule as InferenceStep>::Output:
            Adaptor<LossInput<B::InnerBackend>> + Adaptor<AccuracyInput<B::InnerBackend>>,
        O: Optimizer<M, B>,
        S: LrScheduler,
    {
        let accumulate = self.accumulate.max(1);
        let mut at = Position {
            epoch: 0,
            batch: 0,
            global_step: 0,
            early_stopping: self.early_stopping.clone(),
        };
        let resume_from = self
            .checkpoint_dir
            .as_deref()
            .and_then(|dir| fabric.checkpoint_to_resume(dir, self.resume));
        if let Some(path) = resume_from {
            let mut early: Option<EarlyStopping> = None;
            fabric.load(
                &path,
                Restore::new()
                    .module("model", &mut model)
                    .optimizer("optimizer", optimizer)
                    .scheduler("scheduler", scheduler)
                    .value("epoch", &mut at.epoch)
                    .value("batch", &mut at.batch)
                    .value("global_step", &mut at.global_step)
                    .value("early_stopping", &mut early),
            )?;
            if let (Some(mine), Some(saved)) = (at.early_stopping.as_mut(), early.as_ref()) {
                mine.restore(saved);
            }
            fabric.print(format!(
                "resumed from epoch {} step {}",
                at.epoch, at.global_step
            ));
        }

        if let Some(dir) = self.checkpoint_dir.as_deref().filter(|_| !self.resume)
            && fabric.restart_count() == 0
            && newest_checkpoint(dir).path.is_some()
        {
            // Lightning warns likewise: a restart of this run could resume from the old ones.
            fabric.print(format!(
                "warning: {} already holds checkpoints; this fresh run will write among them (use --resume to continue, or another directory)",
                dir.display()
            ));
        }
        let per_epoch = train.len();
        let total = self.epochs * per_epoch as u64;
        let done = at.epoch * per_epoch as u64 + at.batch as u64;
        let bar = progress::bar(fabric, total.saturating_sub(done), "batches");
        let mut history = Vec::new();
        // A run that stopped early stays stopped when resumed.
        let mut stopped_early = at
            .early_stopping
            .as_ref()
            .is_some_and(EarlyStopping::stopped);
        while at.epoch < self.epochs && !stopped_early {
            let epoch = at.epoch;
            fabric.call(|c| c.on_train_epoch_start(epoch));
            train.set_epoch(epoch);
            let mut train_loss = LossMetric::<B>::new();
            for (index, batch) in train.iter().enumerate().skip(at.batch) {
                fabric.call(|c| c.on_train_batch_start(epoch, index));
                let last_of_window = (index + 1) % accumulate == 0 || index + 1 == per_epoch;
                let item =
                    fabric.no_backward_sync(!last_of_window, |f| f.train_step(&model, batch))?;
                let loss: LossInput<B> = item.adapt();
                train_loss.update(&loss, &metric_metadata());
                let loss = train_loss.value().current();
                if last_of_window {
                    let step = at.global_step;
                    fabric.call(|c| c.on_before_optimizer_step(step));
                    model = optimizer.step(scheduler.step(), model)?;
                    at.global_step += 1;
                    if let (Some(dir), Some(every)) = (&self.checkpoint_dir, self.checkpoint_every)
                        && at.global_step.is_multiple_of(every)
                    {
                        let mid = Position {
                            batch: index + 1,
                            ..at.clone()
                        };
                        save(fabric, dir, &model, optimizer, scheduler, &mid)?;
                    }
                }
                let event = TrainBatchEnd {
                    rank: fabric.global_rank(),
                    epoch,
                    batch: index,
                    global_step: at.global_step,
                    loss,
                };
                fabric.call(|c| c.on_train_batch_end(&event));
                fabric.log("train/loss", loss, at.global_step)?;
                bar.inc(1);
            }
            let (train_loss, _) = value(fabric.sync_metric(&train_loss)?);
            fabric.call(|c| c.on_train_epoch_end(epoch));

            fabric.call(|c| c.on_validation_epoch_start(epoch));
            let inner = model.valid();
            let mut val_loss = LossMetric::<B::InnerBackend>::new();
            let mut val_accuracy = AccuracyMetric::<B::InnerBackend>::new();
            for batch in valid.iter() {
                let out = fabric.inference_step(&inner, batch);
                val_loss.update(&out.adapt(), &metric_metadata());
                val_accuracy.update(&out.adapt(), &metric_metadata());
            }
            let (val_loss, _) = value(fabric.sync_metric(&val_loss)?);
            let (val_accuracy, val_samples) = value(fabric.sync_metric(&val_accuracy)?);
            let metrics = BTreeMap::from([
                ("train_loss".to_string(), train_loss),
                ("val_loss".to_string(), val_loss),
                ("val_accuracy".to_string(), val_accuracy),
            ]);
            fabric.log_dict(
                metrics.iter().map(|(k, v)| (k.as_str(), *v)),
                at.global_step,
            )?;
            let event = ValidationEnd {
                rank: fabric.global_rank(),
                epoch,
                metrics,
            };
            fabric.call(|c| c.on_validation_end(&event));
            bar.suspend(|| {
                fabric.print(format!(
                    "epoch {}/{}  train loss {train_loss:.4}  val loss {val_loss:.4}  val accuracy {val_accuracy:.2}% ({val_samples} samples)",
                    epoch + 1,
                    self.epochs
                ))
            });
            history.push(EpochMetrics {
                epoch,
                train_loss,
                val_loss,
                val_accuracy,
                val_samples,
            });
            if let Some(early) = at.early_stopping.as_mut() {
                stopped_early = early.update(val_loss);
            }
            at.epoch += 1;
            at.batch = 0;
            if let Some(dir) = &self.checkpoint_dir {
                save(fabric, dir, &model, optimizer, scheduler, &at)?;
            }
            if stopped_early {
                fabric.print(format!(
                    "early stopping after epoch {}: no better validation loss for {} epochs",
                    epoch + 1,
                    self.early_stopping.as_ref().map_or(0, |e| e.patience)
                ));
            }
        }
        bar.finish_and_clear();
        Ok(Fitted {
            model,
            history,
            global_step: at.global_step,
            stopped_early,
        })
    }
}

/// Saves everything resuming needs at `at`.
fn save<B, M, O, S>(
    fabric: &Fabric<B>,
    dir: &Path,
    model: &M,
    optimizer: &FabricOptimizer<B, M, O>,
    scheduler: &S,
    at: &Position,
) -> Result<(), FabricError>
where
    B: AutodiffBackend + BackendDevices,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
    S: LrScheduler,
{
    fabric.save(
        step_checkpoint(dir, at.global_step),
        Checkpoint::new()
            .module("model", model)
            .optimizer("optimizer", optimizer)
            .scheduler::<B, _>("scheduler", scheduler)
            .value("epoch", &at.epoch)
            .value("batch", &at.batch)
            .value("global_step", &at.global_step)
            .value("early_stopping", &at.early_stopping),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_stops_after_patience_epochs_without_improvement() {
        let mut early = EarlyStopping::new(2, 0.01);
        // improves, improves, too little, worse -> stops at the 4th value
        let scripted = [1.0, 0.5, 0.495, 0.6, 0.1];
        let stops: Vec<bool> = scripted.iter().map(|v| early.update(*v)).collect();
        assert_eq!(stops, [false, false, false, true, false]);
        // a NaN never counts as an improvement, not even first
        let mut early = EarlyStopping::new(1, 0.0);
        assert!(early.update(f64::NAN));
        let mut early = EarlyStopping::new(1, 0.0);
        assert!(!early.update(1.0));
        assert!(early.update(f64::NAN));
        // patience 0: stop at the first epoch that does not improve, not before
        let mut early = EarlyStopping::new(0, 0.0);
        assert!(!early.update(1.0));
        assert!(!early.update(0.5));
        assert!(early.update(0.7));
    }
}
