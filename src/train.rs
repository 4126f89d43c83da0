//! burn-train's models and metrics under Fabric (the `train` feature): a model that implements
//! `TrainStep` trains through [`Fabric::train_step`] as it is, one that implements
//! `InferenceStep` validates through [`Fabric::inference_step`], and a burn-train numeric
//! metric is combined over ranks by [`Fabric::sync_metric`] from its sums and counts.
//!
//! Precision: a `TrainStep` runs its own forward and backward pass, so Fabric cannot scale its
//! loss; `16-mixed` (which needs the loss scaled before backward) is refused. Every other
//! precision applies: under `bf16-mixed` the step runs on the half-precision view of the f32
//! parameters (bf16 keeps f32's range, so no loss scale is needed) and its gradients reach the
//! f32 master weights; under `*-true` on the converted parameters. Burn does not promote
//! dtypes, so outside `32-true` the step's float inputs must already be in the compute dtype
//! (cast them in the batcher with [`Fabric::cast_input`]).

use crate::{Fabric, FabricError, ReduceOp};
use burn::data::dataloader::Progress;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{MetricMetadata, Numeric, NumericEntry};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use fabric_core::backend::BackendDevices;
use fabric_precision::PrecisionMode;
use fabric_strategies::{Params, flatten_gradients};

/// The metadata a burn-train metric's `update` takes, for a loop of your own rather than
/// burn-train's learner (the numeric metrics ignore it: no progress, iteration or learning rate).
pub fn metric_metadata() -> MetricMetadata {
    let progress = Progress {
        items_processed: 0,
        items_total: 0,
    };
    MetricMetadata {
        progress: progress.clone(),
        global_progress: progress,
        iteration: None,
        lr: None,
    }
}

impl<B: AutodiffBackend + BackendDevices> Fabric<B> {
    /// Runs `model`'s burn-train [`TrainStep::step`] on `input` and takes the gradients it
    /// returns as [`backward`](Self::backward) takes a loss's: stored, added to any not yet
    /// consumed by a step, and outside [`no_backward_sync`](Self::no_backward_sync) averaged
    /// across ranks (reduced to their owners under the sharded strategies). Returns the step's
    /// item for metrics. Step with the optimizer [`setup`](Self::setup) returned, as after
    /// `backward`; clipping applies between the two. `TrainStep::optimize` is not called.
    ///
    /// Under `16-mixed` this is [`FabricError::Unsupported`]: the step calls `backward` itself,
    /// so its loss cannot be scaled (see the module docs for the precisions that apply).
    pub fn train_step<M>(&mut self, model: &M, input: M::Input) -> Result<M::Output, FabricError>
    where
        M: AutodiffModule<B> + TrainStep,
    {
        let rank = self.rank("train_step")?;
        let strategy = rank.strategy.as_ref();
        let precision = strategy.precision();
        if strategy.gather().is_some() {
            return Err(FabricError::Unsupported {
                what: format!("train_step under strategy `{}`", strategy.name()),
                reason: "a burn-train TrainStep runs its own forward and reads the gradients of whole parameters, while FSDP ranks hold shards; compute the loss through fabric.forward and call fabric.backward".into(),
            });
        }
        if precision.mode() == PrecisionMode::Mixed && precision.scaler_state().is_some() {
            return Err(FabricError::Unsupported {
                what: format!("train_step under precision `{}`", precision.precision()),
                reason: "a burn-train TrainStep calls backward itself, so Fabric cannot scale its loss and f16 gradients would underflow; use bf16-mixed or a *-true precision, or compute the loss yourself and call fabric.backward".into(),
            });
        }
        // Under *-mixed the step runs on a half-precision copy whose parameters are leaves with
        // the master parameters' ids: its gradients, cast to f32, are the master gradients.
        let TrainOutput { mut grads, item } = match precision.leaf_view(model) {
            Some(view) => view.step(input),
            None => model.step(input),
        };
        let flat = flatten_gradients::<B, M>(model, &mut grads);
        strategy.accumulate_gradients(&Params(model), flat, rank.backward_sync)?;
        Ok(item)
    }

    /// Runs `model`'s burn-train [`InferenceStep::step`] on `input` in the precision context
    /// (the half-precision view under `*-mixed`). Call it on every rank with its share of the
    /// validation data (a loader set up with `even_batches(false)` counts each sample once),
    /// then combine metrics with [`sync_metric`](Self::sync_metric).
    pub fn inference_step<BT, M>(&self, model: &M, input: M::Input) -> M::Output
    where
        BT: burn::tensor::backend::Backend,
        M: Module<BT> + InferenceStep,
    {
        self.autocast(model, |m| m.step(input))
    }

    /// `metric`'s value over every rank's updates, exactly as if one rank had seen all the
    /// data: each rank's running mean and count are combined as a sum over all ranks divided by
    /// the total count (not an average of averages). Every rank calls it and gets the same
    /// result, an aggregated entry whose `count` is the total number of samples. A metric whose
    /// running value is not an aggregate of counted samples cannot be combined exactly and is
    /// [`FabricError::Unsupported`].
    pub fn sync_metric(&self, metric: &impl Numeric) -> Result<NumericEntry, FabricError> {
        let (sum, count) = match metric.running_value() {
            NumericEntry::Aggregated { count: 0, .. } => (0.0, 0.0),
            NumericEntry::Aggregated {
                aggregated_value,
                count,
            } => (aggregated_value * count as f64, count as f64),
            NumericEntry::Value(value) => {
                return Err(FabricError::Unsupported {
                    what: format!("sync_metric of a metric whose running value is {value}"),
                    reason: "it is not a mean over counted samples (NumericEntry::Aggregated), so no exact combination over ranks exists; all_reduce its own statistics instead".into(),
                });
            }
        };
        let count = self.all_reduce_scalar(count, ReduceOp::Sum)?;
        let sum = self.all_reduce_scalar(sum, ReduceOp::Sum)?;
        Ok(NumericEntry::Aggregated {
            aggregated_value: if count > 0.0 { sum / count } else { f64::NAN },
            count: count as usize,
        })
    }
}
