//! With several ranks rank 0 materialises a lazily built model (Burn's `Module::init`), drawing
//! from the seeded RNG in visit order, before any other rank draws (under FSDP one parameter at a
//! time, cut into shards; the other ranks never draw): the model is the one a single rank
//! initialises, at every world size and under every strategy. Were the ranks' draws interleaved
//! in the process's one generator, the model would depend on thread timing.
//!
//! A test binary of its own: the RNG is global to the process, so tests running beside it in
//! another binary's threads would draw from it between the seed and the initialisation.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn_fabric::{Fabric, FabricError};
use common::B;

#[derive(Module, Debug)]
struct Stack<B: burn::tensor::backend::Backend> {
    blocks: Vec<Linear<B>>,
    head: Linear<B>,
}

/// The whole parameters right after `setup` of a freshly (lazily) initialised stack under
/// `strategy` on `devices` ranks, after `seed_everything(7)`.
fn initial_stack(strategy: &str, devices: usize) -> Vec<Vec<f32>> {
    let mut fabric = Fabric::<B>::builder()
        .devices(devices)
        .strategy(strategy)
        .env(burn_fabric::EnvVars::default())
        .build()
        .unwrap();
    fabric.seed_everything(7);
    fabric
        .launch(|fabric| -> Result<Vec<Vec<f32>>, FabricError> {
            let device = *fabric.device();
            let lazy = Stack {
                blocks: (0..3)
                    .map(|_| LinearConfig::new(6, 6).init(&device))
                    .collect(),
                head: LinearConfig::new(6, 3).init(&device),
            };
            let model = fabric.setup_module(lazy)?;
            Ok(common::params(&fabric.gathered(&model)?))
        })
        .unwrap()
}

#[test]
fn a_lazily_built_model_is_placed_shard_by_shard_and_is_the_same_at_every_world_size() {
    let one = initial_stack("fsdp", 1);
    assert_eq!(
        one,
        initial_stack("ddp", 1),
        "as plain setup initialises it"
    );
    for devices in [2, 3, 4] {
        for strategy in ["fsdp", "ddp", "zero2"] {
            assert_eq!(
                initial_stack(strategy, devices),
                one,
                "{strategy}, {devices} ranks"
            );
        }
    }
}
