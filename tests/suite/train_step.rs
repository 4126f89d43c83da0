//! burn-train's `TrainStep`/`InferenceStep` models and numeric metrics under Fabric: a model's
//! own step trained through `train_step` equals the same model trained through `backward`, and
//! one rank on the full batch; metrics synchronised over ranks equal one rank's over the whole
//! set when the set does not divide by the world size.

use crate::common::{self, B, D_IN, D_OUT, Mlp, batch, params, worst_ratio};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::AutodiffModule;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, Optimizer, SgdConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::metric::{
    AccuracyInput, AccuracyMetric, LossInput, LossMetric, Metric, NumericEntry,
};
use burn::train::{InferenceStep, RegressionOutput, TrainOutput, TrainStep};
use burn_fabric::{DataLoader, EnvVars, Fabric, FabricError, metric_metadata};

type Inner = <B as AutodiffBackend>::InnerBackend;

/// The tests' MLP as a burn-train model: its step is a Burn user's, unchanged (forward, MSE,
/// `backward`, `TrainOutput::new`).
impl<BK: AutodiffBackend> TrainStep for Mlp<BK> {
    type Input = (Tensor<BK, 2>, Tensor<BK, 2>);
    type Output = RegressionOutput<BK>;

    fn step(&self, (x, y): Self::Input) -> TrainOutput<RegressionOutput<BK>> {
        let output = self.forward(x);
        let loss = (output.clone() - y.clone()).powi_scalar(2).mean();
        let grads = loss.backward();
        TrainOutput::new(self, grads, RegressionOutput::new(loss, output, y))
    }
}

/// Validation: per-sample squared errors and class scores against a target class.
pub struct Validation<BK: Backend> {
    losses: Tensor<BK, 1>,
    scores: Tensor<BK, 2>,
    classes: Tensor<BK, 1, Int>,
}

impl<BK: Backend> burn::train::ItemLazy for Validation<BK> {
    type ItemSync = Self;

    fn sync(self) -> Self {
        self
    }
}

impl<BK: Backend> InferenceStep for Mlp<BK> {
    type Input = (Tensor<BK, 2>, Tensor<BK, 1, Int>);
    type Output = Validation<BK>;

    fn step(&self, (x, classes): Self::Input) -> Validation<BK> {
        let scores = self.forward(x);
        let losses = scores.clone().powi_scalar(2).mean_dim(1).squeeze_dim(1);
        Validation {
            losses,
            scores,
            classes,
        }
    }
}

fn fabric(devices: usize, strategy: &str, precision: &str) -> Fabric<B> {
    Fabric::<B>::builder()
        .devices(devices)
        .strategy(strategy)
        .precision(precision)
        .env(EnvVars::default())
        .build()
        .unwrap()
}

const STEPS: usize = 8;
const ROWS: usize = 16;

/// Trains `STEPS` steps of `ROWS` rows split over the ranks through `train_step`; rank 0's
/// parameters after checking every rank agrees (as `common::train_on` does for `backward`).
fn train_through_steps<O, F>(mut fabric: Fabric<B>, lr: f64, make_optimizer: F) -> Vec<Vec<f32>>
where
    O: Optimizer<Mlp<B>, B>,
    F: Fn() -> O + Sync,
{
    fabric
        .launch(|fabric| -> Result<Vec<Vec<f32>>, FabricError> {
            let device = *fabric.device();
            let model = match fabric.global_rank() {
                0 => Mlp::deterministic(&device),
                _ => Mlp::random(&device),
            };
            let (mut model, mut optimizer) = fabric.setup(model, make_optimizer())?;
            let per_rank = ROWS / fabric.world_size();
            for step in 0..STEPS {
                let (x, y) = batch::<B>(
                    step * ROWS + fabric.global_rank() * per_rank,
                    per_rank,
                    &device,
                );
                let item = fabric.train_step(&model, (fabric.cast_input(x), y))?;
                assert_eq!(item.output.dims(), [per_rank, D_OUT]);
                model = optimizer.step(lr, model)?;
            }
            let mine = params(&model);
            let all: Vec<Vec<Vec<f32>>> = (0..fabric.world_size())
                .map(|r| fabric.broadcast_object(&mine, r))
                .collect::<Result<_, _>>()?;
            assert!(all.iter().all(|p| *p == mine), "ranks disagree");
            Ok(mine)
        })
        .unwrap()
}

fn sgd() -> impl Optimizer<Mlp<B>, B> {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new()))
        .init()
}

fn adam() -> impl Optimizer<Mlp<B>, B> {
    AdamConfig::new().init()
}

/// Trains with `make_optimizer` through `train_step` and through `backward` on `devices` ranks,
/// and on 1 rank on the full batch: the first two must agree bit for bit, and with the third
/// within the DDP tests' tolerance.
fn compare<O, F>(strategy: &str, devices: usize, name: &str, lr: f64, make_optimizer: F)
where
    O: Optimizer<Mlp<B>, B>,
    F: Fn() -> O + Sync,
{
    let case = format!("{strategy} x {devices}, {name}");
    let steps = train_through_steps(fabric(devices, strategy, "32-true"), lr, &make_optimizer);
    let backward = common::train_on(
        fabric(devices, strategy, "32-true"),
        1,
        STEPS,
        ROWS,
        lr,
        &make_optimizer,
    )
    .unwrap();
    assert_eq!(steps, backward, "{case}: train_step != backward");
    let single = common::train(1, 1, STEPS, ROWS, lr, &make_optimizer).unwrap();
    let ratio = worst_ratio(&steps, &single, 1e-5, 1e-6);
    assert!(ratio <= 1.0, "{case}: {ratio} x tolerance against 1 rank");
}

#[test]
fn a_train_step_model_trains_as_backward_does_and_as_one_rank_on_the_full_batch() {
    for strategy in ["ddp", "zero2"] {
        for devices in [2, 4] {
            compare(strategy, devices, "sgd", 0.1, sgd);
            compare(strategy, devices, "adam", 0.01, adam);
        }
    }
}

#[test]
fn precisions_a_train_step_can_and_cannot_use() {
    // 16-mixed needs its loss scaled before backward, which the step calls itself: refused.
    let mut f16 = fabric(2, "ddp", "16-mixed");
    let err = f16
        .launch(|fabric| {
            let device = *fabric.device();
            let (model, _optimizer) = fabric.setup(Mlp::<B>::deterministic(&device), adam())?;
            let (x, y) = batch::<B>(0, 4, &device);
            fabric
                .train_step(&model, (fabric.cast_input(x), y))
                .map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("16-mixed") && err.contains("bf16-mixed"),
        "{err}"
    );

    // bf16-mixed: the step runs on the bf16 view, the f32 master weights learn.
    let mut bf16 = fabric(2, "ddp", "bf16-mixed");
    let (before, after) = bf16
        .launch(|fabric| {
            let device = *fabric.device();
            let (mut model, mut optimizer) =
                fabric.setup(Mlp::<B>::deterministic(&device), adam())?;
            let loss = |fabric: &mut Fabric<B>, model: &Mlp<B>| -> Result<f32, FabricError> {
                let (x, y) = batch::<B>(0, 8, &device);
                let item =
                    fabric.train_step(model, (fabric.cast_input(x), fabric.cast_input(y)))?;
                assert_eq!(item.output.dtype(), burn::tensor::DType::BF16);
                Ok(item.loss.cast(burn::tensor::FloatDType::F32).into_scalar())
            };
            let before = loss(fabric, &model)?;
            model = optimizer.step(0.01, model)?;
            for _ in 0..20 {
                loss(fabric, &model)?;
                model = optimizer.step(0.01, model)?;
            }
            assert!(params(&model).iter().flatten().all(|v| v.is_finite()));
            Ok::<_, FabricError>((before, loss(fabric, &model)?))
        })
        .unwrap();
    assert!(
        after < before * 0.8,
        "bf16-mixed did not learn: {before} -> {after}"
    );
}

/// Items of the validation set: inputs of row `i` and a class.
#[derive(Clone, Copy)]
struct Rows;

impl<BK: Backend> Batcher<BK, usize, (Tensor<BK, 2>, Tensor<BK, 1, Int>)> for Rows {
    fn batch(&self, items: Vec<usize>, device: &BK::Device) -> (Tensor<BK, 2>, Tensor<BK, 1, Int>) {
        let n = items.len();
        let x: Vec<f32> = items.iter().flat_map(|i| common::sample(*i).0).collect();
        let classes: Vec<i64> = items.iter().map(|i| (*i % D_OUT) as i64).collect();
        (
            Tensor::from_data(TensorData::new(x, [n, D_IN]), device),
            Tensor::from_data(TensorData::new(classes, [n]), device),
        )
    }
}

/// Validates on `LEN` rows over `devices` ranks; returns the synchronised (loss, accuracy).
fn validate(devices: usize, even_batches: bool) -> (NumericEntry, NumericEntry) {
    const LEN: usize = 37;
    let mut fabric = fabric(devices, "ddp", "32-true");
    fabric
        .launch(|fabric| {
            let device = *fabric.device();
            let model = fabric
                .setup_module(Mlp::<B>::deterministic(&device))?
                .valid();
            let mut loader = fabric.setup_dataloader(
                DataLoader::<Inner, _, _>::new(InMemDataset::new((0..LEN).collect()), Rows)
                    .batch_size(5)
                    .even_batches(even_batches),
            )?;
            let (mut loss, mut accuracy) =
                (LossMetric::<Inner>::new(), AccuracyMetric::<Inner>::new());
            for batch in loader.iter() {
                let out = fabric.inference_step(&model, batch);
                loss.update(&LossInput::new(out.losses), &metric_metadata());
                accuracy.update(
                    &AccuracyInput::new(out.scores, out.classes),
                    &metric_metadata(),
                );
            }
            Ok::<_, FabricError>((fabric.sync_metric(&loss)?, fabric.sync_metric(&accuracy)?))
        })
        .unwrap()
}

fn parts(entry: &NumericEntry) -> (f64, usize) {
    match entry {
        NumericEntry::Aggregated {
            aggregated_value,
            count,
        } => (*aggregated_value, *count),
        NumericEntry::Value(v) => panic!("not aggregated: {v}"),
    }
}

#[test]
fn synced_metrics_count_each_validation_sample_once() {
    let (loss_1, accuracy_1) = validate(1, false);
    assert_eq!(parts(&loss_1).1, 37);
    for devices in [2, 3, 4] {
        let (loss, accuracy) = validate(devices, false);
        for (name, synced, single) in [
            ("loss", &loss, &loss_1),
            ("accuracy", &accuracy, &accuracy_1),
        ] {
            let ((value, count), (want, want_count)) = (parts(synced), parts(single));
            assert_eq!(
                count, want_count,
                "{name} on {devices} ranks: samples counted"
            );
            // Each batch's mean is an f32 reduction: batches cut differently round differently.
            assert!(
                (value - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name} on {devices} ranks: {value} vs {want}"
            );
        }
        // With the sampler's padding, the samples repeated to even out the ranks are counted
        // again (the skew `even_batches(false)` removes).
        let (padded, _) = validate(devices, true);
        assert_eq!(parts(&padded).1, 37_usize.div_ceil(devices) * devices);
    }
}

/// Trains with 2 micro-batches per step (the first under `no_backward_sync`) and global-norm
/// clipping, through `train_step` or through `backward` with the same (undivided) losses.
fn accumulate_and_clip(strategy: &str, through_steps: bool, max_norm: f64) -> Vec<Vec<f32>> {
    let mut fabric = fabric(2, strategy, "32-true");
    fabric
        .launch(|fabric| -> Result<Vec<Vec<f32>>, FabricError> {
            let device = *fabric.device();
            let (mut model, mut optimizer) =
                fabric.setup(Mlp::<B>::deterministic(&device), adam())?;
            for step in 0..STEPS {
                for micro in 0..2 {
                    let start = (step * 2 + micro) * ROWS + fabric.global_rank() * 4;
                    let (x, y) = batch::<B>(start, 4, &device);
                    fabric.no_backward_sync(micro == 0, |f| {
                        if through_steps {
                            f.train_step(&model, (x, y)).map(|_| ())
                        } else {
                            let loss = (model.forward(x) - y).powi_scalar(2).mean();
                            f.backward(loss, &model)
                        }
                    })?;
                }
                fabric.clip_gradients_norm(&model, max_norm, 2.0)?;
                model = optimizer.step(0.01, model)?;
            }
            Ok(params(&model))
        })
        .unwrap()
}

#[test]
fn train_step_honours_no_backward_sync_and_clipping() {
    for strategy in ["ddp", "zero2"] {
        let steps = accumulate_and_clip(strategy, true, 0.05);
        assert_eq!(
            steps,
            accumulate_and_clip(strategy, false, 0.05),
            "{strategy}"
        );
        // The clip bites: with a norm bound nothing reaches, the weights differ.
        assert_ne!(
            steps,
            accumulate_and_clip(strategy, true, 1e9),
            "{strategy}"
        );
    }
}
