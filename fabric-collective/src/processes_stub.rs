//! Without the `mpi` feature there are never other processes: [`Processes`] has no values, and
//! joining a multi-process job is a typed error. Stands in for `processes.rs`.

use crate::{Collective, ThreadCollective};
use fabric_core::FabricError;
use fabric_core::config::FabricConfig;
use fabric_core::environment::ClusterEnvironment;

/// The other processes of the job: none can exist in this build.
pub enum Processes {}

/// Marks a launch in progress (nothing to mark without other processes).
pub type Training = ();

impl Processes {
    /// Always an error: several processes or nodes need the MPI engine.
    pub fn join(
        env: &ClusterEnvironment,
        config: &FabricConfig,
        _devices: usize,
    ) -> Result<Self, FabricError> {
        Err(FabricError::Unsupported {
            what: format!(
                "num_nodes={} ({} environment with {} process(es))",
                config.num_nodes, env.kind, env.world_size
            ),
            reason: "several processes or nodes need the MPI engine: build burn-fabric with the `mpi` feature".into(),
        })
    }

    /// Unreachable: no value exists.
    pub fn node_rank(&self) -> usize {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn collective(&self, _local: ThreadCollective) -> Box<dyn Collective> {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn training(&self) -> Training {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn abort(&self, _message: &str) -> ! {
        match *self {}
    }
}
