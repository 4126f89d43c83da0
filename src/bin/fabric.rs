//! `fabric run [--accelerator] [--strategy] [--devices] [--num-nodes] [--node-rank]
//! [--main-address] [--main-port] [--precision] [--hosts h1,h2] -- PROGRAM ARGS...`
//! `fabric consolidate CHECKPOINT_FOLDER [--output-file FILE]`

use burn_fabric::cli::{Cli, Command};
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
    let status = std::process::Command::new(&plan.program)
        .args(&plan.args)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .status();
    match status {
        Ok(status) => match status.code() {
            Some(0) => ExitCode::SUCCESS,
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            None => {
                eprintln!(
                    "fabric run: `{}` was killed by a signal ({status})",
                    plan.program
                );
                ExitCode::FAILURE
            }
        },
        Err(err) => {
            eprintln!("fabric run: could not start `{}`: {err}", plan.program);
            ExitCode::from(127)
        }
    }
}
