//! The façade: one `Fabric<B>` per rank, forwarding to the strategy and the collective.

use crate::connector::{CallbackFactory, Connector};
use crate::optimizer::FabricOptimizer;
use burn::module::{AutodiffModule, Module, ParamId};
use burn::optim::Optimizer;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use fabric_collective::launcher::{ThreadLaunch, launch_threads_with};
use fabric_collective::{Collective, SingleProcess};
use fabric_core::FabricError;
use fabric_core::backend::BackendDevices;
use fabric_core::callback::Callback;
use fabric_core::config::{
    Accelerator, AutoWrap, Devices, EnvVars, Precision, RawConfig, Setting, StrategyChoice,
};
use fabric_core::environment::ClusterEnvironment;
use fabric_core::loader::{DataLoader, RankDataLoader};
use fabric_core::logger::Logger;
use fabric_core::rank::RankInfo;
use fabric_precision::{ForwardInput, GradScalerState, PrecisionPlugin};
use fabric_strategies::{
    AssignParams, CollectParams, GatherParams, ParamGather, ParamWatch, Params, PlaceShards,
    Strategy,
};
use std::error::Error;
use std::fmt::Display;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Lightning Fabric for Burn: keep your training loop, let Fabric place it on devices, ranks
/// and precisions.
///
/// ```no_run
/// # use burn_fabric::{Fabric, DefaultBackend};
/// let mut fabric = Fabric::<DefaultBackend>::builder().devices(2).build()?;
/// let accuracy = fabric.launch(|fabric| -> Result<f64, burn_fabric::FabricError> {
///     // build the model and optimizer, then `fabric.setup(model, optimizer)?`,
///     // `fabric.setup_dataloader(loader)?`, and in the loop `fabric.backward(loss, &model)?`
///     // followed by `model = optimizer.step(lr, model)?`.
///     Ok(0.97)
/// })?;
/// # Ok::<(), burn_fabric::FabricError>(())
/// ```
///
/// A `Fabric` built with one device is ready at once; with several, [`launch`](Self::launch)
/// runs the training function once per rank (each on its own thread with its own `Fabric`) and
/// the methods that need ranks return [`FabricError::NotLaunched`] before that.
pub struct Fabric<B: AutodiffBackend + BackendDevices> {
    pub(crate) connector: Arc<Connector<B>>,
    rank: Option<Rank<B>>,
    seed: u64,
    launched: bool,
    /// Modules set up so far on this rank: the high half of their parameters' ids.
    setups: u64,
    pub(crate) callbacks: Vec<Box<dyn Callback>>,
}

/// What one running rank holds: its place in the job and its strategy, which owns everything
/// else (collective, precision, gradients).
pub(crate) struct Rank<B: AutodiffBackend> {
    info: RankInfo,
    pub(crate) strategy: Arc<dyn Strategy<B>>,
    pub(crate) backward_sync: bool,
}

/// Builds a [`Fabric`] from typed values or Lightning's strings.
pub struct FabricBuilder<B> {
    raw: RawConfig,
    env: Option<EnvVars>,
    loggers: Vec<Box<dyn Logger>>,
    callbacks: Option<CallbackFactory>,
    _backend: PhantomData<fn() -> B>,
}

impl<B: AutodiffBackend + BackendDevices> FabricBuilder<B> {
    /// `auto` (default), `cpu`, `gpu`, `cuda`, `wgpu`, or an [`Accelerator`].
    pub fn accelerator(mut self, accelerator: impl Into<Setting<Accelerator>>) -> Self {
        self.raw.accelerator = Some(accelerator.into());
        self
    }

    /// Devices per node: a count (`2`), `-1` (all), `"auto"`, ids (`"0,2"`, `vec![0, 2]`).
    pub fn devices(mut self, devices: impl Into<Setting<Devices>>) -> Self {
        self.raw.devices = Some(devices.into());
        self
    }

    /// Number of nodes (default 1).
    pub fn num_nodes(mut self, num_nodes: usize) -> Self {
        self.raw.num_nodes = Some(num_nodes);
        self
    }

    /// `auto` (default), `single_device`, `ddp` (and Lightning's DDP aliases), or a
    /// [`StrategyChoice`].
    pub fn strategy(mut self, strategy: impl Into<Setting<StrategyChoice>>) -> Self {
        self.raw.strategy = Some(strategy.into());
        self
    }

    /// `32-true` (default) or any of Lightning's precision strings, aliases or integers.
    pub fn precision(mut self, precision: impl Into<Setting<Precision>>) -> Self {
        self.raw.precision = Some(precision.into());
        self
    }

    /// How long a collective waits for the other ranks before failing and naming them (default
    /// 30 minutes, as PyTorch). The `LT_COLLECTIVE_TIMEOUT` environment variable (`90`, `90s`,
    /// `1.5m`, `2h`, `500ms`; what `fabric run --collective-timeout` sets) overrides it.
    pub fn collective_timeout(mut self, timeout: Duration) -> Self {
        self.raw.collective_timeout = Some(timeout);
        self
    }

    /// Size of one gradient bucket in bytes (default 25 MiB, as PyTorch DDP).
    pub fn bucket_bytes(mut self, bytes: usize) -> Self {
        self.raw.bucket_bytes = Some(bytes);
        self
    }

    /// Communicates gradients on the rank's communication thread while the rest of backward
    /// runs, instead of after backward: under DDP the gradients of each [`unit`](crate::unit)
    /// are averaged in buckets (PyTorch DDP's overlapped buckets; needs a `*-true` precision
    /// and the host collective, otherwise ignored); under FSDP each gathered parameter's
    /// reduce-scatter travels (PyTorch FSDP's reduce-scatter stream), those travelling holding
    /// at most `bucket_bytes` of whole gradients. Off by default: it pays off when communication has
    /// hardware of its own (a network, a GPU's copy engines); on a 2-core machine where the
    /// communication is memory copies on the same cores, it measured no gain for thread ranks
    /// and a loss for processes (`cargo xtask bench`, DDP and FSDP rows).
    pub fn overlap_backward(mut self, enabled: bool) -> Self {
        self.raw.overlap_backward = Some(enabled);
        self
    }

    /// Under FSDP, starts the gathers of the next [`unit`](crate::unit) on the rank's
    /// communication thread when a unit starts, so that they travel while the unit computes
    /// (PyTorch FSDP's `forward_prefetch`, off by default there too). The next unit is the one
    /// that followed in the latest forward pass; a rank then holds two units' whole
    /// parameters at a time instead of one. Only units run through `unit` are prefetched
    /// (automatic units gather at their first use). Off by default for the reason
    /// [`overlap_backward`](Self::overlap_backward) gives. Other strategies ignore it.
    pub fn forward_prefetch(mut self, enabled: bool) -> Self {
        self.raw.forward_prefetch = Some(enabled);
        self
    }

    /// Under FSDP, which submodules are gathered as one unit without the model's forward
    /// calling [`unit`](crate::unit) (Lightning's `FSDPStrategy(auto_wrap_policy=...)`):
    /// `AutoWrap::module_types(["Block"])`, or `AutoWrap::MinParams(1_000_000)`. Other
    /// strategies ignore it.
    pub fn auto_wrap(mut self, policy: AutoWrap) -> Self {
        self.raw.auto_wrap = Some(policy);
        self
    }

    /// Adds a logger (`CsvLogger`, `TensorBoardLogger`, or your own) that `log` feeds from
    /// global rank 0.
    pub fn logger(mut self, logger: impl Logger + 'static) -> Self {
        self.loggers.push(Box::new(logger));
        self
    }

    /// Gives every rank the callbacks `make` returns (called once per rank).
    pub fn callbacks(
        mut self,
        make: impl Fn() -> Vec<Box<dyn Callback>> + Send + Sync + 'static,
    ) -> Self {
        self.callbacks = Some(Arc::new(make));
        self
    }

    /// Reads the `LT_*` settings from `env` instead of the process environment.
    pub fn env(mut self, env: EnvVars) -> Self {
        self.env = Some(env);
        self
    }

    /// Resolves every setting against the environment and the backend's devices.
    pub fn build(self) -> Result<Fabric<B>, FabricError> {
        let env = self.env.unwrap_or_else(EnvVars::from_process);
        let config = self.raw.resolve(&env)?;
        let cluster = ClusterEnvironment::detect(&env)?;
        let connector = Arc::new(Connector::<B>::new(
            config,
            &cluster,
            self.loggers,
            self.callbacks,
        )?);
        let rank = match connector.world_size() {
            1 => Some(Fabric::make_rank(&connector, 0, Box::new(SingleProcess))?),
            _ => None,
        };
        let callbacks = match (&rank, &connector.callbacks) {
            (Some(_), Some(make)) => make(),
            _ => Vec::new(),
        };
        Ok(Fabric {
            connector,
            rank,
            seed: 0,
            launched: false,
            setups: 0,
            callbacks,
        })
    }
}

impl<B: AutodiffBackend + BackendDevices> Fabric<B> {
    /// A builder with every setting at its default.
    pub fn builder() -> FabricBuilder<B> {
        FabricBuilder {
            raw: RawConfig::default(),
            env: None,
            loggers: Vec::new(),
            callbacks: None,
            _backend: PhantomData,
        }
    }

    fn make_rank(
        connector: &Connector<B>,
        local_rank: usize,
        collective: Box<dyn Collective>,
    ) -> Result<Rank<B>, FabricError> {
        Ok(Rank {
            info: RankInfo::new(
                connector.node_rank(),
                connector.config.num_nodes,
                local_rank,
                connector.local_world_size(),
            ),
            strategy: connector.strategy_for(local_rank, collective)?,
            backward_sync: true,
        })
    }

    pub(crate) fn rank(&self, operation: &'static str) -> Result<&Rank<B>, FabricError> {
        self.rank.as_ref().ok_or(FabricError::NotLaunched {
            operation,
            world_size: self.connector.world_size(),
        })
    }

    /// The rank's strategy, which `operation` needs.
    pub(crate) fn rank_strategy(
        &self,
        operation: &'static str,
    ) -> Result<&dyn Strategy<B>, FabricError> {
        Ok(self.rank(operation)?.strategy.as_ref())
    }

    /// The rank's collective, for the façade's collective operations.
    pub(crate) fn collective(
        &self,
        operation: &'static str,
    ) -> Result<&dyn Collective, FabricError> {
        Ok(self.rank(operation)?.strategy.collective())
    }

    /// One line stating the resolved configuration:
    /// `backend=flex accelerator=cpu devices=2 num_nodes=1 world_size=2 strategy=ddp precision=32-true`,
    /// followed by ` gradient_sync=nccl` or ` gradient_sync=fused` where DDP averages gradients
    /// (and FSDP exchanges its shards) in device memory (distinct GPUs; ranks sharing one Wgpu
    /// or Cuda device). Under `fsdp_hybrid_shard` across processes only the gathers, within
    /// each process, go through that engine; gradients are averaged through the host.
    pub fn describe(&self) -> String {
        self.connector.describe()
    }

    /// Runs `train` on every rank and returns the result of this process's first rank (global
    /// rank 0 in a single-process job; print with [`print`](Self::print) to report once).
    ///
    /// With one device `train` runs on the calling thread with this `Fabric`. With `N` devices
    /// it runs on `N` threads, each with its own `Fabric` bound to its rank and device; with
    /// several processes (`num_nodes > 1`, the `mpi` feature) every process does the same and
    /// the ranks of all processes form one job. If any
    /// rank returns an error or panics, the ranks waiting for it in a collective are released
    /// at once and `launch` returns [`FabricError::RankFailed`] naming the rank that failed
    /// first; a rank stuck elsewhere is reported when the collective timeout expires.
    pub fn launch<T, E, F>(&mut self, train: F) -> Result<T, FabricError>
    where
        T: Send,
        E: Into<Box<dyn Error + Send + Sync>>,
        F: Fn(&mut Fabric<B>) -> Result<T, E> + Sync,
    {
        if self.launched {
            return Err(FabricError::AlreadyLaunched {
                rank: self.global_rank(),
            });
        }
        self.launched = true;
        if self.connector.world_size() == 1 {
            return train(self).map_err(|e| FabricError::RankFailed {
                rank: 0,
                message: error_chain(e.into().as_ref()),
            });
        }
        let launch = ThreadLaunch {
            world_size: self.connector.local_world_size(),
            first_rank: self.connector.node_rank() * self.connector.local_world_size(),
            timeout: self.connector.config.collective_timeout,
            threads_per_rank: self.connector.threads_per_rank(),
        };
        let connector = &self.connector;
        let seed = self.seed;
        let _training = connector.processes.as_ref().map(|p| p.training());
        // The other processes would wait for this one forever: take the whole job down as soon
        // as a rank fails, without waiting for this process's other threads.
        let abort_job = |rank: usize, message: &str| {
            if let Some(processes) = &connector.processes {
                processes.abort(&format!("rank {rank} failed: {message}"));
            }
        };
        launch_threads_with(
            &launch,
            |local_rank, member| {
                let collective: Box<dyn Collective> = match &connector.processes {
                    Some(processes) => processes.collective(member),
                    None => Box::new(member),
                };
                let rank = Self::make_rank(connector, local_rank, collective)
                    .map_err(|e| error_chain(&e))?;
                let mut fabric = Fabric {
                    connector: Arc::clone(connector),
                    rank: Some(rank),
                    seed,
                    launched: true,
                    setups: 0,
                    callbacks: connector
                        .callbacks
                        .as_ref()
                        .map(|make| make())
                        .unwrap_or_default(),
                };
                train(&mut fabric).map_err(|e| error_chain(e.into().as_ref()))
            },
            &abort_job,
        )
    }

    /// This rank's index among all ranks (before launch: that of this process's first rank).
    pub fn global_rank(&self) -> usize {
        self.rank.as_ref().map_or(
            self.connector.node_rank() * self.connector.local_world_size(),
            |r| r.info.global_rank,
        )
    }

    /// This rank's index on its node (0 before launch).
    pub fn local_rank(&self) -> usize {
        self.rank.as_ref().map_or(0, |r| r.info.local_rank)
    }

    /// This node's (process's) index.
    pub fn node_rank(&self) -> usize {
        self.rank
            .as_ref()
            .map_or(self.connector.node_rank(), |r| r.info.node_rank)
    }

    /// Number of ranks in the job.
    pub fn world_size(&self) -> usize {
        self.connector.world_size()
    }

    /// How many times the launcher has restarted this job before this attempt: 0 on the first
    /// run, then 1, 2, ... under `fabric run --max-restarts N` (`LT_RESTART_COUNT`) or torchrun
    /// (`TORCHELASTIC_RESTART_COUNT`). A program resumes from its newest complete checkpoint
    /// when it is above 0 (see [`checkpoint_to_resume`](Self::checkpoint_to_resume)).
    pub fn restart_count(&self) -> usize {
        self.connector.restart_count
    }

    /// The checkpoint a program should continue from: when `resume` is asked for or the
    /// launcher restarted the job ([`restart_count`](Self::restart_count) above 0), the newest
    /// complete one among `dir`'s step checkpoints (`burn_fabric::newest_checkpoint`), printing
    /// on rank 0 each newer, incomplete one it passes over; `None` for a fresh start.
    pub fn checkpoint_to_resume(
        &self,
        dir: &std::path::Path,
        resume: bool,
    ) -> Option<std::path::PathBuf> {
        if !resume && self.restart_count() == 0 {
            return None;
        }
        let newest = fabric_core::checkpoint::newest_checkpoint(dir);
        for line in &newest.skipped {
            self.print(line);
        }
        newest.path
    }

    /// Whether this is global rank 0.
    pub fn is_global_zero(&self) -> bool {
        self.global_rank() == 0
    }

    /// This rank's device (local rank 0's before launch).
    pub fn device(&self) -> &B::Device {
        self.rank
            .as_ref()
            .map_or(&self.connector.placement.devices[0], |r| {
                r.strategy.device()
            })
    }

    /// The resolved accelerator.
    pub fn accelerator(&self) -> Accelerator {
        self.connector.placement.accelerator
    }

    /// The resolved strategy (`single_device`, `ddp`, `zero1`, `zero2` or one of `fsdp`'s).
    pub fn strategy(&self) -> StrategyChoice {
        self.connector.strategy
    }

    /// The precision.
    pub fn precision(&self) -> Precision {
        self.connector.config.precision
    }

    /// The dtype forward and backward passes run in under the precision (f32 for `32-true` and
    /// for the master weights of `*-mixed`; bf16 for `bf16-mixed` and `bf16-true`, ...): what a
    /// model that runs its own forward pass (a burn-train `TrainStep`) needs its inputs in.
    pub fn compute_dtype(&self) -> burn::tensor::FloatDType {
        self.precision_plugin().compute_dtype()
    }

    /// Prints `message` on global rank 0 only (Lightning prints once per node; once per job is
    /// what a log wants).
    pub fn print(&self, message: impl Display) {
        if self.is_global_zero() {
            println!("{message}");
        }
    }

    /// Seeds the backend's random generator with `seed` and makes it the shuffle seed of data
    /// loaders set up afterwards; every rank gets the same seed, as in Lightning. Returns it.
    ///
    /// CPU backends keep one generator per process, so ranks that are threads draw from it in
    /// an unspecified order: use it for reproducible initialisation before `launch` or with one
    /// device, and rely on `setup` (which copies rank 0's parameters) for identical models.
    /// Burn initialises parameters lazily, on first use: build the model and `fork` it (which
    /// draws every parameter) before `launch` to make its weights reproducible.
    pub fn seed_everything(&mut self, seed: u64) -> u64 {
        B::seed(self.device(), seed);
        self.seed = seed;
        seed
    }

    /// Moves `model` to this rank's device, converts it to the precision (`*-true`: parameters
    /// in that dtype; `*-mixed`: f32 master parameters) and makes its parameters equal to rank
    /// 0's, so every rank starts from the same model however each was initialised.
    ///
    /// The parameters get ids from the order of `setup` calls and the module's visit order
    /// (not Burn's random ones): the same on every rank and in every run, so optimizer state
    /// and checkpoints are keyed alike everywhere and identical runs write identical
    /// checkpoints. (BatchNorm's running statistics keep Burn's ids: Burn does not let a
    /// mapper change them.)
    ///
    /// Rank 0 initialises the parameters (Burn's lazy parameters are initialised then, in visit
    /// order from the seed) before any other rank draws from the process's random generator,
    /// so the model is the same at every world size and in every run.
    ///
    /// Under FSDP the parameters are placed one at a time: rank 0 initialises each and every
    /// rank keeps its block of rows; the other ranks never initialise the model, and no rank
    /// holds more than one whole parameter. Buffers (parameters that need no gradient and are
    /// initialised already, such as BatchNorm's running statistics) stay as each rank has them.
    pub fn setup_module<M: AutodiffModule<B>>(&mut self, model: M) -> Result<M, FabricError> {
        let index = self.setups;
        let rank = self.rank("setup_module")?;
        let strategy = rank.strategy.as_ref();
        let ids = (0..).map(|position| ParamId::from((index << 32) | position));
        let model = match strategy.gather() {
            // Sharded: one parameter at a time, only rank 0 initialising it.
            Some(_) => {
                let mut place = PlaceShards::new(strategy, ids);
                let model = model.map(&mut place);
                if let Some(error) = place.error {
                    return Err(error);
                }
                strategy.precision().convert_module(model)
            }
            None => {
                let several = rank.info.world_size > 1;
                // The others draw (values the broadcast then replaces) once rank 0 has drawn.
                if several && rank.info.global_rank != 0 {
                    strategy.collective().barrier()?;
                }
                let model = strategy
                    .precision()
                    .convert_module(model.fork(strategy.device()));
                let mut collect = CollectParams::<B>::default();
                model.visit(&mut collect);
                if several && rank.info.global_rank == 0 {
                    strategy.collective().barrier()?;
                }
                let ids: Vec<ParamId> = ids.take(collect.ids.len()).collect();
                let values = match several {
                    false => collect.values,
                    true => strategy.broadcast_parameters(collect.values)?,
                };
                model.map(&mut AssignParams::<B, _>::new(values.into_iter()).with_ids(ids))
            }
        };
        self.setups += 1;
        self.call(|callback| callback.on_after_setup());
        Ok(model)
    }

    /// Wraps `optimizer` so that it steps with the gradients `backward` stores.
    pub fn setup_optimizer<M: AutodiffModule<B>, O: Optimizer<M, B>>(
        &mut self,
        optimizer: O,
    ) -> Result<FabricOptimizer<B, M, O>, FabricError> {
        let rank = self.rank("setup_optimizer")?;
        Ok(FabricOptimizer::new(optimizer, Arc::clone(&rank.strategy)))
    }

    /// [`setup_module`](Self::setup_module) and [`setup_optimizer`](Self::setup_optimizer).
    pub fn setup<M: AutodiffModule<B>, O: Optimizer<M, B>>(
        &mut self,
        model: M,
        optimizer: O,
    ) -> Result<(M, FabricOptimizer<B, M, O>), FabricError> {
        let model = self.setup_module(model)?;
        let optimizer = self.setup_optimizer(optimizer)?;
        Ok((model, optimizer))
    }

    /// Binds `loader` to this rank: a distributed sampler shards the data (same number of
    /// batches on every rank), each `iter()` starts the next epoch with a new shuffle, and
    /// batches land on this rank's device.
    pub fn setup_dataloader<BT, I, O>(
        &mut self,
        loader: DataLoader<BT, I, O>,
    ) -> Result<RankDataLoader<BT, I, O>, FabricError>
    where
        BT: Backend<Device = B::Device>,
        I: Send + Sync + 'static,
    {
        let rank = self.rank("setup_dataloader")?;
        loader.into_rank(
            rank.strategy.sampler_shard(),
            self.seed,
            rank.strategy.device().clone(),
        )
    }

    /// Back-propagates `loss` and stores the gradients of `model`'s parameters, adding to any
    /// not yet consumed by a step. Outside [`no_backward_sync`](Self::no_backward_sync) the
    /// stored gradients are then averaged across ranks.
    ///
    /// Under `*-mixed` the loss must come from a forward pass through
    /// [`forward`](Self::forward) (or [`autocast`](Self::autocast)) since the last `backward`:
    /// otherwise this returns [`FabricError::PrecisionBypassed`] rather than silently training
    /// in f32. Under `16-mixed` the loss is multiplied by the loss scale first and the gradients
    /// divided by it before they are stored, so clipping and the step see true gradients; an
    /// inf or NaN on any rank marks the next step to be skipped on every rank.
    pub fn backward<M: AutodiffModule<B>, const D: usize>(
        &mut self,
        loss: Tensor<B, D>,
        model: &M,
    ) -> Result<(), FabricError> {
        let rank = self.rank("backward")?;
        let numel = loss.shape().num_elements();
        rank.strategy
            .backward(loss.reshape([numel]), &Params(model), rank.backward_sync)
    }

    /// Runs `body` with gradient synchronisation skipped when `enabled`: `backward` inside only
    /// accumulates locally, and the next synchronised `backward` averages the total. Use it for
    /// gradient accumulation (scale each micro-batch loss by 1 / micro-batches yourself). Under
    /// FSDP every backward reduce-scatters its gradients into the shards (the result is the
    /// same, no communication is saved).
    pub fn no_backward_sync<R>(&mut self, enabled: bool, body: impl FnOnce(&mut Self) -> R) -> R {
        let previous = self.rank.as_ref().map(|r| r.backward_sync);
        if let (true, Some(rank)) = (enabled, self.rank.as_mut()) {
            rank.backward_sync = false;
        }
        let out = body(self);
        if let (Some(previous), Some(rank)) = (previous, self.rank.as_mut()) {
            rank.backward_sync = previous;
        }
        out
    }

    /// Scales `model`'s stored gradients so that their total `norm_type`-norm (2.0 for
    /// Euclidean, `f64::INFINITY` for max) is at most `max_norm`; returns the norm before
    /// clipping. Call it after `backward`, before the step. A NaN or infinite norm is an error.
    pub fn clip_gradients_norm<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        max_norm: f64,
        norm_type: f64,
    ) -> Result<f64, FabricError> {
        self.rank_strategy("clip_gradients_norm")?
            .clip_gradients_norm(&Params(model), max_norm, norm_type)
    }

    /// Clamps each of `model`'s stored gradients into `[-clip_value, clip_value]`.
    pub fn clip_gradients_value<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        clip_value: f64,
    ) -> Result<(), FabricError> {
        self.rank_strategy("clip_gradients_value")?
            .clip_gradients_value(&Params(model), clip_value)
    }

    /// Gradient of one parameter as stored now (after `backward`, before the step).
    pub fn gradient<const D: usize>(
        &self,
        param: &burn::module::Param<Tensor<B, D>>,
    ) -> Option<Tensor<B::InnerBackend, D>> {
        let grad = self.rank.as_ref()?.strategy.gradient(param.id)?;
        Some(grad.reshape(param.lazy_shape()))
    }

    /// Runs `forward` on `model` as the precision wants: `input` cast to the compute dtype (a
    /// float tensor; an integer or boolean one, token ids or a mask, passes as it is), the
    /// model's half-precision view under `*-mixed`, the output cast back to f32. Under FSDP the
    /// view's sharded parameters are gathered when `forward` first uses them (and by
    /// [`unit`](crate::unit)s): every rank must run the same forward passes, using the same
    /// parameters, and nothing in `forward` may read a parameter on some ranks only (printing
    /// the module on rank 0, `num_params()`); a failed gather shows at the next `backward`.
    /// Otherwise, under `32-true`, it is `forward(model, input)`.
    ///
    /// ```text
    /// let logits = fabric.forward(&model, batch.images, |m, x| m.forward(x));
    /// ```
    ///
    /// Works for a training module and for its `valid()` inner module alike.
    pub fn forward<BT, M, I, const DO: usize>(
        &self,
        model: &M,
        input: I,
        forward: impl FnOnce(&M, I) -> Tensor<BT, DO>,
    ) -> Tensor<BT, DO>
    where
        BT: Backend,
        M: Module<BT>,
        I: ForwardInput<BT>,
    {
        let plugin = self.precision_plugin();
        match self.param_gather() {
            Some(gather) => plugin.forward(model, input, |m, x| {
                crate::unit::forward_pass(&gather, m, |m| forward(m, x))
            }),
            None => match self.param_watch() {
                Some(watch) => plugin.forward(model, input, |m, x| {
                    crate::unit::watched(watch, || forward(m, x))
                }),
                None => plugin.forward(model, input, forward),
            },
        }
    }

    /// Runs `body` with the module a forward pass should use: the half-precision view of the
    /// f32 master parameters under `*-mixed`, `model` itself otherwise. Cast the inputs with
    /// [`cast_input`](Self::cast_input) and the outputs with [`cast_output`](Self::cast_output)
    /// (or use [`forward`](Self::forward), which does all three).
    pub fn autocast<BT: Backend, M: Module<BT>, R>(
        &self,
        model: &M,
        body: impl FnOnce(&M) -> R,
    ) -> R {
        let plugin = self.precision_plugin();
        match self.param_gather() {
            Some(gather) => plugin.autocast(model, |m| crate::unit::forward_pass(&gather, m, body)),
            None => match self.param_watch() {
                Some(watch) => plugin.autocast(model, |m| crate::unit::watched(watch, || body(m))),
                None => plugin.autocast(model, body),
            },
        }
    }

    /// `model` with whole parameters, gathered from every rank's shards under FSDP (every rank
    /// must call it); `model` itself under strategies whose ranks hold whole parameters. For
    /// inspecting or exporting a sharded model; forward passes through
    /// [`forward`](Self::forward) gather by themselves.
    pub fn gathered<BT: Backend, M: Module<BT>>(&self, model: &M) -> Result<M, FabricError> {
        let Some(gather) = self.param_gather() else {
            return Ok(model.clone());
        };
        let whole = model.clone().map(&mut GatherParams::new(&gather));
        self.rank_strategy("gathered")?.pass_result()?;
        Ok(whole)
    }

    /// Writes `model`'s parameters to `path` as safetensors in PyTorch's layout, as
    /// [`export_safetensors`](crate::export_safetensors) does, from global rank 0, and returns
    /// on every rank once the file is there (every rank must call it). Under FSDP the ranks
    /// gather one parameter at a time, in the file's order, and rank 0 writes it and drops it:
    /// no rank ever holds the whole model, and the file is byte for byte the one the gathered
    /// model gives.
    pub fn export_safetensors<BT: Backend, M: Module<BT>>(
        &self,
        model: &M,
        path: impl AsRef<Path>,
    ) -> Result<(), FabricError> {
        let path = path.as_ref();
        let strategy = self.rank_strategy("export_safetensors")?;
        let written = match self.param_gather() {
            Some(gather) => {
                crate::export::export_sharded(model, &gather, self.is_global_zero(), path)
                    .and(strategy.pass_result())
            }
            None if self.is_global_zero() => crate::export_safetensors(model, path),
            None => Ok(()),
        };
        fabric_strategies::agree(
            strategy.collective(),
            "export_safetensors",
            path,
            written,
            "another rank could not export",
        )
    }

    /// How forward passes gather whole parameters (FSDP), or `None`.
    fn param_gather(&self) -> Option<ParamGather> {
        self.rank.as_ref()?.strategy.gather()
    }

    /// How forward passes watch the parameters of units (DDP's overlapped averaging), outside
    /// `no_backward_sync`.
    fn param_watch(&self) -> Option<ParamWatch> {
        let rank = self.rank.as_ref()?;
        rank.backward_sync.then(|| rank.strategy.watch())?
    }

    /// Casts a float input to the precision's compute dtype.
    pub fn cast_input<BT: Backend, const D: usize>(&self, input: Tensor<BT, D>) -> Tensor<BT, D> {
        self.precision_plugin().convert_input(input)
    }

    /// Casts a float output back to f32.
    pub fn cast_output<BT: Backend, const D: usize>(&self, output: Tensor<BT, D>) -> Tensor<BT, D> {
        self.precision_plugin().convert_output(output)
    }

    /// The loss scaler's state under `16-mixed` (for checkpoints), `None` otherwise.
    pub fn grad_scaler(&self) -> Option<GradScalerState> {
        self.rank.as_ref()?.strategy.precision().scaler_state()
    }

    /// Restores the loss scaler's state (from a checkpoint); ignored without a scaler.
    pub fn load_grad_scaler(&mut self, scaler: GradScalerState) {
        if let Some(rank) = self.rank.as_ref() {
            rank.strategy.precision().load_scaler_state(scaler);
        }
    }

    /// The rank's precision plugin (the connector's before launch).
    fn precision_plugin(&self) -> &PrecisionPlugin {
        self.rank
            .as_ref()
            .map_or(&self.connector.precision, |r| r.strategy.precision())
    }
}

/// An error and its sources, joined by ": ".
fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
