//! Checkpoints: round trips of models, optimizers and values; strict and partial loading; typed
//! errors for missing, damaged or mismatched files; dtypes kept; a resumed run equal to an
//! uninterrupted one; and files that survive being killed mid-save.

use crate::common;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::optim::AdamConfig;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_fabric::{Checkpoint, DataLoader, EnvVars, Fabric, FabricError, Restore};
use common::{B, D_IN, D_OUT, Mlp, batch, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn new_fabric(devices: usize, precision: &str) -> Fabric<B> {
    Fabric::<B>::builder()
        .devices(devices)
        .precision(precision)
        .env(EnvVars::default())
        .build()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fabric-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

type Adam = burn::optim::adaptor::OptimizerAdaptor<burn::optim::Adam, Mlp<B>, B>;

fn train_steps(
    fabric: &mut Fabric<B>,
    model: Mlp<B>,
    optim: &mut burn_fabric::FabricOptimizer<B, Mlp<B>, Adam>,
    steps: std::ops::Range<usize>,
) -> Mlp<B> {
    let device = *fabric.device();
    let mut model = model;
    for step in steps {
        let (x, y) = batch::<B>(step * 4, 4, &device);
        let loss = (fabric.forward(&model, x, |m, x| m.forward(x)) - y)
            .powi_scalar(2)
            .mean();
        fabric.backward(loss, &model).unwrap();
        model = optim.step(0.01, model).unwrap();
    }
    model
}

#[test]
fn model_optimizer_and_values_round_trip_and_training_continues_identically() {
    let dir = temp_dir("roundtrip");
    let path = dir.join("state.ckpt");
    let mut fabric = new_fabric(1, "32-true");
    let device = *fabric.device();
    let (model, mut optim) = fabric
        .setup(Mlp::<B>::deterministic(&device), AdamConfig::new().init())
        .unwrap();
    let model = train_steps(&mut fabric, model, &mut optim, 0..5);
    let (step, best) = (5u64, 0.25f64);
    fabric
        .save(
            &path,
            Checkpoint::new()
                .module("model", &model)
                .optimizer("optim", &optim)
                .value("step", &step)
                .value("best", &best),
        )
        .unwrap();
    let continued = train_steps(&mut fabric, model, &mut optim, 5..10);

    let mut fresh = new_fabric(1, "32-true");
    let (mut restored, mut restored_optim) = fresh
        .setup(Mlp::<B>::random(&device), AdamConfig::new().init())
        .unwrap();
    let (mut step2, mut best2) = (0u64, 0.0f64);
    let rest = fresh
        .load(
            &path,
            Restore::new()
                .module("model", &mut restored)
                .optimizer("optim", &mut restored_optim)
                .value("step", &mut step2)
                .value("best", &mut best2),
        )
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!((step2, best2), (5, 0.25));
    let resumed = train_steps(&mut fresh, restored, &mut restored_optim, 5..10);
    assert_eq!(
        params(&resumed),
        params(&continued),
        "Adam state must come back exactly"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn strict_partial_and_remainder() {
    let dir = temp_dir("strict");
    let path = dir.join("state.ckpt");
    let mut fabric = new_fabric(1, "32-true");
    let device = *fabric.device();
    let model = fabric
        .setup_module(Mlp::<B>::deterministic(&device))
        .unwrap();
    fabric
        .save(
            &path,
            Checkpoint::new()
                .module("model", &model)
                .value("epoch", &3u32)
                .value("note", &"hello".to_string()),
        )
        .unwrap();
    // partial: only the epoch; the rest comes back
    let mut epoch = 0u32;
    let rest = fabric
        .load(&path, Restore::new().value("epoch", &mut epoch))
        .unwrap();
    assert_eq!(epoch, 3);
    assert_eq!(rest.keys().collect::<Vec<_>>(), vec!["model", "note"]);
    assert_eq!(
        rest.value::<String>("note").unwrap(),
        Some("hello".to_string())
    );
    // nothing asked: everything comes back
    assert_eq!(fabric.load(&path, Restore::new()).unwrap().len(), 3);
    // strict: a key the file lacks is an error naming it; non-strict skips it
    let mut missing = 7u32;
    let err = fabric
        .load(&path, Restore::new().value("missing", &mut missing))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state.ckpt") && err.contains("`missing`") && err.contains("strict"),
        "{err}"
    );
    fabric
        .load(
            &path,
            Restore::new().value("missing", &mut missing).strict(false),
        )
        .unwrap();
    assert_eq!(missing, 7);
    // a value where a module is expected
    let mut other = fabric.setup_module(Mlp::<B>::random(&device)).unwrap();
    let err = fabric
        .load(&path, Restore::new().module("epoch", &mut other))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`epoch`") && err.contains("Value"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Module, Debug)]
struct Wider<B: Backend> {
    l1: burn::nn::Linear<B>,
    l2: burn::nn::Linear<B>,
}

#[test]
fn missing_damaged_and_mismatched_files_are_typed_errors() {
    let dir = temp_dir("errors");
    let path = dir.join("state.ckpt");
    let mut fabric = new_fabric(1, "32-true");
    let device = *fabric.device();
    let mut model = fabric
        .setup_module(Mlp::<B>::deterministic(&device))
        .unwrap();
    let err = fabric
        .load(
            dir.join("nope.ckpt"),
            Restore::new().module("model", &mut model),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.ckpt") && err.contains("not found"),
        "{err}"
    );

    fabric
        .save(&path, Checkpoint::new().module("model", &model))
        .unwrap();
    // same structure, other widths: the first parameter that differs is named
    let mut wider = fabric
        .setup_module(Wider::<B> {
            l1: burn::nn::LinearConfig::new(D_IN, 32).init(&device),
            l2: burn::nn::LinearConfig::new(32, D_OUT).init(&device),
        })
        .unwrap();
    let err = fabric
        .load(&path, Restore::new().module("model", &mut wider))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state.ckpt") && err.contains("`model`") && err.contains("l1.weight"),
        "{err}"
    );

    // random truncations and byte flips: always an error, never a panic, never a silent load
    let good = std::fs::read(&path).unwrap();
    let mut seed = 12345u64;
    let mut next = move |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    for case in 0..200 {
        let mut bad = good.clone();
        if case % 2 == 0 {
            bad.truncate(next(good.len()));
        } else {
            let at = next(good.len());
            bad[at] ^= 1 << next(8);
        }
        std::fs::write(&path, &bad).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut target = Mlp::<B>::deterministic(&device);
            fabric
                .load(&path, Restore::new().module("model", &mut target))
                .map(|_| ())
        }));
        match outcome {
            Ok(Err(FabricError::Checkpoint { path: p, .. })) => assert!(p.contains("state.ckpt")),
            Ok(other) => panic!("case {case}: expected a checkpoint error, got {other:?}"),
            Err(_) => panic!("case {case}: loading a damaged file panicked"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dtypes_survive_and_the_scaler_comes_back() {
    let dir = temp_dir("dtypes");
    for (precision, dtype) in [
        ("bf16-true", DType::BF16),
        ("64-true", DType::F64),
        ("16-mixed", DType::F32),
    ] {
        let path = dir.join(format!("{precision}.ckpt"));
        let mut fabric = new_fabric(1, precision);
        let device = *fabric.device();
        let model = fabric
            .setup_module(Mlp::<B>::deterministic(&device))
            .unwrap();
        if precision == "16-mixed" {
            let mut state = fabric.grad_scaler().unwrap();
            state.scale = 512.0;
            fabric.load_grad_scaler(state);
        }
        fabric
            .save(&path, Checkpoint::new().module("model", &model))
            .unwrap();
        let mut fresh = new_fabric(1, precision);
        let mut restored = fresh.setup_module(Mlp::<B>::random(&device)).unwrap();
        fresh
            .load(&path, Restore::new().module("model", &mut restored))
            .unwrap();
        assert_eq!(restored.l1.weight.val().dtype(), dtype, "{precision}");
        assert_eq!(
            restored.l1.weight.val().into_data(),
            model.l1.weight.val().into_data(),
            "{precision}: exact values"
        );
        assert!(restored.l1.weight.val().is_require_grad());
        if precision == "16-mixed" {
            assert_eq!(fresh.grad_scaler().unwrap().scale, 512.0);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_burn_model_files_load_raw() {
    let dir = temp_dir("raw");
    let fabric = new_fabric(1, "32-true");
    let device = *fabric.device();
    let model = Mlp::<B>::deterministic(&device);
    model
        .clone()
        .save_file(
            dir.join("model"),
            &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
        )
        .unwrap();
    let mut target = Mlp::<B>::random(&device);
    fabric.load_raw(dir.join("model.mpk"), &mut target).unwrap();
    assert_eq!(params(&target), params(&model));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rank_zero_writes_and_every_rank_reads() {
    let dir = temp_dir("ddp");
    let path = dir.join("ddp.ckpt");
    let mut fabric = new_fabric(2, "32-true");
    let sums = fabric
        .launch(|fabric| {
            let device = *fabric.device();
            let (model, mut optim) =
                fabric.setup(Mlp::<B>::deterministic(&device), AdamConfig::new().init())?;
            let model = train_steps(fabric, model, &mut optim, 0..3);
            fabric.save(
                &path,
                Checkpoint::new()
                    .module("model", &model)
                    .optimizer("optim", &optim),
            )?;
            let mut restored = Mlp::<B>::random(&device);
            fabric.load(
                &path,
                Restore::new()
                    .module("model", &mut restored)
                    .optimizer("optim", &mut optim),
            )?;
            assert_eq!(params(&restored), params(&model));
            let mine: f32 = params(&restored).concat().iter().sum();
            let all: Tensor<burn::backend::Flex, 2> =
                fabric.all_gather(Tensor::<burn::backend::Flex, 1>::from_data(
                    TensorData::new(vec![mine], [1]),
                    &device,
                ))?;
            Ok::<_, FabricError>(all.into_data().to_vec::<f32>().unwrap())
        })
        .unwrap();
    assert_eq!(sums[0], sums[1]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Items for the resume test: the row index.
#[derive(Clone)]
struct Rows;

impl<BK: Backend> Batcher<BK, usize, (Tensor<BK, 2>, Tensor<BK, 2>)> for Rows {
    fn batch(&self, items: Vec<usize>, device: &BK::Device) -> (Tensor<BK, 2>, Tensor<BK, 2>) {
        let (xs, ys): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            items.iter().map(|&i| common::sample(i)).unzip();
        let n = items.len();
        (
            Tensor::from_data(TensorData::new(xs.concat(), [n, D_IN]), device),
            Tensor::from_data(TensorData::new(ys.concat(), [n, D_OUT]), device),
        )
    }
}

/// Trains 2 epochs of 6 batches; with `stop_at = Some((epoch, batch))` it saves there and
/// returns early, with `resume_from` it loads first and continues.
fn run(stop_at: Option<(u64, usize)>, resume_from: Option<&Path>, save_to: &Path) -> Vec<Vec<f32>> {
    let mut fabric = new_fabric(1, "32-true");
    fabric.seed_everything(7);
    let device = *fabric.device();
    let (mut model, mut optim) = fabric
        .setup(Mlp::<B>::deterministic(&device), AdamConfig::new().init())
        .unwrap();
    let mut loader = fabric
        .setup_dataloader(
            DataLoader::new(InMemDataset::new((0..24).collect::<Vec<usize>>()), Rows)
                .batch_size(4)
                .shuffle(true),
        )
        .unwrap();
    let (mut epoch, mut done) = (0u64, 0usize);
    if let Some(path) = resume_from {
        fabric
            .load(
                path,
                Restore::new()
                    .module("model", &mut model)
                    .optimizer("optim", &mut optim)
                    .value("epoch", &mut epoch)
                    .value("batch", &mut done),
            )
            .unwrap();
        println!("resumed from epoch {epoch} step {done}");
    }
    while epoch < 2 {
        loader.set_epoch(epoch);
        for (i, (x, y)) in loader.iter().enumerate().skip(done) {
            if stop_at == Some((epoch, i)) {
                fabric
                    .save(
                        save_to,
                        Checkpoint::new()
                            .module("model", &model)
                            .optimizer("optim", &optim)
                            .value("epoch", &epoch)
                            .value("batch", &i),
                    )
                    .unwrap();
                return params(&model);
            }
            let loss = (model.forward(x) - y).powi_scalar(2).mean();
            fabric.backward(loss, &model).unwrap();
            model = optim.step(0.01, model).unwrap();
        }
        done = 0;
        epoch += 1;
    }
    params(&model)
}

#[test]
fn resuming_mid_epoch_matches_the_uninterrupted_run() {
    let dir = temp_dir("resume");
    let path = dir.join("mid.ckpt");
    let uninterrupted = run(None, None, &path);
    run(Some((0, 3)), None, &path);
    let resumed = run(None, Some(&path), &path);
    assert_eq!(resumed, uninterrupted);
    let _ = std::fs::remove_dir_all(&dir);
}

const CHILD: &str = "FABRIC_CKPT_CHILD";

/// Saves in a loop (the child of `a_killed_save_never_leaves_a_partial_file`).
#[test]
fn save_in_a_loop_until_killed() {
    let Some(dir) = std::env::var_os(CHILD) else {
        return;
    };
    let path = Path::new(&dir).join("loop.ckpt");
    let fabric = new_fabric(1, "32-true");
    let device = *fabric.device();
    // ~4 MB of parameters so each save takes a while
    let model = burn::nn::LinearConfig::new(1024, 1024).init::<B>(&device);
    for step in 0u64.. {
        fabric
            .save(
                &path,
                Checkpoint::new()
                    .module("model", &model)
                    .value("step", &step),
            )
            .unwrap();
    }
}

#[test]
fn a_killed_save_never_leaves_a_partial_file() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let dir = temp_dir("kill");
    let path = dir.join("loop.ckpt");
    let exe = std::env::current_exe().unwrap();
    let mut seed = 99u64;
    let mut loads = 0;
    for round in 0..25 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "checkpoint::save_in_a_loop_until_killed",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD, &dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        std::thread::sleep(Duration::from_millis(150 + (seed >> 33) % 400));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if path.exists() {
            let fabric = new_fabric(1, "32-true");
            let mut model = burn::nn::LinearConfig::new(1024, 1024).init::<B>(fabric.device());
            let mut step = u64::MAX;
            let mut fabric = fabric;
            fabric
                .load(
                    &path,
                    Restore::new()
                        .module("model", &mut model)
                        .value("step", &mut step),
                )
                .unwrap_or_else(|e| {
                    panic!("round {round}: the checkpoint under the final name is damaged: {e}")
                });
            assert_ne!(step, u64::MAX);
            loads += 1;
        }
    }
    assert!(loads >= 20, "only {loads} rounds reached a first save");
    // loading removed any temporary the kills left behind
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "loop.ckpt")
        .collect();
    assert!(leftovers.is_empty(), "stale files: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn schedulers_and_loader_epochs_round_trip() {
    use burn::lr_scheduler::LrScheduler;
    use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
    let dir = temp_dir("sched");
    let path = dir.join("sched.ckpt");
    let mut fabric = new_fabric(1, "32-true");
    let mut scheduler = CosineAnnealingLrSchedulerConfig::new(0.1, 20)
        .init()
        .unwrap();
    for _ in 0..7 {
        scheduler.step();
    }
    let mut loader = fabric
        .setup_dataloader(
            DataLoader::<B, _, _>::new(InMemDataset::new((0..8).collect::<Vec<usize>>()), Rows)
                .batch_size(2),
        )
        .unwrap();
    loader.iter().count();
    loader.iter().count();
    assert_eq!(loader.next_epoch(), 2);
    fabric
        .save(
            &path,
            Checkpoint::new()
                .scheduler::<B, _>("lr", &scheduler)
                .loader("train", &loader),
        )
        .unwrap();
    let expected: Vec<f64> = (0..5).map(|_| scheduler.step()).collect();

    let mut fresh = CosineAnnealingLrSchedulerConfig::new(0.1, 20)
        .init()
        .unwrap();
    let mut fresh_loader = fabric
        .setup_dataloader(
            DataLoader::<B, _, _>::new(InMemDataset::new((0..8).collect::<Vec<usize>>()), Rows)
                .batch_size(2),
        )
        .unwrap();
    fabric
        .load(
            &path,
            Restore::new()
                .scheduler("lr", &mut fresh)
                .loader("train", &mut fresh_loader),
        )
        .unwrap();
    let resumed: Vec<f64> = (0..5).map(|_| fresh.step()).collect();
    assert_eq!(resumed, expected);
    assert_eq!(fresh_loader.next_epoch(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two identical runs (2 ranks, Adam, a model whose own `ParamId`s are random each time) write
/// byte-identical checkpoints: ids come from the setup order, and records' maps are sorted.
#[test]
fn identical_runs_write_identical_checkpoints() {
    let dir = temp_dir("identical");
    let run = |name: &str| {
        let path = dir.join(name);
        let mut fabric = new_fabric(2, "32-true");
        fabric
            .launch(|fabric| {
                let device = *fabric.device();
                // Fresh random ParamIds on every call: only Fabric's ids can make runs agree.
                let model = Mlp::<B>::deterministic(&device).map(&mut FreshIds);
                let (model, mut optim) = fabric.setup(model, AdamConfig::new().init())?;
                let model = train_steps(fabric, model, &mut optim, 0..3);
                let step = 3u64;
                fabric.save(
                    &path,
                    Checkpoint::new()
                        .module("model", &model)
                        .optimizer("optimizer", &optim)
                        .value("step", &step),
                )?;
                Ok::<_, FabricError>(())
            })
            .unwrap();
        std::fs::read(dir.join(name)).unwrap()
    };
    let first = run("a.ckpt");
    let second = run("b.ckpt");
    assert!(first == second, "the two checkpoints differ");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Gives every parameter a new random id.
struct FreshIds;

impl burn::module::ModuleMapper<B> for FreshIds {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        burn::module::Param::from_mapped_value(burn::module::ParamId::new(), tensor, mapper)
    }
}
