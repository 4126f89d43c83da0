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
use burn::nn::{Linear, LinearConfig};
use burn::optim::AdamConfig;
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use burn_fabric::BackendDevices;
use burn_fabric::prelude::*;
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::digits::{self, CLASSES, Digit, DigitBatcher, PIXELS};
use indicatif::{ProgressBar, ProgressStyle};
use std::error::Error;
use std::process::ExitCode;
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
}

/// 64 → hidden → hidden → 10, ReLU between.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
    l3: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn new(hidden: usize, device: &B::Device) -> Self {
        Self {
            l1: LinearConfig::new(PIXELS, hidden).init(device),
            l2: LinearConfig::new(hidden, hidden).init(device),
            l3: LinearConfig::new(hidden, CLASSES).init(device),
        }
    }

    pub fn forward(&self, images: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = relu(self.l1.forward(images));
        let x = relu(self.l2.forward(x));
        self.l3.forward(x)
    }
}

/// What a run measured.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub test_accuracy: f64,
    pub steps: usize,
    pub mean_step: Duration,
    pub samples_per_second: f64,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args.fabric.builder::<DefaultBackend>().build()?;
    fabric.print(fabric.describe());
    let (train, test) = digits::train_test_split(digits::load()?);
    // Initialise once, before the ranks start, so every world size trains the same model.
    fabric.seed_everything(args.fabric.seed);
    let model = Mlp::new(args.hidden, fabric.device());
    let report = fabric.launch(|fabric| train_rank(fabric, args, &model, &train, &test))?;
    fabric.print(format!(
        "{} steps, mean step {:.2} ms, {:.0} samples/s over all ranks",
        report.steps,
        report.mean_step.as_secs_f64() * 1e3,
        report.samples_per_second
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
    let (mut model, mut optimizer) = fabric.setup(model.clone(), AdamConfig::new().init())?;
    let mut loader = fabric.setup_dataloader(
        DataLoader::new(InMemDataset::new(train.to_vec()), DigitBatcher)
            .batch_size(args.fabric.batch_size)
            .shuffle(true),
    )?;
    let loss_fn = CrossEntropyLossConfig::new().init(&device);

    let epochs = args.fabric.epochs;
    let progress = progress_bar(fabric, (epochs * loader.len()) as u64);
    let mut steps = 0;
    let mut elapsed = Duration::ZERO;
    for epoch in 1..=epochs {
        let start = Instant::now();
        let mut loss_sum = 0.0;
        let mut batches = 0;
        for batch in loader.iter() {
            let logits = fabric.forward(&model, batch.images, |m, x| m.forward(x));
            let loss = loss_fn.forward(logits, batch.labels);
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            fabric.backward(loss, &model)?;
            model = optimizer.step(args.lr, model)?;
            batches += 1;
            progress.inc(1);
        }
        elapsed += start.elapsed();
        steps += batches;
        let loss = fabric.all_reduce_scalar(loss_sum / batches.max(1) as f64, ReduceOp::Mean)?;
        progress.suspend(|| fabric.print(format!("epoch {epoch}/{epochs}  train loss {loss:.4}")));
    }
    progress.finish_and_clear();

    let test_accuracy = evaluate(fabric, &model.valid(), test)?;
    let mean_step = elapsed / steps.max(1) as u32;
    let samples = (steps * args.fabric.batch_size * fabric.world_size()) as f64;
    Ok(Report {
        test_accuracy,
        steps,
        mean_step,
        samples_per_second: samples / elapsed.as_secs_f64().max(1e-9),
    })
}

/// Accuracy over the whole test set: each rank scores every `world_size`-th digit (no padding,
/// so no digit counts twice) and the counts are summed across ranks.
fn evaluate<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    model: &Mlp<B::InnerBackend>,
    test: &[Digit],
) -> Result<f64, FabricError> {
    let mine: Vec<Digit> = test
        .iter()
        .skip(fabric.global_rank())
        .step_by(fabric.world_size())
        .cloned()
        .collect();
    let mut loader = fabric.setup_dataloader(
        DataLoader::<B::InnerBackend, _, _>::new(InMemDataset::new(mine), DigitBatcher)
            .batch_size(512)
            .distributed(false),
    )?;
    let (mut correct, mut total) = (0.0, 0.0);
    for batch in loader.iter() {
        let logits = fabric.forward(model, batch.images, |m, x| m.forward(x));
        let predicted = logits.argmax(1).flatten::<1>(0, 1);
        total += batch.labels.dims()[0] as f64;
        correct += predicted
            .equal(batch.labels)
            .int()
            .sum()
            .into_scalar()
            .elem::<f64>();
    }
    let correct = fabric.all_reduce_scalar(correct, ReduceOp::Sum)?;
    let total = fabric.all_reduce_scalar(total, ReduceOp::Sum)?;
    Ok(correct / total.max(1.0))
}

/// A bar on global rank 0, nothing elsewhere.
fn progress_bar<B: AutodiffBackend + BackendDevices>(
    fabric: &Fabric<B>,
    steps: u64,
) -> ProgressBar {
    if !fabric.is_global_zero() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed_precise} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}
