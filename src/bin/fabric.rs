//! `fabric run [--accelerator] [--strategy] [--devices] [--num-nodes] [--node-rank]
//! [--main-address] [--main-port] [--precision] [--collective-timeout] [--max-restarts N]
//! [--hosts h1,h2] -- PROGRAM ARGS...`
//! `fabric consolidate CHECKPOINT_FOLDER [--output-file FILE]`

use burn_fabric::cli::{Cli, Command, supervise};
use clap::Parser;
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;

fn main() -> ExitCode {
    let run = match Cli::parse().command {
        Command::Run(run) => run,
        Command::Consolidate(args) => {
            return match burn_fabric::consolidate(
                &args.checkpoint_folder,
                args.output_file.as_deref(),
            ) {
                Ok(output) => {
                    println!("consolidated checkpoint written to {}", output.display());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("fabric consolidate: {err}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    // `/proc/self` belongs to the effective user: mpirun refuses root unless told otherwise.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let plan = match run.plan(root) {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("fabric run: {err}");
            return ExitCode::from(2);
        }
    };
    match supervise(&plan, run.max_restarts) {
        Ok(attempts) => match attempts.last() {
            Some(last) => ExitCode::from(last.exit_code()),
            None => ExitCode::FAILURE,
        },
        Err(err) => {
            eprintln!("fabric run: {err}");
            ExitCode::from(127)
        }
    }
}
