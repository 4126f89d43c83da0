//! ZeRO against DDP: optimizer-state bytes per rank at world sizes 1, 2 and 4 (goal: the largest
//! rank's ≤ 1/N of DDP's + 5%), and step time at 2 ranks measured side by side (rounds of DDP,
//! zero1 and zero2 back to back, rotating which goes first).
//!
//! `cargo bench -p fabric-benches --bench zero [-- --quick]`

use fabric_benches::{DEEP_MLP, MNIST_MLP, Shape, fabric_with, median};

const GLOBAL_BATCH: usize = 64;
const STRATEGIES: [&str; 3] = ["ddp", "zero1", "zero2"];

fn memory(label: &str, shape: Shape) {
    println!("\n{label}: optimizer state (Adam) per rank, largest rank ÷ DDP's");
    println!(
        "| world size | DDP bytes/rank | zero1 | zero2 | goal (1/N + 5%) |\n|---|---|---|---|---|"
    );
    for world in [1, 2, 4] {
        let mut cells = Vec::new();
        let mut ddp = 0;
        for strategy in STRATEGIES {
            let measured = fabric_with(shape, GLOBAL_BATCH, world, 1, strategy).expect(strategy);
            let largest = measured.state_bytes.iter().copied().max().unwrap_or(0);
            if strategy == "ddp" {
                ddp = largest;
                cells.push(format!("{largest}"));
            } else {
                cells.push(format!("{:.3}", largest as f64 / ddp.max(1) as f64));
            }
        }
        let goal = 1.0 / world as f64 + 0.05;
        println!("| {world} | {} | {goal:.3} |", cells.join(" | "));
    }
}

fn speed(label: &str, shape: Shape, steps: u64, rounds: usize) {
    let mut ratios = vec![Vec::new(); STRATEGIES.len()];
    for round in 0..rounds {
        let mut times = [0.0; 3];
        for k in 0..STRATEGIES.len() {
            let i = (round + k) % STRATEGIES.len();
            let measured = fabric_with(shape, GLOBAL_BATCH, 2, steps, STRATEGIES[i]).expect("run");
            times[i] = median(&measured.times).as_secs_f64();
        }
        for i in 0..STRATEGIES.len() {
            ratios[i].push(times[i] / times[0]);
        }
    }
    println!(
        "\n{label}: step time at 2 ranks ÷ DDP's, global batch {GLOBAL_BATCH}, {steps} steps x {rounds} rounds"
    );
    println!("| strategy | median | range |\n|---|---|---|");
    for (name, mut values) in STRATEGIES.iter().zip(ratios).skip(1) {
        values.sort_by(f64::total_cmp);
        let (lo, hi) = (values[0], values[values.len() - 1]);
        println!(
            "| {name} | {:.3} | {lo:.3} – {hi:.3} |",
            values[values.len() / 2]
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    memory("MLP 256-512x9-10 (20 tensors)", DEEP_MLP);
    memory(
        "MLP 784-1024-1024-10 (one tensor is 56% of the model)",
        MNIST_MLP,
    );
    let rounds = if quick { 3 } else { 7 };
    speed(
        "MLP 256-512x9-10",
        DEEP_MLP,
        if quick { 10 } else { 30 },
        rounds,
    );
}
