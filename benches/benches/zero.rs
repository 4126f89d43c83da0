//! ZeRO against DDP: optimizer-state bytes per rank at world sizes 1, 2 and 4 (goal: the largest
//! rank's ≤ 1/N of DDP's + 5%), and step time at 2 ranks measured side by side (rounds of DDP,
//! zero1 and zero2 back to back, rotating which goes first).
//!
//! `cargo bench -p fabric-benches --bench zero [-- --quick]`

use fabric_benches::report::{self, Goal, Row};
use fabric_benches::{DEEP_MLP, MNIST_MLP, Shape, fabric_with, median, rotate_rounds};

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

fn speed(label: &str, shape: Shape, steps: u64, rounds: usize) -> Vec<Row> {
    let run = |strategy: &'static str| {
        move || {
            let measured = fabric_with(shape, GLOBAL_BATCH, 2, steps, strategy).expect(strategy);
            median(&measured.times).as_secs_f64()
        }
    };
    let (ddp, zero1, zero2) = (run("ddp"), run("zero1"), run("zero2"));
    let results = rotate_rounds(rounds, [&ddp, &zero1, &zero2]);
    let note = format!("2 ranks, global batch {GLOBAL_BATCH}, {steps} steps × {rounds} rounds");
    let rows: Vec<Row> = (1..STRATEGIES.len())
        .map(|i| {
            let ratios: Vec<f64> = results.iter().map(|t| t[i] / t[0]).collect();
            let name = format!("{label}: {} ÷ DDP step time", STRATEGIES[i]);
            Row::from_rounds("ZeRO speed", &name, &ratios, None, note.clone())
        })
        .collect();
    println!("\n{label}: step time at 2 ranks ÷ DDP's, {note}");
    report::print_table(&rows);
    rows
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut rows = memory("MLP 256-512x9-10 (20 tensors)", DEEP_MLP, true);
    // One tensor is 56% of this model and tensors are not split: no 1/N goal.
    rows.extend(memory("MLP 784-1024-1024-10", MNIST_MLP, false));
    let rounds = if quick { 3 } else { 7 };
    rows.extend(speed(
        "MLP 256-512x9-10",
        DEEP_MLP,
        if quick { 10 } else { 30 },
        rounds,
    ));
    report::record("zero", &rows);
}
