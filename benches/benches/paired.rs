//! Ratios measured side by side: rounds that run plain Burn, Fabric on one device and Fabric
//! DDP on two devices (with Burn's Adam, and again with FusedAdam) back to back, rotating which
//! goes first, so that drift in the machine's speed hits all five alike. Each run counts its median step time; the table gives the median
//! of the per-round ratios with their range.
//!
//! `cargo bench -p fabric-benches --bench paired [-- --quick]`

use burn_fabric::FusedAdamConfig;
use fabric_benches::report::{self, Goal, Row};
use fabric_benches::{
    B, DIGITS_MLP, MNIST_MLP, Mlp, OVERLAP, Run, Shape, fabric, fabric_run, median, plain_burn,
    rotate_rounds, switched,
};

const GLOBAL_BATCH: usize = 128;

fn measure(label: &str, shape: Shape, steps: u64, rounds: usize) -> Vec<Row> {
    let seconds = |times: Vec<std::time::Duration>| median(&times).as_secs_f64();
    let plain = || seconds(plain_burn(shape, GLOBAL_BATCH, steps));
    let fabric1 = || seconds(fabric(shape, GLOBAL_BATCH, 1, steps).expect("fabric, 1 device"));
    let ddp2 = || seconds(fabric(shape, GLOBAL_BATCH, 2, steps).expect("fabric, 2 devices"));
    // The same two with FusedAdam, whose step is a small part of each rank's time.
    let fused = |devices: usize| {
        let run = Run {
            shape,
            rows: GLOBAL_BATCH,
            devices,
            steps,
            strategy: "auto",
            precision: "32-true",
        };
        let measured = fabric_run::<B, _, _>(&run, || FusedAdamConfig::new().init::<B, Mlp<B>>());
        seconds(measured.expect("fabric with FusedAdam").times)
    };
    let (fused1, fused2) = (|| fused(1), || fused(2));
    // DDP averaging each layer's gradients while backward goes on.
    let ddp2_overlap = || switched(&OVERLAP, true, ddp2);
    let results = rotate_rounds(
        rounds,
        [&plain, &fabric1, &ddp2, &fused1, &fused2, &ddp2_overlap],
    );
    let note = format!(
        "{label}, global batch {GLOBAL_BATCH}, Adam, Flex, {steps} steps × {rounds} rounds"
    );
    let ratios = |f: fn(&[f64; 6]) -> f64| results.iter().map(f).collect::<Vec<_>>();
    let rows = vec![
        Row::from_rounds(
            "Fabric overhead",
            &format!("{label}: Fabric 1 device ÷ plain Burn (time per step)"),
            &ratios(|t| t[1] / t[0]),
            Some(Goal::AtMost(1.01)),
            note.clone(),
        ),
        Row::from_rounds(
            "DDP",
            &format!("{label}: 2-rank ÷ 1-rank throughput"),
            &ratios(|t| t[1] / t[2]),
            Some(Goal::AtLeast(0.9)),
            note.clone(),
        ),
        Row::from_rounds(
            "DDP",
            &format!("{label}: 2-rank ÷ 1-rank throughput, FusedAdam"),
            &ratios(|t| t[3] / t[4]),
            Some(Goal::AtLeast(0.9)),
            note.replace("Adam,", "FusedAdam,"),
        ),
        Row::from_rounds(
            "DDP",
            &format!(
                "{label}: 2 ranks, averaging overlapped with backward ÷ after it (time per step)"
            ),
            &ratios(|t| t[5] / t[2]),
            Some(Goal::AtMost(1.0)),
            note.clone(),
        ),
    ];
    println!("\n{label}: global batch {GLOBAL_BATCH}, Adam, {steps} steps x {rounds} rounds");
    report::print_table(&rows);
    let plain_ms: Vec<f64> = results.iter().map(|t| t[0] * 1e3).collect();
    println!(
        "| plain Burn ms per step (scale only) | {:.3} | |",
        report::median_of(&plain_ms)
    );
    rows
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 3 } else { 9 };
    let mut rows = measure(
        "digits MLP 64-256-256-10",
        DIGITS_MLP,
        if quick { 100 } else { 300 },
        rounds,
    );
    rows.extend(measure(
        "MLP 784-1024-1024-10",
        MNIST_MLP,
        if quick { 10 } else { 30 },
        rounds,
    ));
    report::record("paired", &rows);
}
