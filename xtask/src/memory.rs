//! The FSDP memory section of `cargo xtask bench`: the peak resident memory (`VmHWM`) of every
//! process of a job started by `fabric run` (MPI processes, one rank each), training the
//! `fsdp_memory` example's stack of equal layers with Adam under DDP, zero2 and FSDP, at 1, 2
//! and 4 processes.
//!
//! Goal (issue 19): FSDP's largest process ≤ 1.25 × (16 bytes × parameters / N + two units'
//! gathered parameters + activations): f32 parameters, gradients and Adam's two moments, each
//! cut N ways, plus what a unit holds while it runs.

use crate::report::{Goal, Row};
use crate::{Error, target_dir};
use std::path::Path;
use std::process::Command;

/// The stack: `layers` square layers of `width` (weights and biases), `batch` samples per rank.
struct Stack {
    layers: usize,
    width: usize,
    batch: usize,
    steps: usize,
}

impl Stack {
    fn params(&self) -> usize {
        self.layers * (self.width * self.width + self.width)
    }

    /// The goal's budget in MiB at `world` processes: the shards of parameters, gradients and
    /// Adam's moments, two units' gathered parameters, and the activations kept for backward
    /// (each layer's input and output, f32).
    fn budget_mib(&self, world: usize) -> f64 {
        let shards = 16.0 * self.params() as f64 / world as f64;
        let units = 2.0 * 4.0 * (self.width * self.width + self.width) as f64;
        let activations = 2.0 * 4.0 * (self.layers * self.batch * self.width) as f64;
        (shards + units + activations) / (1024.0 * 1024.0)
    }

    fn describe(&self) -> String {
        format!(
            "{} layers × {}² ({:.1}M parameters, f32), Adam, batch {} per rank, {} steps",
            self.layers,
            self.width,
            self.params() as f64 / 1e6,
            self.batch,
            self.steps
        )
    }
}

/// The strategies compared, as the example's flags.
const RUNS: [(&str, &[&str]); 4] = [
    ("ddp", &["--strategy", "ddp"]),
    ("zero2", &["--strategy", "zero2"]),
    ("fsdp", &["--strategy", "fsdp"]),
    (
        "fsdp, gathered parameters released after forward",
        &["--strategy", "fsdp", "--release-gathered"],
    ),
];

/// Measures the section and returns its rows; a note in `skipped` when it cannot run here.
pub fn rows(quick: bool, skipped: &mut Vec<String>) -> Result<Vec<Row>, Error> {
    if crate::command_line("mpirun", &["--version"]).is_none() {
        skipped.push("FSDP memory rows: mpirun not found (install Open MPI: libopenmpi-dev openmpi-bin libclang-dev)".into());
        return Ok(Vec::new());
    }
    build()?;
    let stack = match quick {
        true => Stack {
            layers: 12,
            width: 1024,
            batch: 16,
            steps: 3,
        },
        false => Stack {
            layers: 48,
            width: 2048,
            batch: 16,
            steps: 3,
        },
    };
    println!("\nFSDP memory: {}, one rank per process", stack.describe());
    println!(
        "| processes | {} | goal budget |",
        RUNS.map(|r| r.0).join(" | ")
    );
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for world in [1, 2, 4] {
        let processes = match world {
            1 => "1 process".to_string(),
            n => format!("{n} processes"),
        };
        let mut peaks = Vec::new();
        for (_, flags) in RUNS {
            peaks.push(largest_peak(&stack, world, flags)?);
        }
        let budget = stack.budget_mib(world);
        let cells: Vec<String> = peaks.iter().map(|p| format!("{p:.0} MiB")).collect();
        println!("| {world} | {} | {budget:.0} MiB |", cells.join(" | "));
        let note = format!(
            "{}; VmHWM of each process of `fabric run --num-nodes {world}`, the largest",
            stack.describe()
        );
        for (at, (name, _)) in RUNS.iter().enumerate().skip(1) {
            rows.push(Row::single(
                "FSDP memory",
                &format!("{name} ÷ DDP peak memory per process, {processes}"),
                peaks[at] / peaks[0],
                None,
                note.clone(),
            ));
        }
        rows.push(Row::single(
            "FSDP memory",
            &format!(
                "fsdp (released) peak ÷ 16 B × parameters / N + 2 units + activations, {processes}"
            ),
            peaks[3] / budget,
            Some(Goal::AtMost(1.25)),
            note,
        ));
    }
    Ok(rows)
}

/// Builds the launcher and the example with MPI.
fn build() -> Result<(), Error> {
    let args = [
        "build",
        "--features",
        "burn-fabric/mpi",
        "--example",
        "fsdp_memory",
        "--bin",
        "fabric",
    ];
    crate::cargo(&args, &[], "fsdp memory (build)")
}

/// The largest peak (MiB) of the processes of one job.
fn largest_peak(stack: &Stack, world: usize, flags: &[&str]) -> Result<f64, Error> {
    let debug = target_dir().join("debug");
    let example = debug.join("examples").join("fsdp_memory");
    let (layers, width) = (stack.layers.to_string(), stack.width.to_string());
    let (batch, steps) = (stack.batch.to_string(), stack.steps.to_string());
    let what = format!(
        "fabric run --num-nodes {world} -- fsdp_memory {}",
        flags.join(" ")
    );
    let output = Command::new(debug.join("fabric"))
        .args([
            "run",
            "--num-nodes",
            &world.to_string(),
            "--devices",
            "1",
            "--",
        ])
        .arg(&example)
        .args(["--layers", &layers, "--width", &width, "--batch", &batch])
        .args(["--steps", &steps])
        .args(flags)
        .output()
        .map_err(|source| Error::Spawn {
            what: what.clone(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
        return Err(Error::Bench {
            bench: what,
            status: output.status,
        });
    }
    let peaks = parse_peaks(&stdout);
    match peaks.len() == world {
        true => Ok(peaks.into_iter().fold(0.0, f64::max)),
        false => Err(Error::Io {
            path: Path::new(&what).to_path_buf(),
            source: std::io::Error::other(format!(
                "expected {world} lines `process P: peak resident memory M MiB`, got:\n{stdout}"
            )),
        }),
    }
}

/// The MiB of each line `process P: peak resident memory M MiB`.
fn parse_peaks(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("process ")?;
            let (_, rest) = rest.split_once(": peak resident memory ")?;
            rest.strip_suffix(" MiB")?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_process_peak() {
        let out = "backend=flex ...\nparameters: 10  steps: 3\nprocess 1: peak resident memory 812 MiB\nprocess 0: peak resident memory 799 MiB\n";
        assert_eq!(parse_peaks(out), [812.0, 799.0]);
    }

    #[test]
    fn the_budget_is_the_shards_two_units_and_activations() {
        let stack = Stack {
            layers: 48,
            width: 2048,
            batch: 16,
            steps: 3,
        };
        assert_eq!(stack.params(), 201_424_896);
        // 16 B × 201M / 4 = 768.4 MiB, two units 32.0 MiB, activations 12 MiB.
        assert!(
            (stack.budget_mib(4) - 812.4).abs() < 0.1,
            "{}",
            stack.budget_mib(4)
        );
    }
}
