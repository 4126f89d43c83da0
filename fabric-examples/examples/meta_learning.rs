//! MAML-style few-shot classification on the UCI handwritten digits (first-order MAML).
//!
//! ```text
//! cargo run --release -p fabric-examples --example meta_learning -- --devices 2 --shots 5
//! ```
//!
//! A task is `--ways` digit classes drawn at random, their labels shuffled (so no class keeps a
//! label and the network must adapt to each task), with `--shots` support and `--queries` query
//! images per class. The inner loop clones the model and takes a few plain SGD steps on the
//! support set; the query loss of the adapted clone is back-propagated through Fabric, which
//! stores its gradients under the original parameters (the clone keeps their ids) and averages
//! them over every rank's tasks; the meta-optimizer then steps the original model. Meta-training
//! draws its images from the training split, meta-testing from the held-out test split.

use burn::data::dataloader::batcher::Batcher;
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use burn_fabric::BackendDevices;
use burn_fabric::prelude::*;
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::digits::{self, CLASSES, Digit, DigitBatch, DigitBatcher, PIXELS};
use fabric_examples::mlp::count_correct;
use fabric_examples::noise::rank_rng;
use fabric_examples::progress;
use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::error::Error;

/// First-order MAML on digit classes with burn-fabric.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Classes per task (N-way)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..=10))]
    pub ways: u64,
    /// Support images per class (K-shot)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub shots: u64,
    /// Query images per class
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub queries: u64,
    /// Tasks per meta-batch, over all ranks (each rank takes its share)
    #[arg(long, default_value_t = 16)]
    pub meta_batch: usize,
    /// Meta-steps per epoch (`--epochs` sets the number of epochs)
    #[arg(long, default_value_t = 20)]
    pub steps_per_epoch: usize,
    /// SGD steps of the inner loop
    #[arg(long, default_value_t = 5)]
    pub adaptation_steps: usize,
    /// SGD learning rate of the inner loop
    #[arg(long, default_value_t = 0.5)]
    pub inner_lr: f64,
    /// Adam learning rate of the meta-update
    #[arg(long, default_value_t = 3e-3)]
    pub meta_lr: f64,
    /// Meta-test tasks, over all ranks
    #[arg(long, default_value_t = 200)]
    pub test_tasks: usize,
}

/// 64 → 64 → 64 → ways.
#[derive(Module, Debug)]
pub struct Learner<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
    l3: Linear<B>,
}

impl<B: Backend> Learner<B> {
    pub fn new(ways: usize, device: &B::Device) -> Self {
        Self {
            l1: LinearConfig::new(PIXELS, 64).init(device),
            l2: LinearConfig::new(64, 64).init(device),
            l3: LinearConfig::new(64, ways).init(device),
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
    /// Meta-test query accuracy after adaptation, from the initial (random) model.
    pub accuracy_before: f64,
    /// The same after meta-training.
    pub accuracy_after: f64,
    /// Mean meta-training query loss of the last epoch, over all ranks.
    pub final_query_loss: f64,
}

fabric_examples::example_main!(Args, Report);

/// Meta-trains on backend `B`.
pub fn run_on<B: AutodiffBackend + BackendDevices>(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args.fabric.builder::<B>("meta_learning").build()?;
    fabric.print(fabric.describe());
    let (train, test) = digits::train_test_split(digits::load()?);
    let (train, test) = (Pool::new(train), Pool::new(test));
    let needed = (args.shots + args.queries) as usize;
    if let Some(short) = [&train, &test].into_iter().find(|p| p.smallest() < needed) {
        return Err(format!(
            "--shots {} + --queries {} needs {needed} images per class; the smallest class has {}",
            args.shots,
            args.queries,
            short.smallest()
        )
        .into());
    }
    fabric.seed_everything(args.fabric.seed);
    let model = Learner::new(args.ways as usize, fabric.device()).fork(fabric.device());
    let report = fabric.launch(|fabric| meta_train(fabric, args, &model, &train, &test))?;
    fabric.print(format!(
        "{}-way {}-shot meta-test accuracy: {:.3} before meta-training, {:.3} after (chance {:.3})",
        args.ways,
        args.shots,
        report.accuracy_before,
        report.accuracy_after,
        1.0 / args.ways as f64
    ));
    Ok(report)
}

/// Digits grouped by class.
#[derive(Debug, Clone)]
pub struct Pool {
    by_class: Vec<Vec<Digit>>,
}

impl Pool {
    /// Groups `digits` by class.
    pub fn new(digits: Vec<Digit>) -> Self {
        let mut by_class = vec![Vec::new(); CLASSES];
        for digit in digits {
            by_class[digit.label as usize].push(digit);
        }
        Self { by_class }
    }

    fn smallest(&self) -> usize {
        self.by_class.iter().map(Vec::len).min().unwrap_or(0)
    }

    /// A task: `ways` random classes relabelled `0..ways` in random order, `shots` support and
    /// `queries` query digits of each, all distinct.
    pub fn task(&self, rng: &mut StdRng, ways: usize, shots: usize, queries: usize) -> Task {
        let mut classes: Vec<usize> = (0..CLASSES).collect();
        classes.shuffle(rng);
        let (mut support, mut query) = (Vec::new(), Vec::new());
        for (label, &class) in classes.iter().take(ways).enumerate() {
            let pool = &self.by_class[class];
            let mut picked = Vec::with_capacity(shots + queries);
            while picked.len() < shots + queries {
                let index = rng.random_range(0..pool.len());
                if !picked.contains(&index) {
                    picked.push(index);
                }
            }
            let relabel = |&i: &usize| Digit {
                pixels: pool[i].pixels,
                label: label as u8,
            };
            support.extend(picked[..shots].iter().map(relabel));
            query.extend(picked[shots..].iter().map(relabel));
        }
        Task { support, query }
    }
}

/// One few-shot task.
#[derive(Debug, Clone)]
pub struct Task {
    pub support: Vec<Digit>,
    pub query: Vec<Digit>,
}

/// A task's digits as one batch (the images and their task labels).
fn batch<B: Backend>(digits: &[Digit], device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let DigitBatch { images, labels } = DigitBatcher.batch(digits.to_vec(), device);
    (images, labels)
}

/// The inner loop: `adaptation_steps` plain SGD steps on the support set, on a clone. The clone
/// keeps the parameter ids of `model`, so gradients taken on it are gradients "of" `model`
/// (first-order MAML).
fn adapt<B: AutodiffBackend>(
    model: &Learner<B>,
    support: &[Digit],
    args: &Args,
    device: &B::Device,
) -> Learner<B> {
    let (images, labels) = batch::<B>(support, device);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut inner = SgdConfig::new().init::<B, Learner<B>>();
    let mut adapted = model.clone();
    for _ in 0..args.adaptation_steps {
        let loss = loss_fn.forward(adapted.forward(images.clone()), labels.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &adapted);
        adapted = inner.step(args.inner_lr, adapted, grads);
    }
    adapted
}

fn meta_train<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    model: &Learner<B>,
    train: &Pool,
    test: &Pool,
) -> Result<Report, FabricError> {
    let device = fabric.device().clone();
    let (mut model, mut optimizer) = fabric.setup(model.clone(), AdamConfig::new().init())?;
    let mut rng = rank_rng(args.fabric.seed, fabric.global_rank());
    let (ways, shots, queries) = (
        args.ways as usize,
        args.shots as usize,
        args.queries as usize,
    );
    // This rank's share of each meta-batch (at least one task).
    let world = fabric.world_size();
    let mine =
        args.meta_batch / world + usize::from(fabric.global_rank() < args.meta_batch % world);
    let mine = mine.max(1);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);

    let accuracy_before = meta_test(fabric, args, &model, test)?;
    let epochs = args.fabric.epochs;
    let progress = progress::bar(fabric, (epochs * args.steps_per_epoch) as u64, "meta-steps");
    let mut final_query_loss = f64::NAN;
    for epoch in 1..=epochs {
        let (mut loss_sum, mut correct_sum) = (0.0, 0.0);
        for _ in 0..args.steps_per_epoch {
            for t in 0..mine {
                let task = train.task(&mut rng, ways, shots, queries);
                let adapted = adapt(&model, &task.support, args, &device);
                let (images, labels) = batch::<B>(&task.query, &device);
                let logits = fabric.forward(&adapted, images, |m, x| m.forward(x));
                correct_sum +=
                    count_correct(logits.clone(), labels.clone()) / task.query.len() as f64;
                // The mean over this rank's tasks; Fabric's average over ranks makes it the
                // mean over the whole meta-batch.
                let loss = loss_fn.forward(logits, labels).div_scalar(mine as f64);
                loss_sum += loss.clone().into_scalar().elem::<f64>();
                // Synchronise once per meta-step, on the last task.
                let last = t + 1 == mine;
                fabric.no_backward_sync(!last, |f| f.backward(loss, &adapted))?;
            }
            model = optimizer.step(args.meta_lr, model)?;
            progress.inc(1);
        }
        let steps = args.steps_per_epoch.max(1) as f64;
        let loss = fabric.all_reduce_scalar(loss_sum / steps, ReduceOp::Mean)?;
        let accuracy =
            fabric.all_reduce_scalar(correct_sum / (steps * mine as f64), ReduceOp::Mean)?;
        final_query_loss = loss;
        fabric.log("train/query_loss", loss, epoch as u64)?;
        fabric.log("train/query_accuracy", accuracy, epoch as u64)?;
        progress.suspend(|| {
            fabric.print(format!(
                "epoch {epoch}/{epochs}  meta-train query loss {loss:.3}  accuracy {accuracy:.3}"
            ))
        });
    }
    progress.finish_and_clear();
    let accuracy_after = meta_test(fabric, args, &model, test)?;
    fabric.log("test/accuracy", accuracy_after, epochs as u64)?;
    Ok(Report {
        accuracy_before,
        accuracy_after,
        final_query_loss,
    })
}

/// Query accuracy after adaptation on `--test-tasks` tasks from the test split, split across
/// the ranks (each its own tasks) and averaged over all of them.
fn meta_test<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    model: &Learner<B>,
    test: &Pool,
) -> Result<f64, FabricError> {
    let device = fabric.device().clone();
    // The same tasks for the before and after measurements.
    let mut rng = rank_rng(args.fabric.seed.wrapping_add(1), fabric.global_rank());
    let (ways, shots, queries) = (
        args.ways as usize,
        args.shots as usize,
        args.queries as usize,
    );
    let (mut correct_count, mut total) = (0.0, 0.0);
    for _ in (fabric.global_rank()..args.test_tasks).step_by(fabric.world_size()) {
        let task = test.task(&mut rng, ways, shots, queries);
        let adapted = adapt(model, &task.support, args, &device).valid();
        let (images, labels) = batch::<B::InnerBackend>(&task.query, &device);
        correct_count += count_correct(adapted.forward(images), labels);
        total += task.query.len() as f64;
    }
    let correct_count = fabric.all_reduce_scalar(correct_count, ReduceOp::Sum)?;
    let total = fabric.all_reduce_scalar(total, ReduceOp::Sum)?;
    Ok(correct_count / total.max(1.0))
}
