//! A model of units for DDP's overlapped averaging and FSDP's prefetch, and its training loop.
//!
//! It covers the awkward cases: a block used by two units (two gradients for one parameter), a
//! bias also used outside its unit (part of its gradient reaches it after backward), a head
//! outside any unit.

use super::{B, Schedule, fit, params};
use burn::module::Module;
use burn::nn::Linear;
use burn::optim::AdamConfig;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_fabric::{Fabric, FabricError};

/// Samples per step, divisible by 1, 2, 3 and 4 ranks and 2 micro-batches.
pub const BATCH: usize = 24;
/// Optimizer steps.
pub const STEPS: usize = 8;

#[derive(Module, Debug)]
pub struct Tower<B: Backend> {
    blocks: Vec<Linear<B>>,
    head: Linear<B>,
}

impl<B: Backend> Tower<B> {
    /// Same values on every call and every rank.
    pub fn deterministic(device: &B::Device) -> Self {
        let linear = |din, dout, salt| super::linear(din, dout, salt, device);
        Tower {
            blocks: vec![linear(8, 7, 0.0), linear(7, 7, 1.0), linear(7, 5, 2.0)],
            head: linear(5, 3, 3.0),
        }
    }

    /// Three blocks as units (one of them twice), a head outside any unit.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
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

/// Rank 0's whole parameters after `STEPS` Adam steps of the ranks of `fabric`, each step over
/// `micro` micro-batches of `BATCH / world size` samples per rank; whether the rank's
/// communication thread (DDP's overlapped averaging, FSDP's gathers) ran.
pub fn train_tower(
    mut fabric: Fabric<B>,
    micro: usize,
) -> Result<(Vec<Vec<f32>>, bool), FabricError> {
    fabric.launch(|fabric| -> Result<(Vec<Vec<f32>>, bool), FabricError> {
        let device = *fabric.device();
        let (model, mut optimizer) =
            fabric.setup(Tower::deterministic(&device), AdamConfig::new().init())?;
        let schedule = Schedule {
            steps: STEPS,
            batch_rows: BATCH,
            micro,
            lr: 0.01,
        };
        let model = fit(fabric, model, &mut optimizer, Tower::forward, schedule)?;
        let thread = format!("fabric-comm-{}", fabric.global_rank());
        let ran = comm_thread_named(&thread);
        Ok((params(&fabric.gathered(&model)?), ran))
    })
}

/// Whether a thread of this process is named `name` (Linux names threads in /proc).
pub fn comm_thread_named(name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
    })
}
