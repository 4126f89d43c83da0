//! Smoke test of the memory example: a small stack trains under each strategy, on both autodiff
//! checkpointing choices, and reports its parameter count.

#[path = "../../examples/fsdp_memory.rs"]
#[allow(dead_code)]
mod example;

use burn::backend::Autodiff;
use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use clap::Parser;
use example::{Args, train};

#[test]
fn a_small_stack_trains_under_every_strategy() {
    for strategy in ["ddp", "zero2", "fsdp", "fsdp_shard_grad_op"] {
        let args = Args::parse_from([
            "fsdp_memory",
            "--devices",
            "2",
            "--strategy",
            strategy,
            "--layers",
            "3",
            "--width",
            "8",
            "--steps",
            "2",
        ]);
        let plain = crate::exclusive(|| train::<Autodiff<Flex>>(&args));
        assert_eq!(plain.unwrap(), (3 * (64 + 8), 0));
        let released = crate::exclusive(|| train::<Autodiff<Flex, BalancedCheckpointing>>(&args));
        let released = released.unwrap();
        assert_eq!(released, (3 * (64 + 8), 0), "{strategy}");
    }
}
