//! Peak memory of one training job on a stack of equal layers, for comparing strategies: each
//! layer is an FSDP unit (`burn_fabric::unit`), the optimizer is Adam, the data random. Prints
//! the resolved configuration, the parameter count and each process's peak resident memory
//! (`VmHWM`, every rank of the process together), one line per process:
//! `process P: peak resident memory M MiB`.
//!
//! ```text
//! cargo run --example fsdp_memory -- --devices 2 --strategy fsdp --layers 8 --width 1024
//! cargo run --example fsdp_memory -- --devices 2 --strategy fsdp --release-gathered
//! fabric run --num-nodes 4 -- target/debug/examples/fsdp_memory --strategy fsdp   # processes
//! ```
//!
//! `--release-gathered` trains on `Autodiff<Flex, BalancedCheckpointing>`, under which `fsdp`
//! (full_shard) releases each unit's gathered parameters after its forward and gathers them
//! again for its backward.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::AdamConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use burn_fabric::{BackendDevices, Fabric, FabricError};
use clap::Parser;
use std::error::Error;

/// Peak memory of training a stack of equal layers under a strategy.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    /// Ranks (threads) per process [default: 2, or `fabric run`'s `--devices`]
    #[arg(long)]
    pub devices: Option<usize>,
    /// Strategy (`ddp`, `zero2`, `fsdp`, `fsdp_shard_grad_op`, ...)
    #[arg(long, default_value = "fsdp")]
    pub strategy: String,
    /// Layers of the stack
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Width of every layer
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Samples per rank and step
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Optimizer steps
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Train on `Autodiff<Flex, BalancedCheckpointing>` (gathered parameters released after
    /// each unit's forward under `fsdp`)
    #[arg(long)]
    pub release_gathered: bool,
    /// Overlap communication with compute: a unit starts the next unit's gathers before it
    /// runs, and its reduce-scatter travels while backward goes on
    #[arg(long)]
    pub overlap: bool,
}

/// Equal layers, each an FSDP unit.
#[derive(Module, Debug)]
pub struct Stack<B: Backend> {
    layers: Vec<Linear<B>>,
}

impl<B: Backend> Stack<B> {
    fn new(layers: usize, width: usize, device: &B::Device) -> Self {
        let layers = (0..layers)
            .map(|_| LinearConfig::new(width, width).init(device))
            .collect();
        Self { layers }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut x = x;
        for layer in &self.layers {
            x = burn_fabric::unit(layer, x, |layer, x| {
                burn::tensor::activation::tanh(layer.forward(x))
            });
        }
        x
    }
}

/// The peak resident memory of this process in MiB (`VmHWM`), if the system reports it.
fn peak_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Trains `args.steps` steps and returns the parameter count and this process's index; prints
/// the mean time of the steps after the first.
pub fn train<B: AutodiffBackend + BackendDevices>(
    args: &Args,
) -> Result<(usize, usize), FabricError> {
    let mut builder = Fabric::<B>::builder()
        .strategy(args.strategy.as_str())
        .forward_prefetch(args.overlap)
        .overlap_backward(args.overlap);
    match (args.devices, std::env::var_os("LT_DEVICES")) {
        (Some(devices), _) => builder = builder.devices(devices),
        (None, None) => builder = builder.devices(2),
        (None, Some(_)) => {}
    }
    let mut fabric = builder.build()?;
    fabric.print(fabric.describe());
    let node = fabric.node_rank();
    fabric.launch(|fabric| -> Result<(usize, usize), FabricError> {
        let device = fabric.device().clone();
        let model = Stack::<B>::new(args.layers, args.width, &device);
        let params = fabric_examples::gpt::count_params(&model);
        let (mut model, mut optimizer) = fabric.setup(model, AdamConfig::new().init())?;
        let mut started = std::time::Instant::now();
        for step in 0..args.steps {
            if step == 1 {
                started = std::time::Instant::now();
            }
            let x =
                Tensor::<B, 2>::random([args.batch, args.width], Distribution::Default, &device);
            let out = fabric.forward(&model, x, |m, x| m.forward(x));
            fabric.backward(out.powi_scalar(2).mean(), &model)?;
            model = optimizer.step(1e-3, model)?;
        }
        if args.steps > 1 {
            let mean_ms = started.elapsed().as_secs_f64() * 1e3 / (args.steps - 1) as f64;
            fabric.print(format!("mean step (after the first): {mean_ms:.1} ms"));
        }
        Ok((params, node))
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let (params, node) = match args.release_gathered {
        true => train::<Autodiff<burn::backend::Flex, BalancedCheckpointing>>(&args)?,
        false => train::<Autodiff<burn::backend::Flex>>(&args)?,
    };
    let peak = peak_mib().map_or("unknown".into(), |p| format!("{p:.0} MiB"));
    if node == 0 {
        println!("parameters: {params}  steps: {}", args.steps);
    }
    println!("process {node}: peak resident memory {peak}");
    Ok(())
}
