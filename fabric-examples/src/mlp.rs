//! The digits classifier the examples share: 64 → hidden → hidden → 10 with ReLU between, and
//! its accuracy over a test set split across the ranks.

use crate::digits::{CLASSES, Digit, DigitBatch, DigitBatcher, PIXELS};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};
use burn_fabric::BackendDevices;
use burn_fabric::prelude::*;

/// 64 → hidden → hidden → 10, ReLU between.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
    l3: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// A freshly initialised classifier with two hidden layers of `hidden` units.
    pub fn new(hidden: usize, device: &B::Device) -> Self {
        Self {
            l1: LinearConfig::new(PIXELS, hidden).init(device),
            l2: LinearConfig::new(hidden, hidden).init(device),
            l3: LinearConfig::new(hidden, CLASSES).init(device),
        }
    }

    /// Logits `[batch, 10]` of images `[batch, 64]`.
    pub fn forward(&self, images: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = relu(self.l1.forward(images));
        let x = relu(self.l2.forward(x));
        self.l3.forward(x)
    }
}

/// Accuracy over the whole of `test`: each rank scores its share (see [`correct_of_share`]) and
/// the counts are summed across ranks.
pub fn accuracy<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    model: &Mlp<B::InnerBackend>,
    test: &[Digit],
) -> Result<f64, FabricError> {
    let [correct, total] = correct_of_share(fabric, model, test)?;
    let correct = fabric.all_reduce_scalar(correct, ReduceOp::Sum)?;
    let total = fabric.all_reduce_scalar(total, ReduceOp::Sum)?;
    Ok(correct / total.max(1.0))
}

/// `[correct, scored]` over this rank's share of `test`: every `world_size`-th digit from the
/// global rank on (no padding, so across ranks no digit counts twice).
pub fn correct_of_share<B: AutodiffBackend + BackendDevices>(
    fabric: &mut Fabric<B>,
    model: &Mlp<B::InnerBackend>,
    test: &[Digit],
) -> Result<[f64; 2], FabricError> {
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
        total += batch.labels.dims()[0] as f64;
        correct += count_correct(logits, batch.labels);
    }
    Ok([correct, total])
}

/// How many rows of `logits` `[n, classes]` have their largest value at the `labels` `[n]`.
pub fn count_correct<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> f64 {
    let predicted = logits.argmax(1).flatten::<1>(0, 1);
    predicted
        .equal(labels)
        .int()
        .sum()
        .into_scalar()
        .elem::<f64>()
}

/// The classifier as a burn-train model, written as any Burn user writes it (what the `trainer`
/// example runs through `Fabric::train_step`): cross-entropy, `backward`, `TrainOutput`.
impl<B: AutodiffBackend> TrainStep for Mlp<B> {
    type Input = DigitBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: DigitBatch<B>) -> TrainOutput<ClassificationOutput<B>> {
        let item = self.classify(batch);
        TrainOutput::new(self, item.loss.clone().mean().backward(), item)
    }
}

/// Validation as burn-train runs it: the same forward and loss, no gradients.
impl<B: Backend> InferenceStep for Mlp<B> {
    type Input = DigitBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: DigitBatch<B>) -> ClassificationOutput<B> {
        self.classify(batch)
    }
}

impl<B: Backend> Mlp<B> {
    /// Logits, each sample's cross-entropy (so that a loss metric counts samples, not
    /// batches) and targets of a batch.
    fn classify(&self, batch: DigitBatch<B>) -> ClassificationOutput<B> {
        let logits = self.forward(batch.images);
        let [n, _] = logits.dims();
        let picked = log_softmax(logits.clone(), 1).gather(1, batch.labels.clone().reshape([n, 1]));
        let losses = picked.reshape([n]).neg();
        ClassificationOutput::new(losses, logits, batch.labels)
    }
}
