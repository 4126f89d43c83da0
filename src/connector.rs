//! Turns the resolved configuration into what a rank runs with (Lightning's `_Connector`): the
//! devices, the concrete strategy, and the checks that reject what this build cannot run.

use burn::tensor::backend::AutodiffBackend;
use fabric_collective::{Collective, DeviceEngine, Processes, device_engine};
use fabric_core::FabricError;
use fabric_core::backend::{BackendDevices, Placement, resolve_placement};
use fabric_core::config::ShardingStrategy;
use fabric_core::config::{Accelerator, FabricConfig, StrategyChoice};
use fabric_core::environment::{ClusterEnvironment, EnvironmentKind};
use fabric_precision::PrecisionPlugin;
use fabric_strategies::{Ddp, Fsdp, RankState, SingleDevice, Strategy, Zero, ZeroStage};

use fabric_core::callback::Callback;
use fabric_core::logger::Logger;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

/// Everything rank-independent about a job.
pub(crate) struct Connector<B: AutodiffBackend + BackendDevices> {
    pub config: FabricConfig,
    pub placement: Placement<B::Device>,
    /// The concrete strategy, never `Auto`.
    pub strategy: StrategyChoice,
    /// The other processes of a multi-process job.
    pub processes: Option<Processes>,
    /// The precision plugin for forward passes before `launch` (each rank's strategy owns its
    /// own).
    pub precision: PrecisionPlugin,
    /// Where `log` sends metrics (used by global rank 0 only).
    pub loggers: Mutex<Vec<Box<dyn Logger>>>,
    /// Steps counted for `log` calls without an explicit step.
    pub log_calls: AtomicU64,
    /// Makes each rank's callbacks.
    pub callbacks: Option<CallbackFactory>,
    /// The device engine for DDP's gradient buckets and FSDP's shards (NCCL when the ranks are
    /// distinct CUDA devices of one process, the fused kernel when they share one CubeCL
    /// device), or `None` for the host collective.
    pub engine: Option<DeviceEngine<B::InnerBackend>>,
    /// How many times the launcher restarted the job before this attempt.
    pub restart_count: usize,
}

/// Makes a fresh set of callbacks for one rank.
pub type CallbackFactory = Arc<dyn Fn() -> Vec<Box<dyn Callback>> + Send + Sync>;

impl<B: AutodiffBackend + BackendDevices> Drop for Connector<B> {
    fn drop(&mut self) {
        let loggers = self
            .loggers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for logger in loggers.iter_mut() {
            // Nothing useful to do with an error while dropping; `Fabric::finalize` reports it.
            let _ = logger.finalize();
        }
    }
}

impl<B: AutodiffBackend + BackendDevices> Connector<B> {
    pub fn new(
        config: FabricConfig,
        env: &ClusterEnvironment,
        loggers: Vec<Box<dyn Logger>>,
        callbacks: Option<CallbackFactory>,
    ) -> Result<Self, FabricError> {
        let precision = PrecisionPlugin::new(config.precision)?;
        let placement = resolve_placement::<B>(config.accelerator, &config.devices)?;
        fabric_precision::check_backend::<B>(
            config.precision,
            B::backend_name(),
            &placement.devices[0],
        )?;
        let processes = match is_multi_process(env, &config)? {
            true => Some(Processes::join(env, &config, placement.devices.len())?),
            false => None,
        };
        let local = placement.devices.len();
        let strategy = match config.strategy {
            StrategyChoice::Auto if local * config.num_nodes == 1 => StrategyChoice::SingleDevice,
            StrategyChoice::Auto => StrategyChoice::Ddp,
            StrategyChoice::SingleDevice if local > 1 => {
                return Err(FabricError::InvalidSetting {
                    setting: "strategy",
                    value: format!("single_device with devices={local}"),
                    valid: "`ddp` (or `auto`) for more than one device, or devices=1".into(),
                });
            }
            other => other,
        };
        // Gradients (and FSDP's shards) stay on the devices when the ranks that exchange them
        // are devices of this process: every rank of a one-process job, or the ranks that
        // `hybrid_shard` gathers within.
        let on_device = matches!(
            (strategy, &processes),
            (StrategyChoice::Ddp | StrategyChoice::Fsdp(_), None)
                | (StrategyChoice::Fsdp(ShardingStrategy::HybridShard), Some(_))
        );
        let engine = match on_device {
            true => device_engine::<B::InnerBackend>(&placement.devices)?,
            false => None,
        };
        Ok(Self {
            config,
            placement,
            strategy,
            processes,
            precision,
            loggers: Mutex::new(loggers),
            log_calls: AtomicU64::new(0),
            callbacks,
            engine,
            restart_count: env.restart_count,
        })
    }

    /// This process's node index.
    pub fn node_rank(&self) -> usize {
        self.processes.as_ref().map_or(0, Processes::node_rank)
    }

    /// Ranks on this node.
    pub fn local_world_size(&self) -> usize {
        self.placement.devices.len()
    }

    /// Ranks in the job.
    pub fn world_size(&self) -> usize {
        self.local_world_size() * self.config.num_nodes
    }

    /// The strategy of one rank, talking through `collective`, with its own precision plugin.
    pub fn strategy_for(
        &self,
        local_rank: usize,
        collective: Box<dyn Collective>,
    ) -> Result<Arc<dyn Strategy<B>>, FabricError> {
        let state = RankState::<B>::new(
            collective,
            self.placement.devices[local_rank].clone(),
            PrecisionPlugin::new(self.config.precision)?,
            self.config.bucket_bytes,
        );
        Ok(match self.strategy {
            StrategyChoice::SingleDevice => Arc::new(SingleDevice::new(state)),
            StrategyChoice::Auto
            | StrategyChoice::Ddp
            | StrategyChoice::Fsdp(ShardingStrategy::NoShard) => {
                let ddp = match self.config.overlap_backward {
                    true => Ddp::new(state).overlapped(),
                    false => Ddp::new(state),
                };
                match &self.engine {
                    Some(engine) => Arc::new(ddp.with_engine(engine.for_rank(local_rank))),
                    None => Arc::new(ddp),
                }
            }
            StrategyChoice::Zero1 => Arc::new(Zero::new(state, ZeroStage::One)),
            StrategyChoice::Zero2 => Arc::new(Zero::new(state, ZeroStage::Two)),
            StrategyChoice::Fsdp(sharding) => {
                let fsdp = Fsdp::new(state, sharding, self.config.auto_wrap.clone())
                    .forward_prefetch(self.config.forward_prefetch)
                    .overlap_backward(self.config.overlap_backward);
                match &self.engine {
                    Some(engine) => Arc::new(fsdp.with_engine(engine.for_rank(local_rank))),
                    None => Arc::new(fsdp),
                }
            }
        })
    }

    /// Rayon threads per rank: CPU ranks split the cores between them.
    pub fn threads_per_rank(&self) -> Option<usize> {
        let local = self.local_world_size();
        if self.placement.accelerator != Accelerator::Cpu || local <= 1 {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some((cores / local).max(1))
    }

    /// The first line the examples print.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "backend={} accelerator={} devices={} num_nodes={} world_size={} strategy={} precision={}",
            B::backend_name(),
            self.placement.accelerator,
            self.local_world_size(),
            self.config.num_nodes,
            self.world_size(),
            self.strategy,
            self.config.precision,
        );
        if let Some(engine) = &self.engine {
            line.push_str(" gradient_sync=");
            line.push_str(engine.name());
        }
        line
    }
}

/// Whether the job spans several processes: the environment says so or `num_nodes > 1`.
/// Processes started by torchrun are refused (they would need torch's rendezvous, not MPI).
fn is_multi_process(env: &ClusterEnvironment, config: &FabricConfig) -> Result<bool, FabricError> {
    if !env.is_distributed() && config.num_nodes == 1 {
        return Ok(false);
    }
    if env.kind == EnvironmentKind::TorchElastic {
        return Err(FabricError::Unsupported {
            what: format!("a job of {} processes started by torchrun", env.world_size),
            reason: "burn-fabric joins processes with MPI: start them with `fabric run --num-nodes N` or mpirun".into(),
        });
    }
    Ok(true)
}
