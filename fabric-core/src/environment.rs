//! Cluster environments: who started this process, and where it sits in the job. Detected in
//! Lightning's order (torchrun, SLURM, MPI, then the default of one process), each reading its
//! own variables.
//!
//! burn-fabric's unit of placement is the *process*: one process per node (or per slot of a
//! test on one machine) runs `devices` ranks as threads. So an environment's ranks and sizes
//! count processes, and `num_nodes` must equal the number of processes.

use crate::FabricError;
use crate::config::{EnvVars, LT_RESTART_COUNT};
use std::fmt;

/// Which launcher started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvironmentKind {
    /// torchrun / TorchElastic (`TORCHELASTIC_RUN_ID`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, ...).
    TorchElastic,
    /// SLURM (`SLURM_NTASKS`, `SLURM_PROCID`, ...), outside interactive `bash` allocations.
    Slurm,
    /// Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`) or a PMI launcher (`PMI_RANK`, `PMI_SIZE`).
    Mpi,
    /// Nobody: a single process (Lightning's `LightningEnvironment`).
    Default,
}

impl fmt::Display for EnvironmentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnvironmentKind::TorchElastic => "torchrun",
            EnvironmentKind::Slurm => "SLURM",
            EnvironmentKind::Mpi => "MPI",
            EnvironmentKind::Default => "single process",
        })
    }
}

/// This process's place in the job, as its launcher describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEnvironment {
    /// The launcher.
    pub kind: EnvironmentKind,
    /// Processes in the job.
    pub world_size: usize,
    /// This process's index among them.
    pub global_rank: usize,
    /// This process's index on its machine.
    pub local_rank: usize,
    /// This machine's index.
    pub node_rank: usize,
    /// Address of the main process (rank 0's host).
    pub main_address: String,
    /// Port on the main process.
    pub main_port: u16,
    /// How many times the launcher has restarted the job before this attempt (0 on the first):
    /// `LT_RESTART_COUNT`, set by `fabric run --max-restarts`, or torchrun's
    /// `TORCHELASTIC_RESTART_COUNT`.
    pub restart_count: usize,
}

const DEFAULT_ADDRESS: &str = "127.0.0.1";
/// Lightning's fallback port for externally launched jobs.
const DEFAULT_PORT: u16 = 12910;

impl ClusterEnvironment {
    /// Detects the environment from `env` in Lightning's order.
    pub fn detect(env: &EnvVars) -> Result<Self, FabricError> {
        let mut detected = Self::detect_launcher(env)?;
        detected.restart_count = match detected.kind {
            EnvironmentKind::TorchElastic => number(env, "TORCHELASTIC_RESTART_COUNT")?,
            _ => number(env, LT_RESTART_COUNT)?,
        }
        .unwrap_or(0);
        Ok(detected)
    }

    fn detect_launcher(env: &EnvVars) -> Result<Self, FabricError> {
        if env.get("TORCHELASTIC_RUN_ID").is_some() {
            return torch_elastic(env);
        }
        if env.get("SLURM_NTASKS").is_some()
            && !matches!(
                env.get("SLURM_JOB_NAME"),
                Some("bash") | Some("interactive")
            )
        {
            return slurm(env);
        }
        if env.get("OMPI_COMM_WORLD_SIZE").is_some() || env.get("PMI_SIZE").is_some() {
            return mpi(env);
        }
        Self::default_for(env)
    }

    /// Whether this process is one of several.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    fn default_for(env: &EnvVars) -> Result<Self, FabricError> {
        Ok(Self {
            kind: EnvironmentKind::Default,
            world_size: 1,
            global_rank: 0,
            local_rank: 0,
            node_rank: 0,
            main_address: env
                .get("MASTER_ADDR")
                .unwrap_or(DEFAULT_ADDRESS)
                .to_string(),
            main_port: port(env, "MASTER_PORT")?.unwrap_or(DEFAULT_PORT),
            restart_count: 0,
        })
    }

    /// Checks this environment against the configured number of nodes (processes).
    pub fn validate(&self, num_nodes: usize, devices: usize) -> Result<(), FabricError> {
        if self.world_size != num_nodes {
            return Err(FabricError::InvalidSetting {
                setting: "num_nodes",
                value: format!(
                    "{num_nodes} (with devices={devices}) while the {} environment started {} process(es)",
                    self.kind, self.world_size
                ),
                valid: format!(
                    "num_nodes={} (one process per node, each running devices={devices} ranks); to run {num_nodes} processes start them with `fabric run --num-nodes {num_nodes}` (burn-fabric's `mpi` feature)",
                    self.world_size
                ),
            });
        }
        Ok(())
    }
}

fn number(env: &EnvVars, name: &'static str) -> Result<Option<usize>, FabricError> {
    env.get(name)
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| FabricError::InvalidSetting {
                    setting: name,
                    value: v.to_string(),
                    valid: "a non-negative integer".into(),
                })
        })
        .transpose()
}

fn required(
    env: &EnvVars,
    name: &'static str,
    kind: EnvironmentKind,
) -> Result<usize, FabricError> {
    number(env, name)?.ok_or_else(|| FabricError::InvalidSetting {
        setting: name,
        value: "(unset)".into(),
        valid: format!("an integer set by the {kind} launcher"),
    })
}

fn port(env: &EnvVars, name: &'static str) -> Result<Option<u16>, FabricError> {
    env.get(name)
        .map(|v| {
            v.trim()
                .parse::<u16>()
                .map_err(|_| FabricError::InvalidSetting {
                    setting: name,
                    value: v.to_string(),
                    valid: "a port number 0-65535".into(),
                })
        })
        .transpose()
}

fn checked(mut e: ClusterEnvironment) -> Result<ClusterEnvironment, FabricError> {
    if e.world_size == 0 || e.global_rank >= e.world_size {
        return Err(FabricError::InvalidSetting {
            setting: "rank",
            value: format!("{} of {} processes", e.global_rank, e.world_size),
            valid: format!("a rank below the world size, from the {} launcher", e.kind),
        });
    }
    if e.main_address.is_empty() {
        e.main_address = DEFAULT_ADDRESS.into();
    }
    Ok(e)
}

fn torch_elastic(env: &EnvVars) -> Result<ClusterEnvironment, FabricError> {
    let kind = EnvironmentKind::TorchElastic;
    checked(ClusterEnvironment {
        kind,
        world_size: required(env, "WORLD_SIZE", kind)?,
        global_rank: required(env, "RANK", kind)?,
        local_rank: required(env, "LOCAL_RANK", kind)?,
        node_rank: number(env, "GROUP_RANK")?.unwrap_or(0),
        main_address: env
            .get("MASTER_ADDR")
            .unwrap_or(DEFAULT_ADDRESS)
            .to_string(),
        main_port: port(env, "MASTER_PORT")?.unwrap_or(DEFAULT_PORT),
        restart_count: 0,
    })
}

fn slurm(env: &EnvVars) -> Result<ClusterEnvironment, FabricError> {
    let kind = EnvironmentKind::Slurm;
    let main_address = match env.get("MASTER_ADDR") {
        Some(address) => address.to_string(),
        None => env
            .get("SLURM_NODELIST")
            .or_else(|| env.get("SLURM_JOB_NODELIST"))
            .and_then(first_host)
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_string()),
    };
    let main_port = match port(env, "MASTER_PORT")? {
        Some(port) => port,
        None => slurm_port(env.get("SLURM_JOB_ID")),
    };
    checked(ClusterEnvironment {
        kind,
        world_size: required(env, "SLURM_NTASKS", kind)?,
        global_rank: required(env, "SLURM_PROCID", kind)?,
        local_rank: number(env, "SLURM_LOCALID")?.unwrap_or(0),
        node_rank: number(env, "SLURM_NODEID")?.unwrap_or(0),
        main_address,
        main_port,
        restart_count: 0,
    })
}

/// Lightning's SLURM port: 15000 plus the last four digits of the job id, else 12910.
fn slurm_port(job_id: Option<&str>) -> u16 {
    let digits: String = job_id
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    if digits.is_empty() {
        return DEFAULT_PORT;
    }
    let tail = &digits[digits.len().saturating_sub(4)..];
    15000 + tail.parse::<u16>().unwrap_or(0)
}

/// The first host of a SLURM node list: `a,b`, `a b`, `node[5-9]`, `node[089,100-110]`,
/// `1.2.3.[089, 100-110]` (Lightning's `resolve_root_node_address`).
pub fn first_host(nodelist: &str) -> Option<String> {
    let list = nodelist.trim();
    // The first top-level entry: up to a comma or space outside brackets.
    let mut depth = 0;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' | ' ' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let entry = list[..end].trim();
    if entry.is_empty() {
        return None;
    }
    match (entry.find('['), entry.find(']')) {
        (Some(open), Some(close)) if open < close => {
            let first = entry[open + 1..close]
                .split(',')
                .next()?
                .split('-')
                .next()?
                .trim();
            Some(format!(
                "{}{}{}",
                &entry[..open],
                first,
                &entry[close + 1..]
            ))
        }
        _ => Some(entry.to_string()),
    }
}

fn mpi(env: &EnvVars) -> Result<ClusterEnvironment, FabricError> {
    let kind = EnvironmentKind::Mpi;
    let (world_size, global_rank, local_rank, node_rank) =
        if env.get("OMPI_COMM_WORLD_SIZE").is_some() {
            (
                required(env, "OMPI_COMM_WORLD_SIZE", kind)?,
                required(env, "OMPI_COMM_WORLD_RANK", kind)?,
                number(env, "OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0),
                number(env, "OMPI_COMM_WORLD_NODE_RANK")?.unwrap_or(0),
            )
        } else {
            (
                required(env, "PMI_SIZE", kind)?,
                required(env, "PMI_RANK", kind)?,
                number(env, "MPI_LOCALRANKID")?.unwrap_or(0),
                0,
            )
        };
    checked(ClusterEnvironment {
        kind,
        world_size,
        global_rank,
        local_rank,
        node_rank,
        main_address: env
            .get("MASTER_ADDR")
            .unwrap_or(DEFAULT_ADDRESS)
            .to_string(),
        main_port: port(env, "MASTER_PORT")?.unwrap_or(DEFAULT_PORT),
        restart_count: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EnvVars {
        EnvVars::from_pairs(pairs.iter().map(|(k, v)| (*k, *v)))
    }

    #[test]
    fn the_restart_count_comes_from_the_launcher_that_restarted_the_job() {
        assert_eq!(
            ClusterEnvironment::detect(&env(&[])).unwrap().restart_count,
            0
        );
        let restarted = env(&[("LT_RESTART_COUNT", "2")]);
        assert_eq!(
            ClusterEnvironment::detect(&restarted)
                .unwrap()
                .restart_count,
            2
        );
        let elastic = env(&[
            ("TORCHELASTIC_RUN_ID", "x"),
            ("TORCHELASTIC_RESTART_COUNT", "3"),
            ("LT_RESTART_COUNT", "1"),
            ("WORLD_SIZE", "1"),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
        ]);
        assert_eq!(
            ClusterEnvironment::detect(&elastic).unwrap().restart_count,
            3
        );
        let err = ClusterEnvironment::detect(&env(&[("LT_RESTART_COUNT", "first")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("LT_RESTART_COUNT") && err.contains("first"),
            "{err}"
        );
    }

    #[test]
    fn nothing_set_is_one_default_process() {
        let e = ClusterEnvironment::detect(&env(&[])).unwrap();
        assert_eq!(e.kind, EnvironmentKind::Default);
        assert_eq!((e.world_size, e.global_rank, e.main_port), (1, 0, 12910));
        assert!(!e.is_distributed());
    }

    #[test]
    fn torchrun_variables() {
        let e = ClusterEnvironment::detect(&env(&[
            ("TORCHELASTIC_RUN_ID", "abc"),
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "10.1.2.3"),
            ("MASTER_PORT", "29500"),
            // torchrun wins over SLURM and MPI variables
            ("SLURM_NTASKS", "8"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ]))
        .unwrap();
        assert_eq!(
            e,
            ClusterEnvironment {
                kind: EnvironmentKind::TorchElastic,
                world_size: 4,
                global_rank: 3,
                local_rank: 1,
                node_rank: 1,
                main_address: "10.1.2.3".into(),
                main_port: 29500,
                restart_count: 0,
            }
        );
        let err =
            ClusterEnvironment::detect(&env(&[("TORCHELASTIC_RUN_ID", "x"), ("WORLD_SIZE", "2")]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("RANK") && err.contains("unset"), "{err}");
    }

    #[test]
    fn slurm_variables_node_list_and_port_rules() {
        let e = ClusterEnvironment::detect(&env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "1"),
            ("SLURM_JOB_NAME", "train"),
            ("SLURM_NODELIST", "gpu[017-020],cpu1"),
            ("SLURM_JOB_ID", "1234567"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ]))
        .unwrap();
        assert_eq!(e.kind, EnvironmentKind::Slurm);
        assert_eq!(
            (e.world_size, e.global_rank, e.local_rank, e.node_rank),
            (2, 1, 0, 1)
        );
        assert_eq!(e.main_address, "gpu017");
        assert_eq!(e.main_port, 15000 + 4567);
        // interactive allocations are not a SLURM job environment
        let e =
            ClusterEnvironment::detect(&env(&[("SLURM_NTASKS", "2"), ("SLURM_JOB_NAME", "bash")]))
                .unwrap();
        assert_eq!(e.kind, EnvironmentKind::Default);
        assert_eq!(slurm_port(None), 12910);
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("a b").as_deref(), Some("a"));
        assert_eq!(first_host("host[5-9]").as_deref(), Some("host5"));
        assert_eq!(
            first_host("node[089,100-110],other").as_deref(),
            Some("node089")
        );
        assert_eq!(
            first_host("1.2.3.[089, 100-110]").as_deref(),
            Some("1.2.3.089")
        );
        assert_eq!(first_host("").as_deref(), None);
    }

    #[test]
    fn open_mpi_and_pmi_variables() {
        let e = ClusterEnvironment::detect(&env(&[
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_NODE_RANK", "2"),
        ]))
        .unwrap();
        assert_eq!(e.kind, EnvironmentKind::Mpi);
        assert_eq!(
            (e.world_size, e.global_rank, e.local_rank, e.node_rank),
            (3, 2, 0, 2)
        );
        let e = ClusterEnvironment::detect(&env(&[("PMI_SIZE", "2"), ("PMI_RANK", "1")])).unwrap();
        assert_eq!(
            (e.kind, e.world_size, e.global_rank),
            (EnvironmentKind::Mpi, 2, 1)
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = ClusterEnvironment::detect(&env(&[
            ("OMPI_COMM_WORLD_SIZE", "two"),
            ("OMPI_COMM_WORLD_RANK", "0"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("OMPI_COMM_WORLD_SIZE") && err.contains("two"),
            "{err}"
        );
        let err = ClusterEnvironment::detect(&env(&[("PMI_SIZE", "2"), ("PMI_RANK", "5")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 of 2"), "{err}");
        let err = ClusterEnvironment::detect(&env(&[("MASTER_PORT", "99999")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("99999"), "{err}");
    }

    #[test]
    fn num_nodes_must_match_the_process_count() {
        let e = ClusterEnvironment::detect(&env(&[
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "0"),
        ]))
        .unwrap();
        assert!(e.validate(2, 4).is_ok());
        let err = e.validate(1, 2).unwrap_err().to_string();
        assert!(
            err.contains("num_nodes")
                && err.contains("1")
                && err.contains("2 process")
                && err.contains("num_nodes=2"),
            "{err}"
        );
    }
}
