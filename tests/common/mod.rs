//! A small model, deterministic data and a training loop shared by the integration tests.
#![allow(dead_code)]

use burn::data::dataloader::batcher::Batcher;
use burn::module::{AutodiffModule, Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::Optimizer;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_fabric::fabric_strategies::CollectParams;
use burn_fabric::{Fabric, FabricError, FabricOptimizer};

pub mod tower;

pub type B = burn::backend::Autodiff<burn::backend::Flex>;

pub const D_IN: usize = 8;
pub const D_HIDDEN: usize = 16;
pub const D_OUT: usize = 3;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub l1: Linear<B>,
    pub l2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l2
            .forward(burn::tensor::activation::relu(self.l1.forward(x)))
    }

    /// Same values on every call and every rank.
    pub fn deterministic(device: &B::Device) -> Self {
        Self {
            l1: linear(D_IN, D_HIDDEN, 0.0, device),
            l2: linear(D_HIDDEN, D_OUT, 2.0, device),
        }
    }

    /// Randomly initialised (differs between ranks).
    pub fn random(device: &B::Device) -> Self {
        Self {
            l1: LinearConfig::new(D_IN, D_HIDDEN).init(device),
            l2: LinearConfig::new(D_HIDDEN, D_OUT).init(device),
        }
    }
}

/// A `din → dout` linear layer with the same values on every call and every rank (`salt`
/// shifts them).
pub fn linear<B: Backend>(din: usize, dout: usize, salt: f32, device: &B::Device) -> Linear<B> {
    let values = |n: usize, salt: f32| -> Vec<f32> {
        (0..n)
            .map(|i| 0.3 * ((i as f32) * 0.731 + salt).sin())
            .collect()
    };
    Linear {
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(values(din * dout, salt), [din, dout]),
            device,
        )),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(values(dout, salt + 1.0), [dout]),
            device,
        ))),
    }
}

/// Row `i` of the inputs and targets.
pub fn sample(i: usize) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..D_IN)
        .map(|j| ((i * 31 + j * 7) as f32 * 0.137).sin())
        .collect();
    let y: Vec<f32> = (0..D_OUT)
        .map(|k| ((i * 13 + k * 5) as f32 * 0.291).cos())
        .collect();
    (x, y)
}

/// Rows `start..start + n` as tensors.
pub fn batch<BK: Backend>(
    start: usize,
    n: usize,
    device: &BK::Device,
) -> (Tensor<BK, 2>, Tensor<BK, 2>) {
    let (xs, ys): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (start..start + n).map(sample).unzip();
    (
        Tensor::from_data(TensorData::new(xs.concat(), [n, D_IN]), device),
        Tensor::from_data(TensorData::new(ys.concat(), [n, D_OUT]), device),
    )
}

/// Every parameter's values in module-visit order.
pub fn params<M: burn::module::AutodiffModule<B>>(model: &M) -> Vec<Vec<f32>> {
    let mut collect = CollectParams::<B>::default();
    model.visit(&mut collect);
    collect
        .values
        .into_iter()
        .map(|t| t.into_data().to_vec::<f32>().unwrap())
        .collect()
}

/// Trains `steps` steps on global batches of `batch` rows split over `devices` ranks, each rank
/// splitting its share into `micro` micro-batches accumulated under `no_backward_sync`. Rank 0
/// starts from the deterministic model, the others from random ones. Returns rank 0's
/// parameters after checking that every rank holds the same.
pub fn train<O, F>(
    devices: usize,
    micro: usize,
    steps: usize,
    batch_rows: usize,
    lr: f64,
    make_optimizer: F,
) -> Result<Vec<Vec<f32>>, FabricError>
where
    O: Optimizer<Mlp<B>, B>,
    F: Fn() -> O + Sync,
{
    let fabric = Fabric::<B>::builder()
        .devices(devices)
        .env(burn_fabric::EnvVars::default())
        .build()?;
    train_on(fabric, micro, steps, batch_rows, lr, make_optimizer)
}

/// How [`fit`] trains: `steps` optimizer steps on global batches of `batch_rows` rows (from
/// row 0), each rank's share split into `micro` micro-batches, at learning rate `lr`.
pub struct Schedule {
    pub steps: usize,
    pub batch_rows: usize,
    pub micro: usize,
    pub lr: f64,
}

/// Trains this rank's `model` as `schedule` says: the mean squared error of `forward` on
/// [`batch`]'s rows, micro-batches accumulated under `no_backward_sync`.
pub fn fit<M, O>(
    fabric: &mut Fabric<B>,
    mut model: M,
    optimizer: &mut FabricOptimizer<B, M, O>,
    forward: impl Fn(&M, Tensor<B, 2>) -> Tensor<B, 2>,
    schedule: Schedule,
) -> Result<M, FabricError>
where
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let device = *fabric.device();
    let Schedule {
        steps,
        batch_rows,
        micro,
        lr,
    } = schedule;
    let per_rank = batch_rows / fabric.world_size();
    let per_micro = per_rank / micro;
    for step in 0..steps {
        for m in 0..micro {
            let start = step * batch_rows + fabric.global_rank() * per_rank + m * per_micro;
            let (x, y) = batch::<B>(start, per_micro, &device);
            let out = fabric.forward(&model, x, |m, x| forward(m, x));
            let loss = (out - y).powi_scalar(2).mean().div_scalar(micro as f64);
            let accumulating = m + 1 < micro;
            fabric.no_backward_sync(accumulating, |f| f.backward(loss, &model))?;
        }
        model = optimizer.step(lr, model)?;
    }
    Ok(model)
}

/// [`train`] on a given Fabric (for example one configured by `fabric run`).
pub fn train_on<O, F>(
    mut fabric: Fabric<B>,
    micro: usize,
    steps: usize,
    batch_rows: usize,
    lr: f64,
    make_optimizer: F,
) -> Result<Vec<Vec<f32>>, FabricError>
where
    O: Optimizer<Mlp<B>, B>,
    F: Fn() -> O + Sync,
{
    fabric.launch(|fabric| -> Result<Vec<Vec<f32>>, FabricError> {
        let device = *fabric.device();
        let model = if fabric.global_rank() == 0 {
            Mlp::deterministic(&device)
        } else {
            Mlp::random(&device)
        };
        let (model, mut optimizer) = fabric.setup(model, make_optimizer())?;
        let schedule = Schedule {
            steps,
            batch_rows,
            micro,
            lr,
        };
        let model = fit(fabric, model, &mut optimizer, Mlp::forward, schedule)?;
        // Whole parameters (gathered from the shards under FSDP).
        let mine = params(&fabric.gathered(&model)?);
        let flat: Tensor<burn::backend::Flex, 1> = Tensor::from_data(
            TensorData::new(mine.concat(), [mine.concat().len()]),
            &device,
        );
        let all: Tensor<burn::backend::Flex, 2> = fabric.all_gather(flat)?;
        let all = all.into_data().to_vec::<f32>().unwrap();
        let n = all.len() / fabric.world_size();
        for rank in 1..fabric.world_size() {
            if all[rank * n..(rank + 1) * n] != all[..n] {
                return Err(FabricError::InvalidArgument {
                    name: "parameters",
                    value: format!("rank {rank}"),
                    reason: "differ from rank 0's after training".into(),
                });
            }
        }
        Ok(mine)
    })
}

/// Largest `|a - b| / (atol + rtol * |b|)` over all parameters; at most 1 means within tolerance.
pub fn worst_ratio(a: &[Vec<f32>], b: &[Vec<f32>], rtol: f32, atol: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / (atol + rtol * y.abs()))
        .fold(0.0, f32::max)
}

/// Batches of item indices: the identity batcher, for checking which items a rank sees.
#[derive(Debug, Clone, Copy)]
pub struct Indices;

impl<BK: Backend> Batcher<BK, i64, Tensor<BK, 1, Int>> for Indices {
    fn batch(&self, items: Vec<i64>, device: &BK::Device) -> Tensor<BK, 1, Int> {
        let n = items.len();
        Tensor::from_data(TensorData::new(items, [n]), device)
    }
}
