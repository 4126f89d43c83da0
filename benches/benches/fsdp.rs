//! FSDP against DDP, step time at 2 ranks measured side by side (rounds of DDP, `fsdp` and
//! `fsdp_shard_grad_op` back to back, rotating which goes first). Goal: fsdp ≤ 1.3 × DDP (FSDP
//! moves 1.5× DDP's bytes: an all-gather of the parameters and a reduce-scatter of the
//! gradients, where DDP all-reduces). The memory rows are `cargo xtask bench`'s, measured on
//! processes.
//!
//! `cargo bench -p fabric-benches --bench fsdp [-- --quick]`

use fabric_benches::report::{self, Goal, Row};
use fabric_benches::{DEEP_MLP, MNIST_MLP, Shape, fabric_with, median, rotate_rounds};

const GLOBAL_BATCH: usize = 64;
const STRATEGIES: [&str; 3] = ["ddp", "fsdp", "fsdp_shard_grad_op"];

fn speed(label: &str, shape: Shape, steps: u64, rounds: usize) -> Vec<Row> {
    let run = |strategy: &'static str| {
        move || {
            let measured = fabric_with(shape, GLOBAL_BATCH, 2, steps, strategy).expect(strategy);
            median(&measured.times).as_secs_f64()
        }
    };
    let (ddp, full, grad_op) = (run(STRATEGIES[0]), run(STRATEGIES[1]), run(STRATEGIES[2]));
    let results = rotate_rounds(rounds, [&ddp, &full, &grad_op]);
    let note = format!(
        "2 thread ranks, Adam, global batch {GLOBAL_BATCH}, median of {steps} steps × {rounds} rounds"
    );
    let rows: Vec<Row> = (1..STRATEGIES.len())
        .map(|i| {
            let ratios: Vec<f64> = results.iter().map(|t| t[i] / t[0]).collect();
            let name = format!("{label}: {} ÷ DDP step time", STRATEGIES[i]);
            Row::from_rounds("FSDP speed", &name, &ratios, Some(Goal::AtMost(1.3)), note.clone())
        })
        .collect();
    println!("\n{label}: step time at 2 ranks ÷ DDP's, {note}");
    report::print_table(&rows);
    rows
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (steps, rounds) = if quick { (10, 3) } else { (30, 7) };
    let mut rows = speed("MLP 784-1024-1024-10", MNIST_MLP, steps, rounds);
    rows.extend(speed("MLP 256-512x9-10", DEEP_MLP, steps, rounds));
    report::record("fsdp", &rows);
}
