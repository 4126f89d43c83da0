//! The backend matrix: one backend-generic suite, instantiated for every backend this build has
//! (Flex and NdArray always; LibTorch, Wgpu and Cuda with the `tch`, `wgpu` and `cuda`
//! features). A backend whose driver or device is missing on this machine is skipped with the
//! reason printed (and the typed error checked); one not compiled in is listed as skipped by
//! `backends_not_compiled_in`.
//!
//! `cargo test --release --test backends --features tch,wgpu,cuda` (LibTorch needs `LIBTORCH`).
//!
//! Tolerances: DDP on 2 ranks against 1 rank on the full batch, after 8 Adam steps,
//! |ddp - single| <= atol + rtol |single| with (atol, rtol) = (1e-6, 1e-5) on CPU backends and
//! (1e-5, 1e-4) on GPU backends, whose kernels may sum in another order per batch size.

mod common;

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use burn_fabric::fabric_strategies::CollectParams;
use burn_fabric::{
    BackendDevices, Checkpoint, DevicePool, Fabric, FabricError, FusedAdamConfig, ReduceOp, Restore,
};
use common::{Mlp, batch, worst_ratio};

const STEPS: usize = 8;
const BATCH: usize = 16;

/// A Fabric for `devices` ranks with `precision`, or `None` (reason printed) if this machine
/// cannot run the backend.
fn fabric<B: AutodiffBackend + BackendDevices>(
    devices: usize,
    strategy: &str,
    precision: &str,
) -> Result<Option<Fabric<B>>, FabricError> {
    let built = Fabric::<B>::builder()
        .devices(devices)
        .strategy(strategy)
        .precision(precision)
        .env(burn_fabric::EnvVars::default())
        .build();
    match built {
        Err(err @ FabricError::DriverUnavailable { .. }) => {
            assert!(err.to_string().contains(B::backend_name()), "{err}");
            println!("skipped on `{}`: {err}", B::backend_name());
            Ok(None)
        }
        // A machine with one GPU runs the one-rank parts only.
        Err(err @ FabricError::TooManyDevices { .. }) if devices > 1 => {
            println!("skipped {devices} ranks on `{}`: {err}", B::backend_name());
            Ok(None)
        }
        other => other.map(Some),
    }
}

/// Every float parameter as f32, in visit order.
fn params<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> Vec<Vec<f32>> {
    let mut collect = CollectParams::<B>::default();
    model.visit(&mut collect);
    collect
        .values
        .into_iter()
        .map(|t| t.into_data().convert::<f32>().to_vec().unwrap())
        .collect()
}

/// Rank 0's parameters (as f32), their dtype, and the loss of every step.
type Trained = (Vec<Vec<f32>>, DType, Vec<f32>);

/// Trains the common MLP for `STEPS` Adam steps on `devices` ranks (global batch `BATCH`) and
/// returns rank 0's parameters, the parameters' dtype and the losses; checks that every rank
/// ends with the same model.
fn train<B: AutodiffBackend + BackendDevices>(
    devices: usize,
    precision: &str,
) -> Result<Option<Trained>, FabricError> {
    train_with::<B, _, _>(devices, "auto", precision, || AdamConfig::new().init())
}

/// [`train`] with the optimizer `optimizer()` makes on each rank.
fn train_with<B, O, F>(
    devices: usize,
    strategy: &str,
    precision: &str,
    optimizer: F,
) -> Result<Option<Trained>, FabricError>
where
    B: AutodiffBackend + BackendDevices,
    O: Optimizer<Mlp<B>, B>,
    F: Fn() -> O + Sync,
{
    let Some(mut fabric) = fabric::<B>(devices, strategy, precision)? else {
        return Ok(None);
    };
    let out = fabric.launch(|fabric| {
        let device = fabric.device().clone();
        let model = Mlp::<B>::deterministic(&device);
        let (mut model, mut optimizer) = fabric.setup(model, optimizer())?;
        let per_rank = BATCH / fabric.world_size();
        let mut losses = Vec::new();
        for step in 0..STEPS {
            let start = step * BATCH + fabric.global_rank() * per_rank;
            let (x, y) = batch::<B>(start, per_rank, &device);
            let out = fabric.forward(&model, x, |m, x| m.forward(x));
            let loss = (out - y).powi_scalar(2).mean();
            losses.push(loss.clone().into_scalar().elem::<f32>());
            fabric.backward(loss, &model)?;
            model = optimizer.step(1e-2, model)?;
        }
        let mine = params::<B, _>(&fabric.gathered(&model)?);
        let flat: Vec<f32> = mine.concat();
        let n = flat.len();
        let local = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(flat, [n]), &device);
        let all: Tensor<B::InnerBackend, 2> = fabric.all_gather(local)?;
        let all = all.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        for rank in 1..fabric.world_size() {
            assert_eq!(
                all[rank * n..(rank + 1) * n],
                all[..n],
                "rank {rank} differs"
            );
        }
        Ok::<_, FabricError>((mine, model.l1.weight.val().dtype(), losses))
    })?;
    Ok(Some(out))
}

/// FSDP on this backend: shards gathered and gradients reduce-scattered by the gather's
/// autodiff operation on this backend's tensors, through the host for CPU backends and on the
/// devices for Wgpu (two ranks sharing its device: the fused engine) and Cuda (NCCL); within
/// the DDP tolerance of one rank.
fn fsdp_equals_one_rank<B: AutodiffBackend + BackendDevices>(atol: f32, rtol: f32) {
    if let Some(fabric) = fabric::<B>(2, "fsdp", "32-true").unwrap() {
        let line = fabric.describe();
        // Wgpu's ranks share its one device here (several discrete adapters: one each).
        let accelerator = B::accelerators()[0];
        let shared = matches!(B::device_pool(accelerator), Ok(DevicePool::Shared(_)));
        let expected = match B::backend_name() {
            "wgpu" => shared,
            name => name == "cuda",
        };
        assert_eq!(line.contains(" gradient_sync="), expected, "{line}");
    }
    let adam = || AdamConfig::new().init();
    let Some((single, _, _)) = train_with::<B, _, _>(1, "auto", "32-true", adam).unwrap() else {
        return;
    };
    let Some((fsdp, _, losses)) = train_with::<B, _, _>(2, "fsdp", "32-true", adam).unwrap() else {
        return;
    };
    let ratio = worst_ratio(&fsdp, &single, rtol, atol);
    assert!(
        ratio <= 1.0,
        "{}: {ratio:.3} x tolerance",
        B::backend_name()
    );
    assert!(losses.last() < losses.first(), "did not learn: {losses:?}");
}

fn ddp_equals_one_rank<B: AutodiffBackend + BackendDevices>(atol: f32, rtol: f32) {
    let Some((single, _, _)) = train::<B>(1, "32-true").unwrap() else {
        return;
    };
    let Some((ddp, _, losses)) = train::<B>(2, "32-true").unwrap() else {
        return;
    };
    let ratio = worst_ratio(&ddp, &single, rtol, atol);
    assert!(
        ratio <= 1.0,
        "{}: {ratio:.3} x tolerance",
        B::backend_name()
    );
    assert!(losses.last() < losses.first(), "did not learn: {losses:?}");
}

/// `FusedAdam` (one pass per parameter on Flex and LibTorch; Burn's Adam elsewhere) trains to
/// the same parameters as Burn's Adam on 1 and 2 ranks: bit for bit, except on LibTorch, whose
/// kernels for Burn's Adam operations round some elements differently from one IEEE operation
/// at a time (the fused loop's arithmetic, which equals Flex's); there within 1e-6 + 1e-5 |x|.
fn fused_adam_equals_adam<B: AutodiffBackend + BackendDevices>() {
    for devices in [1, 2] {
        let Some((adam, _, _)) = train::<B>(devices, "32-true").unwrap() else {
            return;
        };
        let fused = train_with::<B, _, _>(devices, "auto", "32-true", || {
            FusedAdamConfig::new().init::<B, Mlp<B>>()
        });
        let (fused, _, losses) = fused.unwrap().expect("the backend ran Adam");
        if B::backend_name() == "tch" {
            let ratio = worst_ratio(&fused, &adam, 1e-5, 1e-6);
            assert!(
                ratio <= 1.0,
                "tch on {devices} rank(s): {ratio:.3} x tolerance"
            );
        } else {
            assert_eq!(fused, adam, "{} on {devices} rank(s)", B::backend_name());
        }
        assert!(losses.last() < losses.first(), "did not learn: {losses:?}");
    }
}

fn collectives<B: AutodiffBackend + BackendDevices>() {
    let Some(mut fabric) = fabric::<B>(2, "auto", "32-true").unwrap() else {
        return;
    };
    fabric
        .launch(|fabric| {
            let device = fabric.device().clone();
            let rank = fabric.global_rank() as f32;
            let x =
                Tensor::<B, 1>::from_data(TensorData::new(vec![rank, 1.0 + rank], [2]), &device);
            let sum = fabric.all_reduce(x.clone(), ReduceOp::Sum)?;
            assert_eq!(
                sum.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                [1.0, 3.0]
            );
            let max = fabric.all_reduce(x.clone(), ReduceOp::Max)?;
            assert_eq!(
                max.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                [1.0, 2.0]
            );
            let from1 = fabric.broadcast(x.clone(), 1)?;
            assert_eq!(
                from1.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                [1.0, 2.0]
            );
            let all: Tensor<B, 2> = fabric.all_gather(x)?;
            assert_eq!(all.dims(), [2, 2]);
            let ints = Tensor::<B, 1, Int>::from_data(
                TensorData::new(vec![rank as i64 + 1], [1]),
                &device,
            );
            let total = fabric.all_reduce(ints, ReduceOp::Sum)?;
            assert_eq!(
                total.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
                [3]
            );
            fabric.barrier()?;
            Ok::<_, FabricError>(())
        })
        .unwrap();
}

fn sampler<B: AutodiffBackend + BackendDevices>() {
    use burn::data::dataset::InMemDataset;
    let Some(mut fabric) = fabric::<B>(2, "auto", "32-true").unwrap() else {
        return;
    };
    let seen = fabric
        .launch(|fabric| {
            let dataset = InMemDataset::new((0..10i64).collect::<Vec<_>>());
            let loader =
                burn_fabric::DataLoader::<B::InnerBackend, _, _>::new(dataset, common::Indices)
                    .batch_size(2);
            let mut loader = fabric.setup_dataloader(loader)?;
            let mine = Tensor::cat(loader.iter().collect(), 0);
            assert_eq!(
                mine.device(),
                *fabric.device(),
                "batches on the rank's device"
            );
            let all: Tensor<B::InnerBackend, 2, Int> = fabric.all_gather(mine)?;
            Ok::<_, FabricError>(all.into_data().convert::<i64>().to_vec::<i64>().unwrap())
        })
        .unwrap();
    let mut seen = seen;
    seen.sort();
    assert_eq!(
        seen,
        (0..10).collect::<Vec<i64>>(),
        "the ranks share the data exactly"
    );
}

/// Each precision either trains (parameters in the expected dtype, loss finite and falling) or
/// is refused at configuration with an error naming the backend.
fn precisions<B: AutodiffBackend + BackendDevices>() {
    for (precision, dtype) in [
        ("64-true", DType::F64),
        ("bf16-true", DType::BF16),
        ("16-mixed", DType::F32),
        ("bf16-mixed", DType::F32),
    ] {
        match train::<B>(1, precision) {
            Ok(None) => return,
            Ok(Some((_, got, losses))) => {
                assert_eq!(got, dtype, "{precision} parameters");
                assert!(
                    losses.iter().all(|l| l.is_finite()),
                    "{precision}: {losses:?}"
                );
                assert!(losses.last() < losses.first(), "{precision}: {losses:?}");
            }
            Err(FabricError::Unsupported { what, reason }) => {
                assert!(
                    what.contains(B::backend_name()) && what.contains(precision),
                    "{what}"
                );
                println!("`{}` refuses {precision}: {reason}", B::backend_name());
            }
            Err(other) => panic!("{precision} on {}: {other}", B::backend_name()),
        }
    }
}

fn checkpoint_round_trip<B: AutodiffBackend + BackendDevices>() {
    let Some(mut fabric) = fabric::<B>(1, "auto", "32-true").unwrap() else {
        return;
    };
    let path = std::env::temp_dir().join(format!(
        "fabric-backends-{}-{}.ckpt",
        B::backend_name(),
        std::process::id()
    ));
    let device = fabric.device().clone();
    let (mut model, mut optimizer) = fabric
        .setup(Mlp::<B>::deterministic(&device), AdamConfig::new().init())
        .unwrap();
    let (x, y) = batch::<B>(0, 4, &device);
    fabric
        .backward((model.forward(x) - y).powi_scalar(2).mean(), &model)
        .unwrap();
    model = optimizer.step(1e-2, model).unwrap();
    let step = 7u64;
    let checkpoint = Checkpoint::new()
        .module("model", &model)
        .optimizer("optimizer", &optimizer)
        .value("step", &step);
    fabric.save(&path, checkpoint).unwrap();
    let (mut restored, mut restored_optimizer) = fabric
        .setup(Mlp::<B>::random(&device), AdamConfig::new().init())
        .unwrap();
    let mut restored_step = 0u64;
    let restore = Restore::new()
        .module("model", &mut restored)
        .optimizer("optimizer", &mut restored_optimizer)
        .value("step", &mut restored_step);
    fabric.load(&path, restore).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(params::<B, _>(&restored), params::<B, _>(&model));
    assert_eq!(restored_step, 7);
    assert_eq!(
        restored_optimizer.to_record().len(),
        optimizer.to_record().len(),
        "optimizer state restored"
    );
}

macro_rules! suite {
    ($name:ident, $backend:ty, $atol:expr, $rtol:expr) => {
        mod $name {
            type B = burn::backend::Autodiff<$backend>;

            #[test]
            fn ddp_on_2_ranks_equals_1_rank() {
                super::ddp_equals_one_rank::<B>($atol, $rtol);
            }

            #[test]
            fn fsdp_on_2_ranks_equals_1_rank() {
                super::fsdp_equals_one_rank::<B>($atol, $rtol);
            }

            #[test]
            fn fused_adam_equals_adam() {
                super::fused_adam_equals_adam::<B>();
            }

            #[test]
            fn collectives() {
                super::collectives::<B>();
            }

            #[test]
            fn sampler() {
                super::sampler::<B>();
            }

            #[test]
            fn precisions() {
                super::precisions::<B>();
            }

            #[test]
            fn checkpoint_round_trip() {
                super::checkpoint_round_trip::<B>();
            }
        }
    };
}

suite!(flex, burn::backend::Flex, 1e-6, 1e-5);
suite!(ndarray, burn::backend::NdArray, 1e-6, 1e-5);
#[cfg(feature = "tch")]
suite!(tch, burn::backend::LibTorch, 1e-6, 1e-5);
#[cfg(feature = "wgpu")]
suite!(wgpu, burn::backend::Wgpu, 1e-5, 1e-4);
#[cfg(feature = "cuda")]
suite!(cuda, burn::backend::Cuda, 1e-5, 1e-4);

/// Prints the backends this build skips, and checks that `DefaultBackend` is the most specific
/// backend compiled into the library (cuda, tch, wgpu, then ndarray over flex).
#[test]
fn default_backend_and_backends_not_compiled_in() {
    let compiled = [
        ("cuda", cfg!(feature = "cuda")),
        ("tch", cfg!(feature = "tch")),
        ("wgpu", cfg!(feature = "wgpu")),
    ];
    for (name, on) in compiled {
        if !on {
            println!(
                "skipped `{name}`: built without the `{name}` feature (add `--features {name}`)"
            );
        }
    }
    let cpu = if cfg!(feature = "ndarray") {
        "ndarray"
    } else {
        "flex"
    };
    let expected = compiled
        .iter()
        .find(|(_, on)| *on)
        .map_or(cpu, |(name, _)| *name);
    assert_eq!(
        <burn_fabric::DefaultBackend as BackendDevices>::backend_name(),
        expected
    );
}
