//! Image classifier: an MLP on the UCI handwritten digits, trained with burn-fabric.
//!
//! ```text
//! cargo run --release -p fabric-examples --example image_classifier -- --devices 2
//! ```
//!
//! The loop is a plain Burn loop with five Fabric lines: `setup` (model and optimizer),
//! `setup_dataloader`, `forward` (casts for the precision, e.g. `--precision bf16-mixed`),
//! `backward` instead of `loss.backward()`, and `optimizer.step(lr, model)` without passing
//! gradients.

use burn::data::dataset::InMemDataset;
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::Optimizer;
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use burn_fabric::prelude::*;
use burn_fabric::{
    BackendDevices, Checkpoint, FusedAdamConfig, Restore, Throughput, export_safetensors,
    step_checkpoint,
};
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::digits::{self, Digit, DigitBatcher};
use fabric_examples::mlp::{self, Mlp};
use fabric_examples::progress;
use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

/// Train an MLP on the UCI digits with burn-fabric.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Adam learning rate
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Width of the two hidden layers
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Also write the trained weights here as safetensors (PyTorch layout)
    #[arg(long)]
    pub export_safetensors: Option<std::path::PathBuf>,
}

/// What a run measured.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub test_accuracy: f64,
    /// Optimizer steps this run made (fewer after --resume).
    pub steps: usize,
    pub mean_step: Duration,
    /// Throughput over all ranks.
    pub samples_per_second: f64,
    /// Throughput of global rank 0.
    pub rank_zero_samples_per_second: f64,
    /// Mean training loss of the last epoch, over all ranks.
    pub final_loss: f64,
}

fabric_examples::example_main!(Args, Report);

/// Trains on backend `B`.
pub fn run_on<B: AutodiffBackend + BackendDevices>(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args.fabric.builder::<B>("image_classifier").build()?;
    fabric.print(fabric.describe());
    let (train, test) = digits::train_test_split(digits::load()?);
    // Initialise once, before the ranks start, so every world size trains the same model.
    // Burn draws parameters lazily, on first use: `fork` draws them now, on this thread.
    fabric.seed_everything(args.fabric.seed);
    let model = Mlp::new(args.hidden, fabric.device()).fork(fabric.device());
    let report = fabric.launch(|fabric| train_rank(fabric, args, &model, &train, &test))?;
    fabric.print(format!(
        "{} steps, mean step {:.2} ms, {:.0} samples/s over all ranks ({:.0} on rank 0)",
        report.steps,
        report.mean_step.as_secs_f64() * 1e3,
        report.samples_per_second,
        report.rank_zero_samples_per_second,
    ));
    fabric.print(format!("test accuracy: {:.3}", report.test_accuracy));
    Ok(report)
}

fn train_rank<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    model: &Mlp<B>,
    train: &[Digit],
    test: &[Digit],
) -> Result<Report, FabricError> {
    let device = fabric.device().clone();
    // `setup` forks the model onto this rank's device: ranks never share autodiff state.
    // Burn's Adam, one pass per parameter on CPU backends (records interchangeable with Adam's).
    let optimizer = FusedAdamConfig::new().init();
    let (mut model, mut optimizer) = fabric.setup(model.clone(), optimizer)?;
    let mut loader = fabric.setup_dataloader(
        DataLoader::new(InMemDataset::new(train.to_vec()), DigitBatcher)
            .batch_size(args.fabric.batch_size)
            .shuffle(true),
    )?;
    let loss_fn = CrossEntropyLossConfig::new().init(&device);

    // Where to start: fresh, or the newest complete checkpoint with --resume or on a restart.
    let (mut epoch, mut batch_in_epoch, mut global_step) = (0u64, 0usize, 0u64);
    let dir = args.fabric.checkpoint_dir.clone();
    let resume_from = dir
        .as_deref()
        .and_then(|dir| fabric.checkpoint_to_resume(dir, args.fabric.resume));
    if let Some(path) = resume_from {
        fabric.load(
            &path,
            Restore::new()
                .module("model", &mut model)
                .optimizer("optimizer", &mut optimizer)
                .value("epoch", &mut epoch)
                .value("batch", &mut batch_in_epoch)
                .value("global_step", &mut global_step),
        )?;
        fabric.print(format!("resumed from epoch {epoch} step {global_step}"));
    }

    let epochs = args.fabric.epochs as u64;
    let per_epoch = loader.len();
    let total = epochs * per_epoch as u64;
    let progress = progress::bar(fabric, total.saturating_sub(global_step), "steps");
    let mut throughput = Throughput::new(20, fabric.world_size());
    let samples_per_step = args.fabric.batch_size as u64;
    let (mut steps, mut elapsed, mut final_loss) = (0usize, Duration::ZERO, f64::NAN);
    let started = Instant::now();
    while epoch < epochs {
        loader.set_epoch(epoch);
        let epoch_start = Instant::now();
        let (mut loss_sum, mut batches) = (0.0, 0usize);
        for (index, batch) in loader.iter().enumerate().skip(batch_in_epoch) {
            let logits = fabric.forward(&model, batch.images, |m, x| m.forward(x));
            let loss = loss_fn.forward(logits, batch.labels);
            let loss_value = loss.clone().into_scalar().elem::<f64>();
            fabric.backward(loss, &model)?;
            model = optimizer.step(args.lr, model)?;
            global_step += 1;
            (loss_sum, batches, steps) = (loss_sum + loss_value, batches + 1, steps + 1);
            progress.inc(1);
            throughput.update(
                started.elapsed().as_secs_f64(),
                steps as u64,
                steps as u64 * samples_per_step,
            )?;
            fabric.log("train/loss", loss_value, global_step)?;
            if global_step.is_multiple_of(20) {
                let rates = throughput.compute();
                fabric.log_dict(rates.iter().map(|(k, v)| (k.as_str(), *v)), global_step)?;
            }
            if let (Some(dir), Some(every)) = (&dir, args.fabric.checkpoint_every)
                && global_step.is_multiple_of(every)
            {
                save(
                    fabric,
                    dir,
                    &model,
                    &optimizer,
                    epoch,
                    index + 1,
                    global_step,
                )?;
            }
        }
        elapsed += epoch_start.elapsed();
        batch_in_epoch = 0;
        epoch += 1;
        let loss = fabric.all_reduce_scalar(loss_sum / batches.max(1) as f64, ReduceOp::Mean)?;
        final_loss = loss;
        fabric.log("train/epoch_loss", loss, global_step)?;
        progress.suspend(|| fabric.print(format!("epoch {epoch}/{epochs}  train loss {loss:.4}")));
        if let Some(dir) = &dir {
            save(fabric, dir, &model, &optimizer, epoch, 0, global_step)?;
        }
    }
    progress.finish_and_clear();

    let test_accuracy = mlp::accuracy(fabric, &model.valid(), test)?;
    fabric.log("test/accuracy", test_accuracy, global_step)?;
    if let Some(path) = &args.export_safetensors {
        // Whole parameters (gathered from every rank's shards under FSDP); rank 0 writes them.
        let whole = fabric.gathered(&model)?;
        if fabric.is_global_zero() {
            export_safetensors(&whole, path)?;
        }
    }
    let mine = (steps as u64 * samples_per_step) as f64 / elapsed.as_secs_f64().max(1e-9);
    Ok(Report {
        test_accuracy,
        steps,
        mean_step: elapsed / steps.max(1) as u32,
        samples_per_second: fabric.all_reduce_scalar(mine, ReduceOp::Sum)?,
        rank_zero_samples_per_second: mine,
        final_loss,
    })
}

/// Saves what resuming needs: where the loop is, the model and the optimizer.
fn save<B: AutodiffBackend + BackendDevices, O: Optimizer<Mlp<B>, B>>(
    fabric: &Fabric<B>,
    dir: &Path,
    model: &Mlp<B>,
    optimizer: &FabricOptimizer<B, Mlp<B>, O>,
    epoch: u64,
    batch: usize,
    global_step: u64,
) -> Result<(), FabricError> {
    fabric.save(
        step_checkpoint(dir, global_step),
        Checkpoint::new()
            .module("model", model)
            .optimizer("optimizer", optimizer)
            .value("epoch", &epoch)
            .value("batch", &batch)
            .value("global_step", &global_step),
    )
}
