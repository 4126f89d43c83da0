//! K-fold cross-validation on the UCI handwritten digits: one fresh MLP per fold, trained on the
//! other folds (sharded across the ranks by Fabric) and scored on its own; the fold metrics are
//! summed across ranks with `fabric.all_reduce`.
//!
//! ```text
//! cargo run --release -p fabric-examples --example kfold_cv -- --devices 2
//! ```

use burn::data::dataset::InMemDataset;
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::AdamConfig;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burn_fabric::BackendDevices;
use burn_fabric::prelude::*;
use clap::Parser;
use fabric_examples::args::FabricArgs;
use fabric_examples::digits::{self, Digit, DigitBatcher};
use fabric_examples::mlp::{self, Mlp};
use fabric_examples::progress;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::error::Error;

/// K-fold cross-validation of an MLP on the UCI digits with burn-fabric.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Number of folds (at least 2)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..))]
    pub folds: u64,
    /// Adam learning rate
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Width of the two hidden layers
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Validation accuracy of each fold's model on its held-out fold.
    pub fold_accuracy: Vec<f64>,
    /// Mean of the fold accuracies.
    pub mean_accuracy: f64,
    /// Their standard deviation.
    pub std_accuracy: f64,
}

fabric_examples::example_main!(Args, Report);

/// Runs the cross-validation on backend `B`.
pub fn run_on<B: AutodiffBackend + BackendDevices>(args: &Args) -> Result<Report, Box<dyn Error>> {
    let mut fabric = args.fabric.builder::<B>("kfold_cv").build()?;
    fabric.print(fabric.describe());
    let all = digits::load()?;
    let folds = split(all.len(), args.folds as usize, args.fabric.seed);
    fabric.seed_everything(args.fabric.seed);
    // One initial model per fold, drawn before the ranks start (Burn draws lazily: `fork`
    // draws now), so every world size cross-validates the same models.
    let models: Vec<Mlp<B>> = (0..folds.len())
        .map(|_| Mlp::new(args.hidden, fabric.device()).fork(fabric.device()))
        .collect();
    let report = fabric.launch(|fabric| cross_validate(fabric, args, &models, &all, &folds))?;
    fabric.print(format!(
        "{}-fold accuracy: {:.3} ± {:.3}",
        folds.len(),
        report.mean_accuracy,
        report.std_accuracy
    ));
    Ok(report)
}

/// Indices `0..n` shuffled by `seed` and dealt into `k` folds of sizes differing by at most one.
pub fn split(n: usize, k: usize, seed: u64) -> Vec<Vec<usize>> {
    let k = k.max(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut folds = vec![Vec::with_capacity(n / k + 1); k];
    for (i, index) in order.into_iter().enumerate() {
        folds[i % k].push(index);
    }
    folds
}

fn cross_validate<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    models: &[Mlp<B>],
    all: &[Digit],
    folds: &[Vec<usize>],
) -> Result<Report, FabricError> {
    let epochs = args.fabric.epochs;
    let progress = progress::bar(fabric, (folds.len() * epochs) as u64, "fold epochs");
    let mut local_counts = Vec::with_capacity(2 * folds.len());
    for (fold, (held_out, model)) in folds.iter().zip(models).enumerate() {
        let train: Vec<Digit> = folds
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != fold)
            .flat_map(|(_, indices)| indices.iter().map(|&i| all[i].clone()))
            .collect();
        let validation: Vec<Digit> = held_out.iter().map(|&i| all[i].clone()).collect();
        let model = train_fold(fabric, args, model, train, &progress)?;
        // This rank's counts only; all folds are combined in one all-reduce below.
        let counts = mlp::correct_of_share(fabric, &model.valid(), &validation)?;
        progress.suspend(|| {
            fabric.print(format!(
                "fold {}/{}: trained on {} digits, validating on {}",
                fold + 1,
                folds.len(),
                all.len() - validation.len(),
                validation.len()
            ))
        });
        local_counts.extend(counts);
    }
    progress.finish_and_clear();

    // `[folds, 2]` of (correct, scored) per rank, summed over the ranks: the fold metrics.
    let k = folds.len();
    let counts = Tensor::<B::InnerBackend, 2>::from_data(
        TensorData::new(local_counts, [k, 2]),
        fabric.device(),
    );
    let counts = fabric
        .all_reduce(counts, ReduceOp::Sum)?
        .into_data()
        .convert::<f64>();
    let counts = counts.as_slice::<f64>().map_err(|e| FabricError::Data {
        context: "kfold_cv",
        message: format!("fold counts: {e:?}"),
    })?;
    let fold_accuracy: Vec<f64> = counts.chunks(2).map(|c| c[0] / c[1].max(1.0)).collect();
    for (fold, accuracy) in fold_accuracy.iter().enumerate() {
        fabric.log("val/accuracy", *accuracy, fold as u64)?;
        fabric.print(format!(
            "fold {}/{k}: validation accuracy {accuracy:.3}",
            fold + 1
        ));
    }
    let mean_accuracy = fold_accuracy.iter().sum::<f64>() / k as f64;
    let variance = fold_accuracy
        .iter()
        .map(|a| (a - mean_accuracy).powi(2))
        .sum::<f64>()
        / k as f64;
    Ok(Report {
        fold_accuracy,
        mean_accuracy,
        std_accuracy: variance.sqrt(),
    })
}

/// Trains a copy of `model` on `train` for `--epochs` epochs.
fn train_fold<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    args: &Args,
    model: &Mlp<B>,
    train: Vec<Digit>,
    progress: &indicatif::ProgressBar,
) -> Result<Mlp<B>, FabricError> {
    let device = fabric.device().clone();
    let (mut model, mut optimizer) = fabric.setup(model.clone(), AdamConfig::new().init())?;
    let mut loader = fabric.setup_dataloader(
        DataLoader::new(InMemDataset::new(train), DigitBatcher)
            .batch_size(args.fabric.batch_size)
            .shuffle(true),
    )?;
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    for _ in 0..args.fabric.epochs {
        for batch in loader.iter() {
            let logits = fabric.forward(&model, batch.images, |m, x| m.forward(x));
            let loss = loss_fn.forward(logits, batch.labels);
            fabric.backward(loss, &model)?;
            model = optimizer.step(args.lr, model)?;
        }
        progress.inc(1);
    }
    Ok(model)
}
