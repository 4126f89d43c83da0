//! Ratios measured side by side: rounds that run plain Burn, Fabric on one device and Fabric
//! DDP on two devices back to back (rotating which goes first), so that drift in the machine's
//! speed hits all three alike. Each run counts its median step time; the table gives the median
//! of the per-round ratios with their range.
//!
//! `cargo bench -p fabric-benches --bench paired [-- --quick]`

use fabric_benches::{DIGITS_MLP, MNIST_MLP, Shape, fabric, median as median_step, plain_burn};

const GLOBAL_BATCH: usize = 128;

/// A named run returning its median seconds per step.
type Run = (&'static str, Box<dyn Fn() -> f64>);

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn summary(name: &str, values: Vec<f64>) -> String {
    let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("| {name} | {:.3} | {lo:.3} – {hi:.3} |", median(values))
}

fn measure(label: &str, shape: Shape, steps: u64, rounds: usize) {
    let runs: [Run; 3] = [
        (
            "plain",
            Box::new(move || median_step(&plain_burn(shape, GLOBAL_BATCH, steps)).as_secs_f64()),
        ),
        (
            "fabric1",
            Box::new(move || {
                median_step(&fabric(shape, GLOBAL_BATCH, 1, steps).expect("fabric")).as_secs_f64()
            }),
        ),
        (
            "ddp2",
            Box::new(move || {
                median_step(&fabric(shape, GLOBAL_BATCH, 2, steps).expect("fabric")).as_secs_f64()
            }),
        ),
    ];
    let (mut overhead, mut efficiency, mut plain_ms) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut times = [0.0; 3];
        for k in 0..3 {
            let i = (round + k) % 3;
            times[i] = (runs[i].1)();
        }
        overhead.push(times[1] / times[0]);
        efficiency.push(times[1] / times[2]);
        plain_ms.push(times[0] * 1e3);
    }
    println!("\n{label}: global batch {GLOBAL_BATCH}, Adam, {steps} steps x {rounds} rounds");
    println!("| ratio | median | range |\n|---|---|---|");
    println!(
        "{}",
        summary(
            "Fabric 1 device ÷ plain Burn (time per step; goal ≤ 1.01)",
            overhead
        )
    );
    println!(
        "{}",
        summary(
            "DDP efficiency: 2-rank ÷ 1-rank throughput (goal ≥ 0.9)",
            efficiency
        )
    );
    println!(
        "{}",
        summary("plain Burn median ms per step (scale only)", plain_ms)
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 3 } else { 9 };
    measure(
        "image_classifier MLP 64-256-256-10",
        DIGITS_MLP,
        if quick { 100 } else { 300 },
        rounds,
    );
    measure(
        "MLP 784-1024-1024-10",
        MNIST_MLP,
        if quick { 10 } else { 30 },
        rounds,
    );
}
