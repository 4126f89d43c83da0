//! Joining this process to the others of a multi-process job through MPI (the `mpi` feature;
//! `processes_stub.rs` stands in without it).

use crate::mpi::MpiProcesses;
/// Marks a launch in progress: if the process exits meanwhile, the job is aborted.
pub use crate::mpi::Training;
use crate::{Collective, HierarchicalCollective, ThreadCollective};
use fabric_core::FabricError;
use fabric_core::config::FabricConfig;
use fabric_core::environment::ClusterEnvironment;
use std::sync::Arc;

/// The other processes of the job, joined by MPI.
pub struct Processes {
    mpi: Arc<MpiProcesses>,
}

impl Processes {
    /// Joins the job of `config.num_nodes` processes the environment describes.
    pub fn join(
        env: &ClusterEnvironment,
        config: &FabricConfig,
        devices: usize,
    ) -> Result<Self, FabricError> {
        let mpi = MpiProcesses::get(config.collective_timeout)?;
        // First agree on the settings, before any check that could fail in some processes
        // only: a process that fails alone leaves the others waiting in their first collective.
        mpi.agree_on_settings(&settings(config, devices))?;
        mpi.set_ranks_per_process(devices);
        env.validate(config.num_nodes, devices)?;
        if mpi.size() != config.num_nodes {
            return Err(FabricError::InvalidSetting {
                setting: "num_nodes",
                value: format!(
                    "{} while MPI has {} process(es) ({} environment)",
                    config.num_nodes,
                    mpi.size(),
                    env.kind
                ),
                valid: format!(
                    "num_nodes={} (start the job with `fabric run --num-nodes {}`)",
                    mpi.size(),
                    mpi.size()
                ),
            });
        }
        Ok(Self { mpi })
    }

    /// This process's index (its node rank).
    pub fn node_rank(&self) -> usize {
        self.mpi.rank()
    }

    /// The collective of the local rank whose in-process handle is `local`.
    pub fn collective(&self, local: ThreadCollective) -> Box<dyn Collective> {
        Box::new(HierarchicalCollective::new(local, Arc::clone(&self.mpi)))
    }

    /// Held while ranks train: if the process exits meanwhile, the job is aborted.
    pub fn training(&self) -> Training {
        self.mpi.training()
    }

    /// Ends the whole job after a rank failed: the other processes would wait for it forever.
    pub fn abort(&self, message: &str) -> ! {
        self.mpi.abort(message)
    }
}

/// The settings every process of a job must share, as one line.
fn settings(config: &FabricConfig, devices: usize) -> String {
    format!(
        "num_nodes={} devices={devices} accelerator={} strategy={} precision={} collective_timeout={:?} bucket_bytes={}",
        config.num_nodes,
        config.accelerator,
        config.strategy,
        config.precision,
        config.collective_timeout,
        config.bucket_bytes
    )
}
