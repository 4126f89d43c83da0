//! FSDP (`fsdp` = full_shard, `fsdp_shard_grad_op`) trains the model one rank trains on the
//! full batch, while each rank holds only its shard of every parameter, gradient and optimizer
//! state.
//!
//! The gradient a rank's shard receives is the average over the ranks of the whole gradient's
//! rows (a reduce-scatter), so only the summation order differs from one rank: the tolerance is
//! the DDP tests' (|fsdp - single| <= 1e-6 + 1e-5 * |single|). The test model's layers have 8, 16,
//! 16 and 3 rows, so 3 and 4 ranks cut some of them unevenly (padding rows).

use crate::common;

use burn::module::{Module, Param};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, Optimizer, SgdConfig};
use burn::tensor::Tensor;
use burn_fabric::fabric_strategies::CollectParams;
use burn_fabric::{AutoWrap, Checkpoint, Fabric, FabricError, Restore};
use common::{B, Mlp, batch, worst_ratio};
use std::sync::Mutex;

/// Samples per step, divisible by 1, 2, 3 and 4 ranks.
const BATCH: usize = 24;
const STEPS: usize = 12;

struct Run<'a> {
    strategy: &'a str,
    devices: usize,
    precision: &'a str,
    /// Micro-batches per step (accumulated under `no_backward_sync`).
    micro: usize,
    clip: Option<f64>,
    steps: std::ops::Range<usize>,
    resume: Option<&'a std::path::Path>,
    save: Option<&'a std::path::Path>,
    auto_wrap: AutoWrap,
}

/// Rank 0's whole parameters after training, and the shapes each rank held them in.
struct Outcome {
    params: Vec<Vec<f32>>,
    shapes: Vec<Vec<Vec<usize>>>,
    norms: Vec<f64>,
}

/// A Fabric for `devices` ranks under `strategy`, ignoring the environment's `LT_*` variables.
fn builder(strategy: &str, devices: usize) -> burn_fabric::FabricBuilder<B> {
    Fabric::<B>::builder()
        .devices(devices)
        .strategy(strategy)
        .env(burn_fabric::EnvVars::default())
}

fn run(strategy: &str, devices: usize) -> Run<'_> {
    Run {
        strategy,
        devices,
        precision: "32-true",
        micro: 1,
        clip: None,
        steps: 0..STEPS,
        resume: None,
        save: None,
        auto_wrap: AutoWrap::Off,
    }
}

fn shapes(model: &Mlp<B>) -> Vec<Vec<usize>> {
    let mut collect = CollectParams::<B>::default();
    model.visit(&mut collect);
    collect.shapes
}

impl Run<'_> {
    fn train<O: Optimizer<Mlp<B>, B>>(
        &self,
        lr: f64,
        make_optimizer: impl Fn() -> O + Sync,
    ) -> Result<Outcome, FabricError> {
        let mut fabric = builder(self.strategy, self.devices)
            .precision(self.precision)
            .auto_wrap(self.auto_wrap.clone())
            .build()?;
        let held = Mutex::new(vec![Vec::new(); self.devices]);
        let mut outcome = fabric.launch(|fabric| -> Result<Outcome, FabricError> {
            let device = *fabric.device();
            let (mut model, mut optimizer) =
                fabric.setup(Mlp::deterministic(&device), make_optimizer())?;
            if let Some(path) = self.resume {
                let restore = Restore::new()
                    .module("model", &mut model)
                    .optimizer("optimizer", &mut optimizer);
                fabric.load(path, restore)?;
            }
            held.lock().unwrap()[fabric.global_rank()] = shapes(&model);
            let per_rank = BATCH / fabric.world_size();
            let per_micro = per_rank / self.micro;
            let mut norms = Vec::new();
            for step in self.steps.clone() {
                for m in 0..self.micro {
                    let start = step * BATCH + fabric.global_rank() * per_rank + m * per_micro;
                    let (x, y) = batch::<B>(start, per_micro, &device);
                    let out = fabric.forward(&model, x, |m, x| m.forward(x));
                    let loss = (out - y)
                        .powi_scalar(2)
                        .mean()
                        .div_scalar(self.micro as f64);
                    let accumulating = m + 1 < self.micro;
                    fabric.no_backward_sync(accumulating, |f| f.backward(loss, &model))?;
                }
                if let Some(max_norm) = self.clip {
                    norms.push(fabric.clip_gradients_norm(&model, max_norm, 2.0)?);
                }
                model = optimizer.step(lr, model)?;
            }
            if let Some(path) = self.save {
                let checkpoint = Checkpoint::new()
                    .module("model", &model)
                    .optimizer("optimizer", &optimizer);
                fabric.save(path, checkpoint)?;
            }
            let whole = fabric.gathered(&model)?;
            Ok(Outcome {
                params: common::params(&whole),
                shapes: Vec::new(),
                norms,
            })
        })?;
        outcome.shapes = held.into_inner().unwrap();
        Ok(outcome)
    }
}

type Sgd = burn::optim::adaptor::OptimizerAdaptor<burn::optim::Sgd<burn::backend::Flex>, Mlp<B>, B>;
type Adam = burn::optim::adaptor::OptimizerAdaptor<burn::optim::Adam, Mlp<B>, B>;

fn sgd() -> Sgd {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new()))
        .init()
}

fn adam() -> Adam {
    AdamConfig::new().init()
}

fn assert_close(name: &str, got: &Outcome, single: &Outcome) {
    let ratio = worst_ratio(&got.params, &single.params, 1e-5, 1e-6);
    assert!(
        ratio <= 1.0,
        "{name}: {ratio:.3} x the tolerance from one rank"
    );
    let start = common::params(&Mlp::<B>::deterministic(&Default::default()));
    assert!(
        worst_ratio(&single.params, &start, 1e-5, 1e-6) > 100.0,
        "{name}: parameters did not move"
    );
}

/// The shapes rank `rank` of `world` holds the test model's parameters in.
fn shard_shapes(world: usize) -> Vec<Vec<usize>> {
    let rows = |n: usize| n.div_ceil(world);
    vec![
        vec![rows(8), 16],
        vec![rows(16)],
        vec![rows(16), 3],
        vec![rows(3)],
    ]
}

#[test]
fn fsdp_equals_one_rank_for_each_sharding_choice_and_world_size() {
    for (name, lr, single) in [
        (
            "sgd",
            0.05,
            run("single_device", 1).train(0.05, sgd).unwrap(),
        ),
        (
            "adam",
            0.01,
            run("single_device", 1).train(0.01, adam).unwrap(),
        ),
    ] {
        // One process: hybrid_shard is full_shard.
        for strategy in ["fsdp", "fsdp_shard_grad_op", "fsdp_hybrid_shard"] {
            for devices in [2, 3, 4] {
                let run = run(strategy, devices);
                let got = match name {
                    "sgd" => run.train(lr, sgd),
                    _ => run.train(lr, adam),
                }
                .unwrap();
                let label = format!("{strategy} {devices} ranks {name}");
                assert_close(&label, &got, &single);
                for (rank, held) in got.shapes.iter().enumerate() {
                    assert_eq!(held, &shard_shapes(devices), "{label}: rank {rank} holds");
                }
            }
        }
    }
}

#[test]
fn automatic_units_train_like_one_rank() {
    let single = run("single_device", 1).train(0.01, adam).unwrap();
    for auto_wrap in [AutoWrap::module_types(["Linear"]), AutoWrap::MinParams(100)] {
        let got = Run {
            auto_wrap: auto_wrap.clone(),
            ..run("fsdp", 3)
        }
        .train(0.01, adam)
        .unwrap();
        assert_close(&format!("fsdp 3 ranks, {auto_wrap:?}"), &got, &single);
    }
}

#[test]
fn one_rank_fsdp_is_single_device_bit_for_bit() {
    let single = run("single_device", 1).train(0.01, adam).unwrap();
    let fsdp = run("fsdp", 1).train(0.01, adam).unwrap();
    assert_eq!(fsdp.params, single.params);
}

#[test]
fn no_backward_sync_and_clipping_use_the_global_norm() {
    let reference = Run {
        micro: 2,
        clip: Some(0.05),
        ..run("single_device", 1)
    }
    .train(0.05, sgd)
    .unwrap();
    let fsdp = Run {
        micro: 2,
        clip: Some(0.05),
        ..run("fsdp", 3)
    }
    .train(0.05, sgd)
    .unwrap();
    assert_close("fsdp 3 ranks, accumulation and clipping", &fsdp, &reference);
    // The clip bites (the norm is above the limit), and each rank's partial norm adds up.
    assert!(
        reference.norms.iter().all(|&n| n > 0.05),
        "{:?}",
        reference.norms
    );
    for (got, want) in fsdp.norms.iter().zip(&reference.norms) {
        assert!((got - want).abs() <= 1e-5 * want, "norm {got} vs {want}");
    }
}

#[test]
fn bf16_mixed_gathers_in_bf16_and_trains_like_ddp() {
    let precision = "bf16-mixed";
    let ddp = Run {
        precision,
        ..run("ddp", 2)
    }
    .train(0.01, adam)
    .unwrap();
    let fsdp = Run {
        precision,
        ..run("fsdp", 2)
    }
    .train(0.01, adam)
    .unwrap();
    // bf16 forward passes: both runs round alike, the reduction order differs (f32 averages of
    // bf16 gradients); well within bf16's resolution of the values.
    let ratio = worst_ratio(&fsdp.params, &ddp.params, 2e-2, 2e-3);
    assert!(ratio <= 1.0, "{ratio:.3} x the bf16 tolerance from DDP");
    assert_eq!(fsdp.shapes[1], shard_shapes(2));
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn sharded_checkpoints_resume_at_any_world_size_and_under_any_strategy() {
    let dir = TempDir(std::env::temp_dir().join(format!("fsdp-ckpt-{}", std::process::id())));
    let path = dir.0.join("step.ckpt");
    let single = run("single_device", 1).train(0.01, adam).unwrap();
    let whole = run("fsdp", 4).train(0.01, adam).unwrap();
    Run {
        steps: 0..STEPS / 2,
        save: Some(&path),
        ..run("fsdp", 4)
    }
    .train(0.01, adam)
    .unwrap();
    assert!(path.join("shard-00003-of-00004.fabric").is_file());
    let resume = |strategy, devices| {
        Run {
            steps: STEPS / 2..STEPS,
            resume: Some(&path),
            ..run(strategy, devices)
        }
        .train(0.01, adam)
        .unwrap()
    };
    // At the world size that saved it: each rank reads its own shard, bit for bit.
    assert_eq!(resume("fsdp", 4).params, whole.params);
    // Elsewhere the rows (of the parameters and of Adam's moments) are merged and cut again.
    for (strategy, devices) in [
        ("fsdp", 2),
        ("fsdp", 1),
        ("fsdp", 3),
        ("zero2", 2),
        ("ddp", 2),
    ] {
        let label = format!("saved by fsdp at 4 ranks, resumed by {strategy} at {devices}");
        assert_close(&label, &resume(strategy, devices), &single);
    }
    // `fabric consolidate` writes the same merge to one file, which loads anywhere.
    let file = burn_fabric::consolidate(&path, None).unwrap();
    let from_file = Run {
        steps: STEPS / 2..STEPS,
        resume: Some(&file),
        ..run("single_device", 1)
    }
    .train(0.01, adam)
    .unwrap();
    assert_close("consolidated fsdp shards", &from_file, &single);
    // Resharding reads one saved shard at a time, yet gives each rank what cutting the
    // consolidated file gives it: the same bits.
    let cut = Run {
        steps: STEPS / 2..STEPS,
        resume: Some(&file),
        ..run("fsdp", 3)
    }
    .train(0.01, adam)
    .unwrap();
    assert_eq!(resume("fsdp", 3).params, cut.params);
    // And FSDP cuts ZeRO's shards (whole parameters) into rows.
    let zero = dir.0.join("zero.ckpt");
    Run {
        steps: 0..STEPS / 2,
        save: Some(&zero),
        ..run("zero2", 2)
    }
    .train(0.01, adam)
    .unwrap();
    let from_zero = Run {
        steps: STEPS / 2..STEPS,
        resume: Some(&zero),
        ..run("fsdp", 4)
    }
    .train(0.01, adam)
    .unwrap();
    assert_close("saved by zero2, resumed by fsdp", &from_zero, &single);
}

#[test]
fn gradients_are_shards_and_gathered_returns_whole_parameters() {
    let mut fabric = builder("fsdp", 2).build().unwrap();
    fabric
        .launch(|fabric| -> Result<(), FabricError> {
            let device = *fabric.device();
            let model = fabric.setup_module(Mlp::deterministic(&device))?;
            let (x, y) = batch::<B>(fabric.global_rank() * 4, 4, &device);
            let out = fabric.forward(&model, x, |m, x| m.forward(x));
            fabric.backward((out - y).powi_scalar(2).mean(), &model)?;
            let bias = model.l2.bias.as_ref().expect("l2 has a bias");
            let grad = fabric
                .gradient(bias)
                .expect("a shard of l2.bias's gradient");
            // 3 rows over 2 ranks: 2 each, rank 1's second row is padding with a zero gradient.
            let grad: Vec<f32> = grad.into_data().to_vec().unwrap();
            assert_eq!(grad.len(), 2);
            if fabric.global_rank() == 1 {
                assert_eq!(grad[1], 0.0);
            }
            let whole = fabric.gathered(&model)?;
            let want = common::params(&Mlp::<B>::deterministic(&device));
            assert_eq!(common::params(&whole), want);
            let bias: &Param<Tensor<B, 1>> = whole.l2.bias.as_ref().unwrap();
            assert_eq!(bias.val().dims(), [3]);
            Ok(())
        })
        .unwrap();
}

#[test]
fn streamed_safetensors_export_equals_the_gathered_models() {
    let dir = TempDir(std::env::temp_dir().join(format!("fsdp-export-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (streamed, whole) = (
        dir.0.join("streamed.safetensors"),
        dir.0.join("whole.safetensors"),
    );
    let mut fabric = builder("fsdp", 3).build().unwrap();
    fabric
        .launch(|fabric| -> Result<(), FabricError> {
            let device = *fabric.device();
            let (mut model, mut optimizer) = fabric.setup(Mlp::deterministic(&device), adam())?;
            let (x, y) = batch::<B>(fabric.global_rank() * 8, 8, &device);
            let out = fabric.forward(&model, x, |m, x| m.forward(x));
            fabric.backward((out - y).powi_scalar(2).mean(), &model)?;
            model = optimizer.step(0.01, model)?;
            fabric.export_safetensors(&model, &streamed)?;
            let gathered = fabric.gathered(&model)?;
            if fabric.is_global_zero() {
                burn_fabric::export_safetensors(&gathered, &whole)?;
            }
            Ok(())
        })
        .unwrap();
    let streamed = std::fs::read(streamed).unwrap();
    assert_eq!(streamed, std::fs::read(whole).unwrap());
    // Whole parameters in PyTorch's layout: l1.weight is [16, 8] (Burn's [8, 16] transposed).
    let file = safetensors::SafeTensors::deserialize(&streamed).unwrap();
    assert_eq!(file.tensor("l1.weight").unwrap().shape(), [16, 8]);
}

/// Three blocks, each an FSDP unit, and a head outside any unit.
/// Trains [`Tower`] (units, one of them run twice, a bias also used outside its unit) with
/// `micro` micro-batches per step; with `overlap`, forward prefetch and backward's
/// reduce-scatters on the communication thread.
fn train_tower(strategy: &str, devices: usize, micro: usize, overlap: bool) -> Vec<Vec<f32>> {
    let fabric = builder(strategy, devices)
        .forward_prefetch(overlap)
        .overlap_backward(overlap)
        .build()
        .unwrap();
    // Whether a communication thread ran cannot be told here: the suite's other tests run
    // theirs in this process at the same time (fabric-strategies' unit tests show the
    // hand-over).
    let (params, _) = common::tower::train_tower(fabric, micro).unwrap();
    params
}

#[test]
fn units_gather_and_reduce_scatter_block_by_block_and_train_like_one_rank() {
    let single = train_tower("single_device", 1, 1, false);
    for strategy in ["fsdp", "fsdp_shard_grad_op"] {
        for (devices, micro) in [(2, 1), (3, 2)] {
            let fsdp = train_tower(strategy, devices, micro, true);
            let ratio = worst_ratio(&fsdp, &single, 1e-5, 1e-6);
            assert!(
                ratio <= 1.0,
                "{strategy} {devices} ranks, {micro} micro-batches: {ratio:.3} x the tolerance"
            );
            // The communication travels earlier; the arithmetic is the same.
            let waiting = train_tower(strategy, devices, micro, false);
            assert_eq!(fsdp, waiting, "{strategy} {devices} ranks");
        }
    }
}
