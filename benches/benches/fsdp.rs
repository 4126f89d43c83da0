//! FSDP against DDP, step time at 2 ranks measured side by side (rounds of DDP, `fsdp` and
//! `fsdp_shard_grad_op` back to back, rotating which goes first). Goal: fsdp ≤ 1.3 × DDP (FSDP
//! moves 1.5× DDP's bytes: an all-gather of the parameters and a reduce-scatter of the
//! gradients, where DDP all-reduces). Then fsdp overlapping its communication (forward prefetch:
//! a unit starts the next unit's gathers before it runs; overlapped backward: a unit's
//! reduce-scatter travels while backward goes on) ÷ fsdp without, side by side. The memory rows
//! are `cargo xtask bench`'s, measured on processes.
//!
//! `cargo bench -p fabric-benches --bench fsdp [-- --quick]`

use fabric_benches::report::{self, Goal, Row};
use fabric_benches::{
    DEEP_MLP, MNIST_MLP, OVERLAP, PREFETCH, Shape, fabric_with, median, rotate_rounds,
    step_time_ratios, switched,
};

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
    rows.push(prefetch("MLP 784-1024-1024-10", MNIST_MLP, steps, rounds));
    rows.push(prefetch("MLP 256-512x9-10", DEEP_MLP, steps, rounds));
    report::record("fsdp", &rows);
}

/// fsdp's step time with forward prefetch and overlapped backward ÷ without, 2 thread ranks,
/// rounds alternating.
fn prefetch(label: &str, shape: Shape, steps: u64, rounds: usize) -> Row {
    const GLOBAL_BATCH: usize = 64;
    let fsdp = |on: bool| {
        let measured = switched(&PREFETCH, on, || {
            switched(&OVERLAP, on, || {
                fabric_with(shape, GLOBAL_BATCH, 2, steps, "fsdp").expect("fsdp")
            })
        });
        median(&measured.times).as_secs_f64()
    };
    let (with, without) = (|| fsdp(true), || fsdp(false));
    let results = rotate_rounds(rounds, [&with, &without]);
    let ratios: Vec<f64> = results.iter().map(|t| t[0] / t[1]).collect();
    let note = format!(
        "2 thread ranks, Adam, global batch {GLOBAL_BATCH}, median of {steps} steps × {rounds} rounds"
    );
    let row = Row::from_rounds(
        "FSDP speed",
        &format!("{label}: fsdp overlapping gathers and scatters ÷ not, step time"),
        &ratios,
        None,
        note,
    );
    report::print_table(std::slice::from_ref(&row));
    row
}
