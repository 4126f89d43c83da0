//! ZeRO stages 1 and 2 reach the parameters plain DDP reaches, while each rank keeps optimizer
//! state for its own partition only.
//!
//! ZeRO changes where each parameter is stepped, not what is computed: the owner sees the same
//! averaged gradient (the same additions in the same order) and runs the same optimizer math, so
//! the parameters must equal DDP's bit for bit. Against one rank on the full batch they agree
//! within the DDP tolerance (|zero - single| <= 1e-6 + 1e-5 * |single|). Gradient-norm clipping
//! is the exception: each rank sums its own shard's squares, so the norm (and the clipped step)
//! equals DDP's only up to f32 rounding, checked with the same tolerance.

use crate::common;

use burn::module::{Module, ParamId};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, Optimizer, SgdConfig};
use burn::tensor::Tensor;
use burn_fabric::fabric_strategies::CollectParams;
use burn_fabric::{Checkpoint, Fabric, FabricError, Restore};
use common::{B, Mlp, batch, worst_ratio};
use std::collections::BTreeSet;
use std::sync::Mutex;

const STEPS: usize = 20;
const BATCH: usize = 16;

/// What one training run produced.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    /// Rank 0's parameters (visit order), as f32.
    params: Vec<Vec<f32>>,
    /// Pre-clip gradient norms of every step (when clipping).
    norms: Vec<f64>,
    /// Each rank's optimizer-record keys, by global rank.
    record_ids: Vec<BTreeSet<ParamId>>,
    /// The model's parameter ids (rank 0's, the same everywhere after setup).
    ids: Vec<ParamId>,
}

struct Run<'a> {
    strategy: &'a str,
    precision: &'a str,
    devices: usize,
    micro: usize,
    clip: Option<f64>,
    /// Steps to train (the data of step `i` is the same whatever run trains it).
    steps: std::ops::Range<usize>,
    /// Load this checkpoint (model and optimizer) after setup.
    resume: Option<&'a std::path::Path>,
    /// Restore only the model from `resume`, not the optimizer.
    model_only: bool,
    /// Save a checkpoint here after the step with this index.
    save: Option<(usize, &'a std::path::Path)>,
}

impl Run<'_> {
    fn new(strategy: &str, devices: usize) -> Run<'_> {
        Run {
            strategy,
            precision: "32-true",
            devices,
            micro: 1,
            clip: None,
            steps: 0..STEPS,
            resume: None,
            model_only: false,
            save: None,
        }
    }

    fn train<O, F, R>(&self, lr: f64, make_optimizer: F) -> Result<Outcome, FabricError>
    where
        O: Optimizer<Mlp<B>, B>,
        F: Fn() -> O + Sync,
        O::Record: IntoIterator<Item = (ParamId, R)>,
    {
        let mut fabric = Fabric::<B>::builder()
            .devices(self.devices)
            .strategy(self.strategy)
            .precision(self.precision)
            .env(burn_fabric::EnvVars::default())
            .build()?;
        let records = Mutex::new(vec![BTreeSet::new(); self.devices]);
        let mut outcome = fabric.launch(|fabric| -> Result<Outcome, FabricError> {
            let device = *fabric.device();
            let model = if fabric.global_rank() == 0 {
                Mlp::deterministic(&device)
            } else {
                Mlp::random(&device)
            };
            let (mut model, mut optimizer) = fabric.setup(model, make_optimizer())?;
            if let Some(path) = self.resume {
                let restore = Restore::new().module("model", &mut model);
                let restore = if self.model_only {
                    restore.strict(false)
                } else {
                    restore.optimizer("optimizer", &mut optimizer)
                };
                fabric.load(path, restore)?;
            }
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
                if let Some((after, path)) = self.save
                    && after == step
                {
                    let checkpoint = Checkpoint::new()
                        .module("model", &model)
                        .optimizer("optimizer", &optimizer);
                    fabric.save(path, checkpoint)?;
                }
            }
            let mut collect = CollectParams::<B>::default();
            model.visit(&mut collect);
            let params: Vec<Vec<f32>> = collect
                .values
                .iter()
                .map(|t| t.clone().into_data().convert::<f32>().to_vec().unwrap())
                .collect();
            // Every rank must hold the same model.
            let flat: Vec<f32> = params.concat();
            let n = flat.len();
            let local = Tensor::<burn::backend::Flex, 1>::from_floats(flat.as_slice(), &device);
            let all: Tensor<burn::backend::Flex, 2> = fabric.all_gather(local)?;
            let all = all.into_data().to_vec::<f32>().unwrap();
            for rank in 1..fabric.world_size() {
                assert_eq!(
                    all[rank * n..(rank + 1) * n],
                    all[..n],
                    "rank {rank}'s model differs from rank 0's"
                );
            }
            records.lock().unwrap()[fabric.global_rank()] = optimizer
                .to_record()
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            Ok(Outcome {
                params,
                norms,
                record_ids: Vec::new(),
                ids: collect.ids,
            })
        })?;
        outcome.record_ids = records.into_inner().unwrap();
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

fn assert_like_ddp(name: &str, zero: &Outcome, ddp: &Outcome, single: &Outcome) {
    assert_eq!(zero.params, ddp.params, "{name}: differs from DDP");
    assert_eq!(
        zero.norms, ddp.norms,
        "{name}: gradient norms differ from DDP's"
    );
    let ratio = worst_ratio(&zero.params, &single.params, 1e-5, 1e-6);
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

/// Each rank's record holds exactly its own parameters; together they cover every parameter
/// once. Under DDP every rank holds all of them.
fn assert_sharded_records(name: &str, zero: &Outcome, devices: usize) {
    let all: BTreeSet<ParamId> = zero.ids.iter().copied().collect();
    let layout: Vec<(usize, burn::tensor::DType)> =
        common::params(&Mlp::<B>::deterministic(&Default::default()))
            .iter()
            .map(|p| (p.len(), burn::tensor::DType::F32))
            .collect();
    let owners = burn_fabric::fabric_strategies::partition(&layout, devices);
    for (rank, ids) in zero.record_ids.iter().enumerate() {
        let expected: BTreeSet<ParamId> = zero
            .ids
            .iter()
            .zip(&owners)
            .filter(|(_, owner)| **owner == rank)
            .map(|(id, _)| *id)
            .collect();
        assert!(!expected.is_empty(), "{name}: rank {rank} owns nothing");
        assert_eq!(ids, &expected, "{name}: rank {rank}'s optimizer record");
    }
    let union: BTreeSet<ParamId> = zero.record_ids.iter().flatten().copied().collect();
    assert_eq!(union, all, "{name}: the shards do not cover the model");
}

#[test]
fn zero1_and_zero2_equal_ddp_with_sgd_momentum_and_adam() {
    let single_sgd = Run::new("single_device", 1).train(0.1, sgd).unwrap();
    let single_adam = Run::new("single_device", 1).train(0.01, adam).unwrap();
    for devices in [2, 4] {
        let ddp_sgd = Run::new("ddp", devices).train(0.1, sgd).unwrap();
        let ddp_adam = Run::new("ddp", devices).train(0.01, adam).unwrap();
        for record in &ddp_adam.record_ids {
            assert_eq!(record.len(), 4, "DDP keeps state for every parameter");
        }
        for strategy in ["zero1", "zero2"] {
            let name = format!("{strategy} sgd {devices} ranks");
            let zero = Run::new(strategy, devices).train(0.1, sgd).unwrap();
            assert_like_ddp(&name, &zero, &ddp_sgd, &single_sgd);
            assert_sharded_records(&name, &zero, devices);
            let name = format!("{strategy} adam {devices} ranks");
            let zero = Run::new(strategy, devices).train(0.01, adam).unwrap();
            assert_like_ddp(&name, &zero, &ddp_adam, &single_adam);
            assert_sharded_records(&name, &zero, devices);
        }
    }
}

#[test]
fn ddp_sharded_is_zero1() {
    let fabric = Fabric::<B>::builder()
        .devices(2)
        .strategy("ddp_sharded")
        .env(burn_fabric::EnvVars::default())
        .build()
        .unwrap();
    assert_eq!(fabric.strategy().as_str(), "zero1");
}

#[test]
fn no_backward_sync_and_clipping_use_the_global_norm() {
    for strategy in ["zero1", "zero2"] {
        for devices in [2, 4] {
            let run = |strategy| Run {
                micro: 2,
                clip: Some(0.05),
                ..Run::new(strategy, devices)
            };
            let ddp = run("ddp").train(0.01, adam).unwrap();
            let zero = run(strategy).train(0.01, adam).unwrap();
            let single = Run {
                clip: Some(0.05),
                ..Run::new("single_device", 1)
            }
            .train(0.01, adam)
            .unwrap();
            let name = format!("{strategy} {devices} ranks, 2 micro-batches, clip 0.05");
            // Clipping must have bitten, or the global norm is untested.
            assert!(
                ddp.norms.iter().all(|n| *n > 0.05),
                "{name}: {:?}",
                ddp.norms
            );
            // Each rank sums its own shard's squares, so the norm's additions happen in
            // another order than DDP's: equal to f32 rounding, and the clipped steps likewise.
            for (z, d) in zero.norms.iter().zip(&ddp.norms) {
                assert!((z - d).abs() <= 1e-6 * d, "{name}: norm {z} vs DDP's {d}");
            }
            let ratio = worst_ratio(&zero.params, &ddp.params, 1e-5, 1e-6);
            assert!(ratio <= 1.0, "{name}: {ratio:.3} x the tolerance from DDP");
            let ratio = worst_ratio(&zero.params, &single.params, 1e-5, 1e-6);
            assert!(
                ratio <= 1.0,
                "{name}: {ratio:.3} x the tolerance from one rank"
            );
        }
    }
}

#[test]
fn every_precision_equals_ddp() {
    for precision in ["16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"] {
        let run = |strategy| Run {
            precision,
            ..Run::new(strategy, 2)
        };
        let ddp = run("ddp").train(0.01, adam).unwrap();
        let zero = run("zero2").train(0.01, adam).unwrap();
        assert_eq!(zero.params, ddp.params, "zero2 {precision}");
        assert_sharded_records(&format!("zero2 {precision}"), &zero, 2);
    }
}

/// A scratch directory removed at the end of the test.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fabric-zero-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn sharded_checkpoints_resume_at_the_same_world_size_and_consolidate_for_any() {
    let scratch = Scratch::new("ckpt");
    let dir = scratch.0.join("step-9");
    // The uninterrupted run, saving after step 9 of 20.
    let whole = Run {
        save: Some((9, &dir)),
        ..Run::new("zero2", 2)
    }
    .train(0.01, adam)
    .unwrap();
    let mut shards: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    shards.sort();
    assert_eq!(
        shards,
        ["shard-00000-of-00002.fabric", "shard-00001-of-00002.fabric"]
    );

    // Same world size: each rank loads its own shard, and the result is bit for bit the same.
    let resumed = Run {
        resume: Some(&dir),
        steps: 10..STEPS,
        ..Run::new("zero2", 2)
    }
    .train(0.01, adam)
    .unwrap();
    assert_eq!(resumed.params, whole.params, "resumed from the shards");
    assert_sharded_records("resumed zero2", &resumed, 2);

    // Without the optimizer state the continuation differs: the test above can fail.
    let model_only = Run {
        resume: Some(&dir),
        model_only: true,
        steps: 10..STEPS,
        ..Run::new("zero2", 2)
    }
    .train(0.01, adam)
    .unwrap();
    assert!(worst_ratio(&model_only.params, &whole.params, 1e-5, 1e-6) > 10.0);

    // Consolidated: one file with every parameter's state, loadable at world size 1 and 4.
    let file = burn_fabric::consolidate(&dir, None).unwrap();
    assert_eq!(file, scratch.0.join("step-9.consolidated"));
    let single = Run {
        resume: Some(&file),
        steps: 10..STEPS,
        ..Run::new("single_device", 1)
    }
    .train(0.01, adam)
    .unwrap();
    assert_eq!(
        single.record_ids[0].len(),
        4,
        "the consolidated record is whole"
    );
    let ratio = worst_ratio(&single.params, &whole.params, 1e-5, 1e-6);
    assert!(
        ratio <= 1.0,
        "world size 1 from the consolidated file: {ratio:.3} x tolerance"
    );
    for (strategy, path) in [("zero2", &file), ("zero1", &dir)] {
        let four = Run {
            resume: Some(path),
            steps: 10..STEPS,
            ..Run::new(strategy, 4)
        }
        .train(0.01, adam)
        .unwrap();
        let name = format!("{strategy} at 4 ranks from {}", path.display());
        // Loading a whole record, each rank keeps only its own partition.
        assert_sharded_records(&name, &four, 4);
        let ratio = worst_ratio(&four.params, &whole.params, 1e-5, 1e-6);
        assert!(ratio <= 1.0, "{name}: {ratio:.3} x tolerance");
    }
}

#[test]
fn incomplete_shard_directories_are_named_errors() {
    let scratch = Scratch::new("broken");
    let dir = scratch.0.join("ckpt");
    Run {
        save: Some((0, &dir)),
        steps: 0..1,
        ..Run::new("zero1", 2)
    }
    .train(0.01, adam)
    .unwrap();
    std::fs::remove_file(dir.join("shard-00001-of-00002.fabric")).unwrap();
    let err = burn_fabric::consolidate(&dir, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ranks [1] are missing"), "{err}");
    let err = Run {
        resume: Some(&dir),
        ..Run::new("zero1", 2)
    }
    .train(0.01, adam)
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing"), "{err}");
}
