//! The `fabric` command line: `fabric run` starts a training program with the Fabric settings in
//! its environment (Lightning's `LT_*` variables), directly for one process or through `mpirun`
//! for several; with `--max-restarts` it restarts the whole job when a process fails
//! ([`supervise`]).

mod supervisor;
pub use supervisor::{Attempt, supervise};

use crate::{Accelerator, Devices, FabricError, Precision, StrategyChoice};
use clap::{Args, Parser, Subcommand};
use fabric_core::config::{
    CollectiveTimeout, LT_ACCELERATOR, LT_CLI_USED, LT_COLLECTIVE_TIMEOUT, LT_DEVICES,
    LT_NUM_NODES, LT_PRECISION, LT_RESTART_COUNT, LT_STRATEGY,
};

/// burn-fabric's launcher.
#[derive(Parser, Debug)]
#[command(
    name = "fabric",
    version,
    about = "Launch burn-fabric training programs"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run PROGRAM with the given Fabric settings, through mpirun when there is more than one
    /// process.
    Run(RunArgs),
    /// Merge the shards of a checkpoint saved under `zero1`, `zero2` or `fsdp` into one
    /// checkpoint file, loadable at any world size.
    Consolidate(ConsolidateArgs),
}

/// `fabric consolidate` arguments (Lightning's `fabric consolidate`).
#[derive(Args, Debug, Clone)]
pub struct ConsolidateArgs {
    /// The checkpoint directory holding `shard-RRRRR-of-NNNNN.fabric` files.
    pub checkpoint_folder: std::path::PathBuf,
    /// Where to write the merged checkpoint [default: CHECKPOINT_FOLDER.consolidated]
    #[arg(long)]
    pub output_file: Option<std::path::PathBuf>,
}

/// `fabric run` flags, mirroring Lightning's.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// auto, cpu, gpu, cuda or wgpu
    #[arg(long)]
    pub accelerator: Option<String>,
    /// auto, single_device, ddp (or a Lightning DDP alias), zero1 (ddp_sharded), zero2, fsdp
    /// (fsdp_full_shard), fsdp_shard_grad_op, fsdp_no_shard
    #[arg(long)]
    pub strategy: Option<String>,
    /// Devices (ranks) per process: a count, -1, auto, or ids like 0,2
    #[arg(long, default_value = "1", allow_hyphen_values = true)]
    pub devices: String,
    /// Number of processes (nodes); more than one starts the job through mpirun
    #[arg(long, alias = "num_nodes", default_value_t = 1)]
    pub num_nodes: usize,
    /// This node's index (mpirun starts every node from node 0, so it must be 0 then)
    #[arg(long, alias = "node_rank", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of the main node
    #[arg(long, alias = "main_address", default_value = "127.0.0.1")]
    pub main_address: String,
    /// Port on the main node
    #[arg(long, alias = "main_port", default_value_t = 29400)]
    pub main_port: u16,
    /// 32-true, 64-true, 16-mixed, bf16-mixed, 16-true, bf16-true (or an alias)
    #[arg(long)]
    pub precision: Option<String>,
    /// How long a collective waits for the other ranks before failing and naming them: `90`
    /// (seconds), `90s`, `1.5m`, `2h` [default: 30 minutes, as PyTorch]
    #[arg(long)]
    pub collective_timeout: Option<String>,
    /// When a process fails, end the others and start the whole job again, up to N times (the
    /// program reads the attempt from `LT_RESTART_COUNT`: 0, then 1, ...)
    #[arg(long, default_value_t = 0)]
    pub max_restarts: usize,
    /// Comma-separated machines, one process each (default: all processes on this machine)
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// The mpirun to use
    #[arg(long, default_value = "mpirun")]
    pub mpirun: String,
    /// The program and its arguments
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub program: Vec<String>,
}

/// What `fabric run` will execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Variables added to the program's environment.
    pub env: Vec<(String, String)>,
    /// The executable.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Whether the executable is `mpirun`, whose output the launcher watches (an aborted job
    /// whose mpirun cannot reach a host is ended after a grace period).
    pub through_mpirun: bool,
}

impl RunArgs {
    /// Checks every value (the same parsers as `Fabric::builder`) and builds the command.
    pub fn plan(&self, running_as_root: bool) -> Result<LaunchPlan, FabricError> {
        let mut env: Vec<(String, String)> = vec![(LT_CLI_USED.into(), "1".into())];
        if let Some(accelerator) = &self.accelerator {
            accelerator.parse::<Accelerator>()?;
            env.push((LT_ACCELERATOR.into(), accelerator.clone()));
        }
        if let Some(strategy) = &self.strategy {
            strategy.parse::<StrategyChoice>()?;
            env.push((LT_STRATEGY.into(), strategy.clone()));
        }
        self.devices.parse::<Devices>()?;
        env.push((LT_DEVICES.into(), self.devices.clone()));
        if self.num_nodes == 0 {
            return Err(FabricError::InvalidSetting {
                setting: "num_nodes",
                value: "0".into(),
                valid: "a positive integer (1, 2, ...)".into(),
            });
        }
        env.push((LT_NUM_NODES.into(), self.num_nodes.to_string()));
        if let Some(precision) = &self.precision {
            precision.parse::<Precision>()?;
            env.push((LT_PRECISION.into(), precision.clone()));
        }
        if let Some(timeout) = &self.collective_timeout {
            timeout.parse::<CollectiveTimeout>()?;
            env.push((LT_COLLECTIVE_TIMEOUT.into(), timeout.trim().to_string()));
        }
        if self.node_rank >= self.num_nodes {
            return Err(FabricError::InvalidSetting {
                setting: "node_rank",
                value: self.node_rank.to_string(),
                valid: format!("0..{} (below --num-nodes)", self.num_nodes),
            });
        }
        if self.num_nodes > 1 && self.node_rank != 0 {
            return Err(FabricError::InvalidSetting {
                setting: "node_rank",
                value: self.node_rank.to_string(),
                valid: "0: with several nodes, run `fabric run` once on node 0 and mpirun starts the other nodes' processes".into(),
            });
        }
        if !self.hosts.is_empty() && self.hosts.len() != self.num_nodes {
            return Err(FabricError::InvalidSetting {
                setting: "hosts",
                value: self.hosts.join(","),
                valid: format!("exactly --num-nodes={} host names", self.num_nodes),
            });
        }
        env.push(("MASTER_ADDR".into(), self.main_address.clone()));
        env.push(("MASTER_PORT".into(), self.main_port.to_string()));
        env.push(("NODE_RANK".into(), self.node_rank.to_string()));
        // The first attempt's; `supervise` sets each restart's.
        env.push((LT_RESTART_COUNT.into(), "0".into()));

        let (program, rest) =
            self.program
                .split_first()
                .ok_or_else(|| FabricError::InvalidArgument {
                    name: "program",
                    value: String::new(),
                    reason: "give the program to run after `--`".into(),
                })?;
        if self.num_nodes == 1 {
            return Ok(LaunchPlan {
                env,
                program: program.clone(),
                args: rest.to_vec(),
                through_mpirun: false,
            });
        }
        let mut args = vec!["-np".to_string(), self.num_nodes.to_string()];
        if self.hosts.is_empty() {
            // Tests and single machines: all processes here, even with fewer cores than ranks.
            args.push("--oversubscribe".into());
        } else {
            args.push("--host".into());
            args.push(
                self.hosts
                    .iter()
                    .map(|h| format!("{h}:1"))
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        // Each process runs several rank threads: do not pin it to one core.
        args.extend(["--bind-to".into(), "none".into()]);
        if running_as_root {
            args.push("--allow-run-as-root".into());
        }
        for (name, _) in &env {
            args.extend(["-x".into(), name.clone()]);
        }
        args.push(program.clone());
        args.extend(rest.iter().cloned());
        Ok(LaunchPlan {
            env,
            program: self.mpirun.clone(),
            args,
            through_mpirun: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["fabric", "run"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Run(run) => run,
            Command::Consolidate(_) => unreachable!("parsed `run`"),
        }
    }

    #[test]
    fn consolidate_takes_a_folder_and_an_optional_output() {
        let cli = Cli::try_parse_from(["fabric", "consolidate", "ckpt", "--output-file", "o"]);
        let Ok(Cli {
            command: Command::Consolidate(args),
        }) = cli
        else {
            panic!("not parsed as consolidate: {cli:?}");
        };
        assert_eq!(args.checkpoint_folder, std::path::PathBuf::from("ckpt"));
        assert_eq!(args.output_file, Some(std::path::PathBuf::from("o")));
        assert!(Cli::try_parse_from(["fabric", "consolidate"]).is_err());
    }

    fn env_of(plan: &LaunchPlan, name: &str) -> Option<String> {
        plan.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn one_process_runs_the_program_directly_with_the_settings_in_its_environment() {
        let plan = run(&[
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--precision",
            "32",
            "--",
            "./train",
            "--epochs",
            "3",
        ])
        .plan(false)
        .unwrap();
        assert_eq!(plan.program, "./train");
        assert_eq!(plan.args, vec!["--epochs", "3"]);
        for (name, value) in [
            ("LT_CLI_USED", "1"),
            ("LT_ACCELERATOR", "cpu"),
            ("LT_DEVICES", "2"),
            ("LT_STRATEGY", "ddp"),
            ("LT_PRECISION", "32"),
            ("LT_NUM_NODES", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29400"),
            ("NODE_RANK", "0"),
        ] {
            assert_eq!(env_of(&plan, name).as_deref(), Some(value), "{name}");
        }
    }

    #[test]
    fn settings_not_given_stay_out_of_the_environment() {
        let plan = run(&["--", "prog"]).plan(false).unwrap();
        assert_eq!(env_of(&plan, "LT_ACCELERATOR"), None);
        assert_eq!(env_of(&plan, "LT_STRATEGY"), None);
        assert_eq!(env_of(&plan, "LT_PRECISION"), None);
        assert_eq!(env_of(&plan, "LT_DEVICES").as_deref(), Some("1"));
    }

    #[test]
    fn several_processes_go_through_mpirun() {
        let plan = run(&["--num-nodes", "2", "--devices", "2", "--", "prog", "a"])
            .plan(true)
            .unwrap();
        assert_eq!(plan.program, "mpirun");
        let args = plan.args.join(" ");
        assert!(
            args.starts_with("-np 2 --oversubscribe --bind-to none --allow-run-as-root"),
            "{args}"
        );
        assert!(
            args.contains("-x LT_NUM_NODES") && args.contains("-x LT_DEVICES"),
            "{args}"
        );
        assert!(args.ends_with("prog a"), "{args}");
        let plan = run(&["--num_nodes", "2", "--hosts", "h1,h2", "--", "prog"])
            .plan(false)
            .unwrap();
        let args = plan.args.join(" ");
        assert!(
            args.contains("--host h1:1,h2:1")
                && !args.contains("oversubscribe")
                && !args.contains("allow-run-as-root"),
            "{args}"
        );
    }

    #[test]
    fn bad_values_are_rejected_before_anything_runs() {
        for (flags, needle) in [
            (vec!["--accelerator", "tpu"], "tpu"),
            (vec!["--devices", "0"], "`0`"),
            (vec!["--strategy", "deepspeed"], "deepspeed"),
            (vec!["--precision", "8-true"], "8-true"),
            (vec!["--num-nodes", "0"], "num_nodes"),
            (vec!["--num-nodes", "2", "--node-rank", "1"], "node_rank"),
            (vec!["--node-rank", "3"], "node_rank"),
            (vec!["--num-nodes", "3", "--hosts", "a,b"], "hosts"),
        ] {
            let mut all = flags.clone();
            all.extend(["--", "prog"]);
            let err = run(&all).plan(false).unwrap_err().to_string();
            assert!(err.contains(needle), "{flags:?}: {err}");
        }
        assert!(
            Cli::try_parse_from(["fabric", "run"]).is_err(),
            "a program is required"
        );
        assert!(Cli::try_parse_from(["fabric", "run", "--main-port", "70000", "--", "p"]).is_err());
    }

    #[test]
    fn the_collective_timeout_reaches_every_process_and_a_bad_one_is_refused() {
        let plan = run(&[
            "--num-nodes",
            "2",
            "--collective-timeout",
            "5s",
            "--",
            "./train",
        ])
        .plan(false)
        .unwrap();
        assert_eq!(
            env_of(&plan, "LT_COLLECTIVE_TIMEOUT").as_deref(),
            Some("5s")
        );
        let exported = plan
            .args
            .windows(2)
            .any(|w| w[0] == "-x" && w[1] == "LT_COLLECTIVE_TIMEOUT");
        assert!(exported, "mpirun must export it: {:?}", plan.args);
        let plan = run(&["--", "./train"]).plan(false).unwrap();
        assert_eq!(
            env_of(&plan, "LT_COLLECTIVE_TIMEOUT"),
            None,
            "default: not set"
        );
        let err = run(&["--collective-timeout", "0", "--", "./train"])
            .plan(false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("collective_timeout") && err.contains("`0`"),
            "{err}"
        );
    }
}
