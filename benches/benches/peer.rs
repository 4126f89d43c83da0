//! Our side of the Lightning Fabric comparison: the MLP 784-1024-1024-10 on synthetic data,
//! Adam, global batch 128, through burn-fabric on 1 device and as 2-rank DDP (64 rows per rank),
//! with burn-fabric's `FusedAdam` (Burn's Adam, bit for bit, in one pass per parameter), on Flex
//! and, with the `tch` feature (LIBTORCH set), on LibTorch. Prints samples per second (global
//! batch ÷ median step time) and, under `cargo xtask bench`, writes them for the peer rows;
//! `benches/peers/lightning_mlp.py` measures the same loop in Lightning Fabric.
//!
//! `cargo bench -p fabric-benches --bench peer [--features tch] [-- --quick] [--steps N] [--rounds M]`

use burn::tensor::backend::AutodiffBackend;
use burn_fabric::{BackendDevices, FusedAdamConfig};
use fabric_benches::{MNIST_MLP, Mlp, Run, fabric_run, median, report, rotate_rounds};
use serde::Serialize;

const GLOBAL_BATCH: usize = 128;

/// Samples per second of one configuration, over rounds.
#[derive(Serialize)]
struct Throughput {
    backend: &'static str,
    devices: usize,
    samples_per_second: f64,
    range: [f64; 2],
}

/// Samples/s of one run on backend `BK`.
fn samples_per_second<BK: AutodiffBackend + BackendDevices>(devices: usize, steps: u64) -> f64 {
    let run = Run {
        shape: MNIST_MLP,
        rows: GLOBAL_BATCH,
        devices,
        steps,
        strategy: "auto",
        precision: "32-true",
    };
    let measured = fabric_run::<BK, _, _>(&run, || FusedAdamConfig::new().init::<BK, Mlp<BK>>())
        .expect("fabric");
    GLOBAL_BATCH as f64 / median(&measured.times).as_secs_f64()
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
    type Flex = fabric_benches::B;
    let flex_1 = || samples_per_second::<Flex>(1, steps);
    let flex_2 = || samples_per_second::<Flex>(2, steps);
    #[cfg(not(feature = "tch"))]
    let (configs, results) = (
        [("flex", 1), ("flex", 2)],
        rotate_rounds(rounds, [&flex_1, &flex_2]),
    );
    #[cfg(feature = "tch")]
    let (configs, results) = {
        type Torch = burn::backend::Autodiff<burn::backend::LibTorch>;
        let tch_1 = || samples_per_second::<Torch>(1, steps);
        let tch_2 = || samples_per_second::<Torch>(2, steps);
        (
            [("flex", 1), ("flex", 2), ("tch", 1), ("tch", 2)],
            rotate_rounds(rounds, [&flex_1, &flex_2, &tch_1, &tch_2]),
        )
    };
    println!(
        "\nburn-fabric, MLP 784-1024-1024-10, global batch {GLOBAL_BATCH}, FusedAdam, {steps} steps × {rounds} rounds"
    );
    println!("| backend | devices | samples/s (median) | range |\n|---|---|---|---|");
    let measured: Vec<Throughput> = configs
        .into_iter()
        .enumerate()
        .map(|(i, (backend, devices))| {
            let values: Vec<f64> = results.iter().map(|r| r[i]).collect();
            let [lo, hi] = report::range_of(&values);
            let samples_per_second = report::median_of(&values);
            println!("| {backend} | {devices} | {samples_per_second:.0} | {lo:.0} – {hi:.0} |");
            Throughput {
                backend,
                devices,
                samples_per_second,
                range: [lo, hi],
            }
        })
        .collect();
    report::record_json("peer_ours", &measured);
}
