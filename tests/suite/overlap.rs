//! DDP averages the gradients of each `burn_fabric::unit` on a communication thread while the
//! rest of backward runs, and still trains the model one rank trains on the full batch.
//!
//! Tolerance: the DDP tests' (|ddp - single| <= 1e-6 + 1e-5 * |single|). The model covers the
//! awkward cases: a block used by two units (two gradients for one parameter), a bias also used
//! outside its unit (part of its gradient reaches it after backward), a head outside any unit,
//! gradient accumulation under `no_backward_sync`, and buckets small enough that each unit's
//! parameters travel on their own.

use crate::common;

use burn::module::Module;
use burn::nn::Linear;
use burn::optim::AdamConfig;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_fabric::{Fabric, FabricError};
use common::{B, batch, worst_ratio};

const BATCH: usize = 24;
const STEPS: usize = 8;

#[derive(Module, Debug)]
struct Tower<B: Backend> {
    blocks: Vec<Linear<B>>,
    head: Linear<B>,
}

impl<B: Backend> Tower<B> {
    fn deterministic(device: &B::Device) -> Self {
        let linear = |din, dout, salt| common::linear(din, dout, salt, device);
        Tower {
            blocks: vec![linear(8, 7, 0.0), linear(7, 7, 1.0), linear(7, 5, 2.0)],
            head: linear(5, 3, 3.0),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let block = |x, i: usize| {
            burn_fabric::unit(&self.blocks[i], x, |b: &Linear<B>, x| {
                burn::tensor::activation::tanh(b.forward(x))
            })
        };
        let x = block(x, 0);
        // Block 1 runs twice: its parameters get the gradients of two units.
        let x = block(block(x, 1), 1);
        let x = block(x, 2);
        // Block 0's bias is also used outside its unit.
        let bias = self.blocks[0].bias.as_ref().map(|b| b.val().sum());
        let out = self.head.forward(x);
        match bias {
            Some(bias) => out + bias.unsqueeze::<2>().mul_scalar(0.1),
            None => out,
        }
    }
}

/// Rank 0's parameters after `STEPS` Adam steps on `devices` ranks, each step over `micro`
/// micro-batches; whether the rank's communication thread ran.
fn train(strategy: &str, devices: usize, micro: usize) -> (Vec<Vec<f32>>, bool) {
    let mut fabric = Fabric::<B>::builder()
        .devices(devices)
        .strategy(strategy)
        // About one unit's parameters per bucket.
        .bucket_bytes(200)
        .overlap_backward(true)
        .env(burn_fabric::EnvVars::default())
        .build()
        .unwrap();
    fabric
        .launch(|fabric| -> Result<(Vec<Vec<f32>>, bool), FabricError> {
            let device = *fabric.device();
            let (mut model, mut optimizer) =
                fabric.setup(Tower::deterministic(&device), AdamConfig::new().init())?;
            let per_rank = BATCH / fabric.world_size();
            let per_micro = per_rank / micro;
            for step in 0..STEPS {
                for m in 0..micro {
                    let start = step * BATCH + fabric.global_rank() * per_rank + m * per_micro;
                    let (x, y) = batch::<B>(start, per_micro, &device);
                    let out = fabric.forward(&model, x, |m, x| m.forward(x));
                    let loss = (out - y).powi_scalar(2).mean().div_scalar(micro as f64);
                    fabric.no_backward_sync(m + 1 < micro, |f| f.backward(loss, &model))?;
                }
                model = optimizer.step(0.01, model)?;
            }
            let thread = format!("fabric-comm-{}", fabric.global_rank());
            Ok((common::params(&model), comm_thread_named(&thread)))
        })
        .unwrap()
}

/// Whether a thread of this process is named `name` (Linux names threads in /proc).
fn comm_thread_named(name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
    })
}

#[test]
fn overlapped_ddp_trains_like_one_rank() {
    let (single, _) = train("single_device", 1, 1);
    let start = common::params(&Tower::<B>::deterministic(&Default::default()));
    assert!(
        worst_ratio(&single, &start, 1e-5, 1e-6) > 100.0,
        "training moved nothing"
    );
    for (devices, micro) in [(2, 1), (4, 1), (2, 2), (3, 2)] {
        let (ddp, overlapped) = train("ddp", devices, micro);
        let ratio = worst_ratio(&ddp, &single, 1e-5, 1e-6);
        assert!(
            ratio <= 1.0,
            "ddp {devices} ranks, {micro} micro-batches: {ratio:.3} x the tolerance"
        );
        if cfg!(target_os = "linux") {
            assert!(
                overlapped,
                "ddp {devices} ranks: no communication thread ran"
            );
        }
    }
}
