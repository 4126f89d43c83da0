//! Build your own trainer: the reusable trainer of `fabric_examples::trainer` (written only
//! with Fabric's public API) training a burn-train model — the digits classifier's own
//! `TrainStep` and `InferenceStep`, unchanged — with gradient accumulation, a cosine learning
//! rate, callbacks, checkpoints with resume, early stopping, loggers and a progress bar.
//!
//! ```sh
//! cargo run --example trainer -- --devices 2 --epochs 10 --accumulate 2 --patience 3
//! ```
//!
//! Validation runs on every rank's share of the held-out digits without the sampler's padding,
//! so its metrics count each digit once at any world size. Prints one line per epoch, then
//! `validation accuracy: 9x.xx%`.

use burn::data::dataset::InMemDataset;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use burn_fabric::fabric_core::callback::{Callback, ValidationEnd};
use burn_fabric::prelude::*;
use burn_fabric::{BackendDevices, FusedAdamConfig};
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::digits::{self, CastDigitBatcher};
use fabric_examples::mlp::Mlp;
use fabric_examples::trainer::{EarlyStopping, Fitted, Trainer};
use std::error::Error;

/// Train the digits classifier's burn-train steps with a trainer built from Fabric.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Peak learning rate of the cosine schedule (Adam)
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    /// Width of the two hidden layers
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Micro-batches per optimizer step
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Stop after this many epochs without a better validation loss
    #[arg(long)]
    pub patience: Option<usize>,
    /// The least decrease of the validation loss that counts as better
    #[arg(long, default_value_t = 1e-4)]
    pub min_delta: f64,
}

/// What a run reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Validation accuracy (%) after the last epoch run.
    pub val_accuracy: f64,
    /// Validation loss after the last epoch run.
    pub val_loss: f64,
    /// Validation samples counted over all ranks in the last epoch.
    pub val_samples: usize,
    /// Epochs this run completed.
    pub epochs_run: usize,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// The trained weights, flattened in visit order (for comparing runs).
    pub weights: Vec<f32>,
}

fabric_examples::example_main!(Args, Report);

/// Counts validation passes on each rank, as a user's own callback would.
struct Epochs(usize);

impl Callback for Epochs {
    fn on_validation_end(&mut self, _event: &ValidationEnd) {
        self.0 += 1;
    }
}

/// Trains on backend `B`.
pub fn run_on<B: AutodiffBackend + BackendDevices>(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args
        .fabric
        .builder::<B>("trainer")
        .callbacks(|| vec![Box::new(Epochs(0)) as Box<dyn Callback>])
        .build()?;
    fabric.print(fabric.describe());
    let (train, valid) = digits::train_test_split(digits::load()?);
    fabric.seed_everything(args.fabric.seed);
    let model = Mlp::new(args.hidden, fabric.device()).fork(fabric.device());
    let trainer = Trainer {
        epochs: args.fabric.epochs as u64,
        accumulate: args.accumulate,
        checkpoint_dir: args.fabric.checkpoint_dir.clone(),
        checkpoint_every: args.fabric.checkpoint_every,
        resume: args.fabric.resume,
        early_stopping: args
            .patience
            .map(|patience| EarlyStopping::new(patience, args.min_delta)),
    };
    let report = fabric.launch(|fabric| {
        let (model, mut optimizer) = fabric.setup(model.clone(), FusedAdamConfig::new().init())?;
        // The model's own steps see the batches as they come: in the compute dtype.
        let batcher = CastDigitBatcher(fabric.compute_dtype());
        let mut train_loader = fabric.setup_dataloader(
            DataLoader::new(InMemDataset::new(train.clone()), batcher)
                .batch_size(args.fabric.batch_size)
                .shuffle(true),
        )?;
        let mut valid_loader = fabric.setup_dataloader(
            DataLoader::<B::InnerBackend, _, _>::new(InMemDataset::new(valid.clone()), batcher)
                .batch_size(256)
                .even_batches(false),
        )?;
        // Accumulation windows restart every epoch.
        let steps = train_loader.len().div_ceil(args.accumulate.max(1)) * args.fabric.epochs;
        let mut scheduler = CosineAnnealingLrSchedulerConfig::new(args.lr, steps.max(1))
            .init()
            .map_err(|reason| FabricError::InvalidArgument {
                name: "lr",
                value: args.lr.to_string(),
                reason,
            })?;
        let Fitted {
            model,
            history,
            stopped_early,
            ..
        } = trainer.fit(
            fabric,
            model,
            &mut optimizer,
            &mut scheduler,
            &mut train_loader,
            &mut valid_loader,
        )?;
        let last = history.last().cloned();
        let mut collect = burn_fabric::fabric_strategies::CollectParams::<B>::default();
        model.visit(&mut collect);
        let weights = collect
            .values
            .into_iter()
            .flat_map(|t| {
                t.into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap_or_default()
            })
            .collect();
        Ok::<_, FabricError>(Report {
            val_accuracy: last.as_ref().map_or(f64::NAN, |m| m.val_accuracy),
            val_loss: last.as_ref().map_or(f64::NAN, |m| m.val_loss),
            val_samples: last.as_ref().map_or(0, |m| m.val_samples),
            epochs_run: history.len(),
            stopped_early,
            steps_per_epoch: train_loader.len().div_ceil(args.accumulate.max(1)) as u64,
            weights,
        })
    })?;
    fabric.print(format!("validation accuracy: {:.2}%", report.val_accuracy));
    Ok(report)
}
