//! FSDP against DDP, step time at 2 ranks measured side by side (rounds of DDP, `fsdp` and
//! `fsdp_shard_grad_op` back to back, rotating which goes first). Goal: fsdp ≤ 1.3 × DDP (FSDP
//! moves 1.5× DDP's bytes: an all-gather of the parameters and a reduce-scatter of the
//! gradients, where DDP all-reduces). The memory rows are `cargo xtask bench`'s, measured on
//! processes.
//!
//! `cargo bench -p fabric-benches --bench fsdp [-- --quick]`

use fabric_benches::report::{self, Goal};
use fabric_benches::{DEEP_MLP, MNIST_MLP, step_time_ratios};

const STRATEGIES: [&str; 3] = ["ddp", "fsdp", "fsdp_shard_grad_op"];

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (steps, rounds) = if quick { (10, 3) } else { (30, 7) };
    let goal = Some(Goal::AtMost(1.3));
    let measure = |label, shape| {
        step_time_ratios(
            "FSDP speed",
            label,
            shape,
            STRATEGIES,
            (steps, rounds),
            goal,
        )
    };
    let mut rows = measure("MLP 784-1024-1024-10", MNIST_MLP);
    rows.extend(measure("MLP 256-512x9-10", DEEP_MLP));
    report::record("fsdp", &rows);
}
