//! ZeRO against DDP: optimizer-state bytes per rank at world sizes 1, 2 and 4 (goal: the largest
//! rank's ≤ 1/N of DDP's + 5%), and step time at 2 ranks measured side by side (rounds of DDP,
//! zero1 and zero2 back to back, rotating which goes first).
//!
//! `cargo bench -p fabric-benches --bench zero [-- --quick]`

use fabric_benches::report::{self, Goal, Row};
use fabric_benches::{DEEP_MLP, MNIST_MLP, Shape, fabric_with, step_time_ratios};

const GLOBAL_BATCH: usize = 64;
const STRATEGIES: [&str; 3] = ["ddp", "zero1", "zero2"];

fn memory(label: &str, shape: Shape, with_goal: bool) -> Vec<Row> {
    println!("\n{label}: optimizer state (Adam) per rank, largest rank ÷ DDP's");
    println!(
        "| world size | DDP bytes/rank | zero1 | zero2 | goal (1/N + 5%) |\n|---|---|---|---|---|"
    );
    let mut rows = Vec::new();
    for world in [1, 2, 4] {
        let largest = |strategy| {
            let measured = fabric_with(shape, GLOBAL_BATCH, world, 1, strategy).expect(strategy);
            measured.state_bytes.iter().copied().max().unwrap_or(0)
        };
        let ddp = largest("ddp");
        let goal = 1.0 / world as f64 + 0.05;
        let mut cells = vec![format!("{ddp}")];
        for strategy in &STRATEGIES[1..] {
            let ratio = largest(strategy) as f64 / ddp.max(1) as f64;
            cells.push(format!("{ratio:.3}"));
            // Without a goal the row only illustrates the limit: zero2's is enough.
            if world > 1 && (with_goal || *strategy == "zero2") {
                rows.push(Row::single(
                    "ZeRO memory",
                    &format!("{label}: {strategy} ÷ DDP optimizer state, largest of {world} ranks"),
                    ratio,
                    with_goal.then_some(Goal::AtMost(goal)),
                    format!("Adam state serialised, global batch {GLOBAL_BATCH}"),
                ));
            }
        }
        println!("| {world} | {} | {goal:.3} |", cells.join(" | "));
    }
    rows
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut rows = memory("MLP 256-512x9-10 (20 tensors)", DEEP_MLP, true);
    // One tensor is 56% of this model and tensors are not split: no 1/N goal.
    rows.extend(memory("MLP 784-1024-1024-10", MNIST_MLP, false));
    let rounds = if quick { 3 } else { 7 };
    rows.extend(step_time_ratios(
        "ZeRO speed",
        "MLP 256-512x9-10",
        DEEP_MLP,
        STRATEGIES,
        (if quick { 10 } else { 30 }, rounds),
        None,
    ));
    report::record("zero", &rows);
}
