//! The training loops the benchmarks compare: the same MLP, data, batch and optimizer written in
//! plain Burn and with burn-fabric on one or more ranks. Each function returns the time of every
//! step after a warm-up (rank 0's under DDP), never the set-up.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_fabric::{BackendDevices, Fabric, FabricError};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub mod report;
use std::time::{Duration, Instant};

/// The backend of every benchmark.
pub type B = burn::backend::Autodiff<burn::backend::Flex>;

/// Steps run before timing starts.
pub const WARMUP_STEPS: u64 = 3;

/// An MLP `input → hidden → (hidden →)×depth → classes`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    layers: Vec<Linear<B>>,
}

/// Whether [`fabric_run`] turns on DDP's averaging and FSDP's reduce-scatters overlapped with
/// backward (`FabricBuilder::overlap_backward`; off by default, as in the product).
pub static OVERLAP: AtomicBool = AtomicBool::new(false);

/// Whether [`fabric_run`] lets FSDP units start the next unit's gathers before they run
/// (`FabricBuilder::forward_prefetch`; off by default, as in the product).
pub static PREFETCH: AtomicBool = AtomicBool::new(false);

/// Runs `f` with `switch` ([`OVERLAP`], [`PREFETCH`]) set to `on`, then sets it back.
pub fn switched<T>(switch: &AtomicBool, on: bool, f: impl FnOnce() -> T) -> T {
    let before = switch.swap(on, Ordering::Relaxed);
    let result = f();
    switch.store(before, Ordering::Relaxed);
    result
}

/// Layer sizes of a benchmark model.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Input features.
    pub input: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Classes.
    pub classes: usize,
    /// Hidden-to-hidden layers.
    pub depth: usize,
}

/// The image classifier example's model (UCI digits).
pub const DIGITS_MLP: Shape = Shape {
    input: 64,
    hidden: 256,
    classes: 10,
    depth: 1,
};
/// The model of the Lightning Fabric comparison (784-1024-1024-10).
pub const MNIST_MLP: Shape = Shape {
    input: 784,
    hidden: 1024,
    classes: 10,
    depth: 1,
};
/// A deeper MLP (256-512×9-10, 2.2M parameters in 20 tensors): many similar tensors, as in
/// the models ZeRO is for, so a partition by whole tensors can be even.
pub const DEEP_MLP: Shape = Shape {
    input: 256,
    hidden: 512,
    classes: 10,
    depth: 8,
};

impl<B: Backend> Mlp<B> {
    /// A fresh model of the given shape.
    pub fn new(shape: Shape, device: &B::Device) -> Self {
        let mut layers = vec![LinearConfig::new(shape.input, shape.hidden).init(device)];
        for _ in 0..shape.depth {
            layers.push(LinearConfig::new(shape.hidden, shape.hidden).init(device));
        }
        layers.push(LinearConfig::new(shape.hidden, shape.classes).init(device));
        Self { layers }
    }

    /// Logits. Each layer is a `burn_fabric::unit` (FSDP gathers it as a whole; DDP with
    /// [`OVERLAP`] averages its gradients while backward goes on).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let layer = |layer: &Linear<B>, x| burn_fabric::unit(layer, x, |l, x| l.forward(x));
        let (last, hidden) = self.layers.split_last().expect("at least one layer");
        let x = hidden.iter().fold(x, |x, l| relu(layer(l, x)));
        layer(last, x)
    }
}

/// A synthetic batch of `rows` inputs and labels (deterministic).
pub fn batch<BK: Backend>(
    shape: Shape,
    rows: usize,
    device: &BK::Device,
) -> (Tensor<BK, 2>, Tensor<BK, 1, Int>) {
    let x: Vec<f32> = (0..rows * shape.input)
        .map(|i| ((i as f32) * 0.618).sin())
        .collect();
    let y: Vec<i64> = (0..rows).map(|i| (i % shape.classes) as i64).collect();
    (
        Tensor::from_data(TensorData::new(x, [rows, shape.input]), device),
        Tensor::from_data(TensorData::new(y, [rows]), device),
    )
}

/// Total time of the steps.
pub fn total(steps: &[Duration]) -> Duration {
    steps.iter().sum()
}

/// Median time of one step: robust to the page-fault and scheduler spikes of a shared machine.
pub fn median(steps: &[Duration]) -> Duration {
    let mut sorted = steps.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// Plain Burn: `loss.backward()`, `GradientsParams::from_grads`, `optimizer.step`.
pub fn plain_burn(shape: Shape, rows: usize, steps: u64) -> Vec<Duration> {
    let device = Default::default();
    let mut model = Mlp::<B>::new(shape, &device);
    let mut optimizer = AdamConfig::new().init::<B, Mlp<B>>();
    let (x, y) = batch::<B>(shape, rows, &device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut times = Vec::with_capacity(steps as usize);
    for step in 0..WARMUP_STEPS + steps {
        let start = Instant::now();
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-3, model, grads);
        if step >= WARMUP_STEPS {
            times.push(start.elapsed());
        }
    }
    times
}

/// The same loop through burn-fabric on `devices` ranks, each with `rows / devices` rows.
pub fn fabric(
    shape: Shape,
    rows: usize,
    devices: usize,
    steps: u64,
) -> Result<Vec<Duration>, FabricError> {
    Ok(fabric_with(shape, rows, devices, steps, "auto")?.times)
}

/// What [`fabric_with`] measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Rank 0's step times after the warm-up.
    pub times: Vec<Duration>,
    /// Each rank's optimizer state at the end, in bytes (its record serialised with Burn's
    /// full-precision MessagePack recorder), by global rank.
    pub state_bytes: Vec<usize>,
}

/// [`fabric`] under the given strategy (`auto`, `ddp`, `zero1`, `zero2`), also measuring each
/// rank's optimizer-state size.
pub fn fabric_with(
    shape: Shape,
    rows: usize,
    devices: usize,
    steps: u64,
    strategy: &str,
) -> Result<Measured, FabricError> {
    fabric_configured(shape, rows, devices, steps, strategy, "32-true")
}

/// [`fabric_with`] under a precision (`32-true`, `bf16-mixed`, ...).
pub fn fabric_configured(
    shape: Shape,
    rows: usize,
    devices: usize,
    steps: u64,
    strategy: &str,
    precision: &str,
) -> Result<Measured, FabricError> {
    let run = Run {
        shape,
        rows,
        devices,
        steps,
        strategy,
        precision,
    };
    fabric_run::<B, _, _>(&run, || AdamConfig::new().init())
}

/// What one measured Fabric run does.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// The model.
    pub shape: Shape,
    /// Rows of the global batch (split over the ranks).
    pub rows: usize,
    /// Ranks.
    pub devices: usize,
    /// Timed steps (after [`WARMUP_STEPS`]).
    pub steps: u64,
    /// `auto`, `ddp`, `zero1`, `zero2`.
    pub strategy: &'a str,
    /// `32-true`, `bf16-mixed`, ...
    pub precision: &'a str,
}

/// The training loop through burn-fabric on backend `BK` with the optimizer `optimizer()`
/// makes on each rank.
pub fn fabric_run<BK, O, F>(run: &Run<'_>, optimizer: F) -> Result<Measured, FabricError>
where
    BK: AutodiffBackend + BackendDevices,
    O: Optimizer<Mlp<BK>, BK>,
    F: Fn() -> O + Sync,
{
    let mut fabric = Fabric::<BK>::builder()
        .devices(run.devices)
        .strategy(run.strategy)
        .precision(run.precision)
        .overlap_backward(OVERLAP.load(Ordering::Relaxed))
        .forward_prefetch(PREFETCH.load(Ordering::Relaxed))
        .build()?;
    let state_bytes = Mutex::new(vec![0; run.devices]);
    let times = fabric.launch(|fabric| {
        let device = fabric.device().clone();
        let (mut model, mut optimizer) =
            fabric.setup(Mlp::<BK>::new(run.shape, &device), optimizer())?;
        let (x, y) = batch::<BK>(run.shape, run.rows / fabric.world_size(), &device);
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let mut times = Vec::with_capacity(run.steps as usize);
        for step in 0..WARMUP_STEPS + run.steps {
            let start = Instant::now();
            let logits = fabric.forward(&model, x.clone(), |m, x| m.forward(x));
            let loss = loss_fn.forward(logits, y.clone());
            fabric.backward(loss, &model)?;
            model = optimizer.step(1e-3, model)?;
            if step >= WARMUP_STEPS {
                times.push(start.elapsed());
            }
        }
        let bytes = Recorder::<BK>::record(
            &NamedMpkBytesRecorder::<FullPrecisionSettings>::default(),
            optimizer.to_record(),
            (),
        )
        .map_or(0, |b| b.len());
        if let Ok(mut sizes) = state_bytes.lock() {
            sizes[fabric.global_rank()] = bytes;
        }
        Ok::<_, FabricError>(times)
    })?;
    let state_bytes = state_bytes.into_inner().unwrap_or_default();
    Ok(Measured { times, state_bytes })
}

/// Runs every one of `runs` once per round, rotating which goes first so that drift in the
/// machine's speed hits all alike; returns each round's results in `runs`' order.
pub fn rotate_rounds<const N: usize>(rounds: usize, runs: [&dyn Fn() -> f64; N]) -> Vec<[f64; N]> {
    (0..rounds)
        .map(|round| {
            let mut results = [0.0; N];
            for k in 0..N {
                let i = (round + k) % N;
                results[i] = runs[i]();
            }
            results
        })
        .collect()
}

/// Step time of each of `strategies[1..]` ÷ DDP's (`strategies[0]`) at 2 ranks on `shape`,
/// measured side by side ([`rotate_rounds`]); one row each in `section`, with `goal`. Prints
/// them as a table too.
pub fn step_time_ratios<const N: usize>(
    section: &str,
    label: &str,
    shape: Shape,
    strategies: [&'static str; N],
    (steps, rounds): (u64, usize),
    goal: Option<report::Goal>,
) -> Vec<report::Row> {
    const GLOBAL_BATCH: usize = 64;
    let runs = strategies.map(|strategy| {
        move || {
            let measured = fabric_with(shape, GLOBAL_BATCH, 2, steps, strategy).expect(strategy);
            median(&measured.times).as_secs_f64()
        }
    });
    let results = rotate_rounds(rounds, runs.each_ref().map(|r| r as &dyn Fn() -> f64));
    let note = format!(
        "2 thread ranks, Adam, global batch {GLOBAL_BATCH}, median of {steps} steps × {rounds} rounds"
    );
    let rows: Vec<report::Row> = (1..N)
        .map(|i| {
            let ratios: Vec<f64> = results.iter().map(|t| t[i] / t[0]).collect();
            let name = format!("{label}: {} ÷ DDP step time", strategies[i]);
            report::Row::from_rounds(section, &name, &ratios, goal, note.clone())
        })
        .collect();
    println!("\n{label}: step time at 2 ranks ÷ DDP's, {note}");
    report::print_table(&rows);
    rows
}
