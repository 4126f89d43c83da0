//! `cargo xtask bench [--quick]`: runs burn-fabric's benchmarks.
//!
//! * `paired`: plain Burn vs Fabric on one device vs Fabric DDP on two, side by side in one run,
//!   printed as a Markdown table of ratios (overhead and DDP efficiency).
//! * `collective` (Criterion): the in-process all-reduce of 10M f32 beside a 40 MB memcpy.
//! * `training` (Criterion, skipped with `--quick`): the per-step times behind the ratios.
//! * `zero`: optimizer-state bytes per rank under ZeRO vs DDP at world sizes 1, 2, 4, and step
//!   time vs DDP.
//! * `mpi_all_reduce` (when `mpirun` is installed): burn-fabric's collective vs raw rsmpi
//!   across 2 processes.

use clap::{Parser, Subcommand};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(about = "burn-fabric project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the benchmarks and print the ratios.
    Bench {
        /// A reduced run of every benchmark (a few minutes).
        #[arg(long)]
        quick: bool,
    },
}

fn cargo_bench(bench: &str, extra: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["bench", "-p", "fabric-benches", "--bench", bench]);
    if bench.starts_with("mpi") {
        command.args(["--features", "mpi"]);
    }
    if !extra.is_empty() {
        command.arg("--").args(extra);
    }
    let status = command
        .status()
        .map_err(|e| format!("could not run cargo bench: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("benchmark `{bench}` failed with {status}"))
    }
}

fn bench(quick: bool) -> Result<(), String> {
    if quick {
        cargo_bench("paired", &["--quick"])?;
        cargo_bench("zero", &["--quick"])?;
        cargo_bench(
            "collective",
            &["--warm-up-time", "1", "--measurement-time", "3"],
        )
    } else {
        cargo_bench("paired", &[])?;
        cargo_bench("zero", &[])?;
        cargo_bench("collective", &[])?;
        cargo_bench("training", &[])
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Bench { quick } => bench(quick),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}
