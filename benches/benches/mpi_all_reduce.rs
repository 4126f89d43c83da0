//! All-reduce of 10M f32 across 2 processes: burn-fabric's collective (what DDP calls) vs a raw
//! rsmpi `all_reduce_into` on the same buffers, alternating in one run.
//!
//! `cargo bench -p fabric-benches --features mpi --bench mpi_all_reduce [-- --quick]`
//! starts itself under `mpirun -np 2`.

use burn::tensor::TensorData;
use burn_fabric::fabric_collective::mpi::MpiProcesses;
use burn_fabric::fabric_collective::{Collective, HierarchicalCollective, ReduceOp, ThreadGroup};
use fabric_benches::report::{self, Goal, Row, median_of};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::CommunicatorCollectives;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const ELEMENTS: usize = 10_000_000;

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_none() {
        return relaunch(quick);
    }
    let rounds = if quick { 5 } else { 15 };
    let iters = if quick { 3 } else { 5 };
    let processes = match MpiProcesses::get(Duration::from_secs(120)) {
        Ok(p) => p,
        Err(err) => {
            eprintln!("mpi_all_reduce: {err}");
            return ExitCode::FAILURE;
        }
    };
    let local = ThreadGroup::new(1, Duration::from_secs(120)).member(0);
    let ours = HierarchicalCollective::new(local, processes.clone());
    let world = SimpleCommunicator::world();

    let mut data = TensorData::new(vec![1.0f32; ELEMENTS], [ELEMENTS]);
    let send = vec![1.0f32; ELEMENTS];
    let mut recv = vec![0.0f32; ELEMENTS];
    let (mut raw_times, mut our_times) = (Vec::new(), Vec::new());
    for round in 0..rounds + 1 {
        world.barrier();
        let start = Instant::now();
        for _ in 0..iters {
            world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        }
        let raw = start.elapsed() / iters;
        world.barrier();
        let start = Instant::now();
        for _ in 0..iters {
            data = match ours.all_reduce(data, ReduceOp::Sum) {
                Ok(d) => d,
                Err(err) => processes.abort(&err.to_string()),
            };
        }
        let our = start.elapsed() / iters;
        if round > 0 {
            raw_times.push(raw.as_secs_f64());
            our_times.push(our.as_secs_f64());
        }
    }
    if processes.rank() == 0 {
        let ratios: Vec<f64> = our_times
            .iter()
            .zip(&raw_times)
            .map(|(o, r)| o / r)
            .collect();
        let (raw, our) = (median_of(&raw_times), median_of(&our_times));
        println!(
            "\nall-reduce of {ELEMENTS} f32 across 2 processes (Open MPI, {rounds} rounds x {iters})"
        );
        println!("| path | median ms |\n|---|---|");
        println!("| raw rsmpi all_reduce_into | {:.2} |", raw * 1e3);
        println!("| burn-fabric collective | {:.2} |", our * 1e3);
        let row = Row::from_rounds(
            "MPI",
            &format!(
                "all-reduce of {}M f32, 2 processes: burn-fabric ÷ raw rsmpi (time)",
                ELEMENTS / 1_000_000
            ),
            &ratios,
            Some(Goal::AtMost(1.10)),
            format!("Open MPI, {rounds} rounds × {iters}"),
        );
        report::print_table(std::slice::from_ref(&row));
        report::record("mpi_all_reduce", &[row]);
    }
    ExitCode::SUCCESS
}

/// Starts this benchmark as 2 MPI processes.
fn relaunch(quick: bool) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("mpi_all_reduce: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = Command::new("mpirun");
    command.args(["-np", "2", "--oversubscribe", "--bind-to", "none"]);
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        command.arg("--allow-run-as-root");
    }
    command.arg(exe).arg("--bench");
    if quick {
        command.arg("--quick");
    }
    match command.status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("mpi_all_reduce: mpirun ended with {status}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("mpi_all_reduce: could not start mpirun (install Open MPI): {err}");
            ExitCode::FAILURE
        }
    }
}
