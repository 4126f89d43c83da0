//! Joining this process to the others of a multi-process job (the `mpi` feature).

use fabric_core::FabricError;
use fabric_core::collective::{Collective, ThreadCollective};
use fabric_core::config::FabricConfig;
use fabric_core::environment::{ClusterEnvironment, EnvironmentKind};

/// The other processes of the job, when there are any.
#[cfg(feature = "mpi")]
pub(crate) struct Processes {
    mpi: std::sync::Arc<fabric_core::collective::mpi::MpiProcesses>,
}

/// Marks a launch in progress (see [`Processes::training`]).
#[cfg(feature = "mpi")]
pub(crate) type Training = fabric_core::collective::mpi::Training;
/// Marks a launch in progress (nothing to mark without other processes).
#[cfg(not(feature = "mpi"))]
pub(crate) type Training = ();

/// Without the `mpi` feature there are never other processes: this type has no values.
#[cfg(not(feature = "mpi"))]
pub(crate) enum Processes {}

impl Processes {
    /// Joins the job the environment describes; `None` for a job of one process.
    pub fn join(
        env: &ClusterEnvironment,
        config: &FabricConfig,
        devices: usize,
    ) -> Result<Option<Self>, FabricError> {
        if !env.is_distributed() && config.num_nodes == 1 {
            return Ok(None);
        }
        if env.kind == EnvironmentKind::TorchElastic {
            return Err(FabricError::Unsupported {
                what: format!("a job of {} processes started by torchrun", env.world_size),
                reason: "burn-fabric joins processes with MPI: start them with `fabric run --num-nodes N` or mpirun".into(),
            });
        }
        Self::join_mpi(env, config, devices)
    }

    #[cfg(feature = "mpi")]
    fn join_mpi(
        env: &ClusterEnvironment,
        config: &FabricConfig,
        devices: usize,
    ) -> Result<Option<Self>, FabricError> {
        env.validate(config.num_nodes, devices)?;
        let mpi = fabric_core::collective::mpi::MpiProcesses::get(config.collective_timeout)?;
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
        Ok(Some(Self { mpi }))
    }

    #[cfg(not(feature = "mpi"))]
    fn join_mpi(
        env: &ClusterEnvironment,
        config: &FabricConfig,
        _devices: usize,
    ) -> Result<Option<Self>, FabricError> {
        Err(FabricError::Unsupported {
            what: format!(
                "num_nodes={} ({} environment with {} process(es))",
                config.num_nodes, env.kind, env.world_size
            ),
            reason: "several processes or nodes need the MPI engine: build burn-fabric with the `mpi` feature".into(),
        })
    }

    /// This process's index (its node rank).
    pub fn node_rank(&self) -> usize {
        #[cfg(feature = "mpi")]
        return self.mpi.rank();
        #[cfg(not(feature = "mpi"))]
        match *self {}
    }

    /// The collective of the local rank whose in-process handle is `local`.
    pub fn collective(&self, local: ThreadCollective) -> Box<dyn Collective> {
        #[cfg(feature = "mpi")]
        return Box::new(fabric_core::collective::HierarchicalCollective::new(
            local,
            std::sync::Arc::clone(&self.mpi),
        ));
        #[cfg(not(feature = "mpi"))]
        {
            let _ = local;
            match *self {}
        }
    }

    /// Held while ranks train: if the process exits meanwhile, the job is aborted.
    pub fn training(&self) -> Training {
        #[cfg(feature = "mpi")]
        return self.mpi.training();
        #[cfg(not(feature = "mpi"))]
        match *self {}
    }

    /// Ends the whole job after a rank failed: the other processes would wait for it forever.
    pub fn abort(&self, message: &str) -> ! {
        #[cfg(feature = "mpi")]
        self.mpi.abort(message);
        #[cfg(not(feature = "mpi"))]
        {
            let _ = message;
            match *self {}
        }
    }
}
