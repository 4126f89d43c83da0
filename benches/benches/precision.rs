//! Precision plugins against `32-true`: Fabric on one device, step time under each precision ÷
//! step time under `32-true`, in rounds that run every precision back to back (rotating which
//! goes first). On a CPU backend half precision is emulated, so these ratios say what a
//! precision costs there, not what it saves on a GPU.
//!
//! `cargo bench -p fabric-benches --bench precision [-- --quick]`

use fabric_benches::report::{self, Row};
use fabric_benches::{MNIST_MLP, fabric_configured, median, rotate_rounds};

const BATCH: usize = 128;
const PRECISIONS: [&str; 5] = ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"];

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (steps, rounds) = if quick { (10, 3) } else { (30, 7) };
    let run = |precision: &'static str| {
        move || {
            let measured =
                fabric_configured(MNIST_MLP, BATCH, 1, steps, "auto", precision).expect(precision);
            median(&measured.times).as_secs_f64()
        }
    };
    let runs = PRECISIONS.map(run);
    let results = rotate_rounds(rounds, [&runs[0], &runs[1], &runs[2], &runs[3], &runs[4]]);
    let note = format!(
        "MLP 784-1024-1024-10, batch {BATCH}, Adam, Flex, 1 device, {steps} steps × {rounds} rounds"
    );
    let rows: Vec<Row> = (1..PRECISIONS.len())
        .map(|i| {
            let ratios: Vec<f64> = results.iter().map(|t| t[i] / t[0]).collect();
            let name = format!("{} ÷ 32-true step time", PRECISIONS[i]);
            Row::from_rounds("Precision", &name, &ratios, None, note.clone())
        })
        .collect();
    println!("\nprecision plugins: {note}");
    report::print_table(&rows);
    report::record("precision", &rows);
}
