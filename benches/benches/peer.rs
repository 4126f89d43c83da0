//! Our side of the Lightning Fabric comparison: the MLP 784-1024-1024-10 on synthetic data,
//! Adam, global batch 128, on Flex through burn-fabric on 1 device and as 2-rank DDP (64 rows
//! per rank). Prints samples per second (global batch ÷ median step time) and, under
//! `cargo xtask bench`, writes them for the peer rows; `benches/peers/lightning_mlp.py` measures
//! the same loop in Lightning Fabric.
//!
//! `cargo bench -p fabric-benches --bench peer [-- --quick] [--steps N] [--rounds M]`

use fabric_benches::{MNIST_MLP, fabric, median, report, rotate_rounds};
use serde::Serialize;

const GLOBAL_BATCH: usize = 128;

/// Samples per second of one configuration, over rounds.
#[derive(Serialize)]
struct Throughput {
    devices: usize,
    samples_per_second: f64,
    range: [f64; 2],
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--steps N --rounds M` override the defaults: xtask runs one round at a time between runs
    // of the peer, with the peer's step count.
    let value = |flag: &str| {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1)?.parse().ok()
    };
    let steps = value("--steps").unwrap_or(if quick { 15 } else { 40 });
    let rounds = value("--rounds").unwrap_or(if quick { 3 } else { 5 }) as usize;
    let run = |devices: usize| {
        move || {
            let times = fabric(MNIST_MLP, GLOBAL_BATCH, devices, steps).expect("fabric");
            GLOBAL_BATCH as f64 / median(&times).as_secs_f64()
        }
    };
    let (one, two) = (run(1), run(2));
    let results = rotate_rounds(rounds, [&one, &two]);
    println!(
        "\nburn-fabric on Flex, MLP 784-1024-1024-10, global batch {GLOBAL_BATCH}, Adam, {steps} steps × {rounds} rounds"
    );
    println!("| devices | samples/s (median) | range |\n|---|---|---|");
    let measured: Vec<Throughput> = [1, 2]
        .into_iter()
        .enumerate()
        .map(|(i, devices)| {
            let values: Vec<f64> = results.iter().map(|r| r[i]).collect();
            let [lo, hi] = report::range_of(&values);
            let samples_per_second = report::median_of(&values);
            println!("| {devices} | {samples_per_second:.0} | {lo:.0} – {hi:.0} |");
            Throughput {
                devices,
                samples_per_second,
                range: [lo, hi],
            }
        })
        .collect();
    report::record_json("peer_ours", &measured);
}
