//! Fully sharded data parallel (PyTorch's FSDP, DeepSpeed's ZeRO stage 3): every rank keeps only
//! its shard of each trainable parameter, and so only its shard of each gradient and of the
//! optimizer state.
//!
//! Each parameter is cut along its first dimension into `world` equal row blocks (the last
//! padded with zeros where the rows do not divide), one per rank, as PyTorch's FSDP2 does: no
//! flat parameter, no owner imbalance. Between steps the module holds its shards as ordinary
//! Burn parameters of shape `[rows / world, ...]`, so any Burn optimizer steps them unchanged.
//! A forward pass through `Fabric::forward` sees whole parameters: each is all-gathered by the
//! autodiff operation of [`fabric_core::gather`], whose backward reduce-scatters the whole
//! gradient into the shard's, averaged over the ranks.

use crate::checkpoint_io::{self, ApplyEntries, EncodeEntries, read_file};
use crate::ddp::Ddp;
use crate::exchange::CollectiveExchange;
use crate::module::{FlatGrad, ModuleParams, SetupParam};
use crate::prefetch::UnitOrder;
use crate::rank_state::RankState;
use crate::strategy::Strategy;
use burn::module::{ModuleMapper, Param, ParamId};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use fabric_collective::{Collective, DeviceCollective};
use fabric_core::FabricError;
use fabric_core::checkpoint::{
    Entry, RowShards, cut_rows, error, read_consolidated, reshard_rows, shard_file_name,
    shard_files, shard_row_range, shard_rows, shard_shape,
};
use fabric_core::config::{AutoWrap, ShardingStrategy};
use fabric_core::gather::{GatherParam, ShardExchange, TrackedGather};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// What a forward pass needs to see whole parameters: their whole shapes by id (parameters not
/// listed are whole already) and the collectives that gather them.
#[derive(Clone)]
pub struct ParamGather {
    /// Whole shape of each sharded parameter.
    pub shapes: Arc<HashMap<ParamId, Vec<usize>>>,
    /// The all-gather forward, reduce-scatter backward.
    pub exchange: Arc<dyn ShardExchange>,
    /// The training backend's tracked gather.
    pub tracked: TrackedGather,
    /// Release gathered parameters after forward and gather them again for backward.
    pub release: bool,
    /// Which submodules are gathered as one unit.
    pub auto_wrap: Arc<AutoWrap>,
    /// The order of the units in earlier passes, when a unit starts the gathers of the next
    /// one before it runs (prefetch).
    pub prefetch: Option<Arc<UnitOrder>>,
}

/// Lightning's `FSDPStrategy` with `full_shard` or `shard_grad_op`.
///
/// Every rank must run the same forward passes through `Fabric::forward` (the gathers are
/// collectives), using the same parameters, and call `backward` together.
pub struct Fsdp<B: AutodiffBackend> {
    /// Setup broadcast, sampler and the rank's state.
    ddp: Ddp<B>,
    sharding: ShardingStrategy,
    auto_wrap: Arc<AutoWrap>,
    exchange: Arc<CollectiveExchange>,
    shapes: Mutex<Arc<HashMap<ParamId, Vec<usize>>>>,
    prefetch: Option<Arc<UnitOrder>>,
    overlap: bool,
    /// The device engine of this process's ranks, when the shards are exchanged on the devices.
    engine: Option<Arc<dyn DeviceCollective<Inner<B>>>>,
}

impl<B: AutodiffBackend + GatherParam> Fsdp<B> {
    /// FSDP with `sharding` (`full_shard` or `shard_grad_op`; `no_shard` is DDP) and the
    /// automatic units `auto_wrap` for the rank `state` describes.
    pub fn new(state: RankState<B>, sharding: ShardingStrategy, auto_wrap: AutoWrap) -> Self {
        let exchange = exchange(&state, sharding, false, None);
        Self {
            ddp: Ddp::new(state),
            sharding,
            auto_wrap: Arc::new(auto_wrap),
            exchange,
            shapes: Mutex::new(Arc::default()),
            prefetch: None,
            overlap: false,
            engine: None,
        }
    }

    /// Whether a unit starts the gathers of the unit that followed it in the latest forward
    /// pass before it runs (off by default). Off with a device engine
    /// ([`with_engine`](Self::with_engine)): every exchange then runs on the rank's thread.
    pub fn forward_prefetch(mut self, enabled: bool) -> Self {
        self.prefetch = enabled.then(Arc::default);
        self
    }

    /// Whether backward hands each parameter's reduce-scatter to the rank's communication
    /// thread and goes on, the results joining the gradients when it ends (off by default).
    /// The travelling ones hold at most `bucket_bytes` of whole gradients (or one gradient).
    /// Off with a device engine ([`with_engine`](Self::with_engine)), even for the
    /// reduce-scatters that still go through the host (`hybrid_shard` across processes): the
    /// communication thread and the engine would both use the rank's process group.
    pub fn overlap_backward(mut self, enabled: bool) -> Self {
        self.overlap = enabled;
        self.rebuild_exchange()
    }

    /// Gathers and reduce-scatters the shards through `engine` (NCCL between the GPUs of this
    /// process, the fused engine for ranks sharing one device) wherever the ranks involved are
    /// this process's: every exchange of a one-process job, the gathers of `hybrid_shard`.
    /// The rest goes through the host collective.
    pub fn with_engine(mut self, engine: Box<dyn DeviceCollective<Inner<B>>>) -> Self {
        self.engine = Some(Arc::from(engine));
        self.rebuild_exchange()
    }

    fn rebuild_exchange(mut self) -> Self {
        let engine = self.engine.clone();
        self.exchange = exchange(self.rank_state(), self.sharding, self.overlap, engine);
        self
    }
}

/// The exchange behind the gathers of the rank `state` describes, under `sharding`, with
/// backward's reduce-scatters overlapped or not, on the devices through `engine` if there is
/// one.
fn exchange<B: AutodiffBackend>(
    state: &RankState<B>,
    sharding: ShardingStrategy,
    overlap: bool,
    engine: Option<Arc<dyn DeviceCollective<Inner<B>>>>,
) -> Arc<CollectiveExchange> {
    let hybrid = sharding == ShardingStrategy::HybridShard;
    let (collective, in_flight) = (state.shared_collective(), state.bucket_bytes());
    let exchange = CollectiveExchange::new(collective, hybrid, overlap, in_flight);
    Arc::new(match engine {
        Some(engine) => exchange.on_device(engine),
        None => exchange,
    })
}

/// Rank `rank`'s shard of the flat parameter `value` of `shape`: its block of rows, padded with
/// zeros to [`shard_rows`] rows.
pub fn shard_of<IB: burn::tensor::backend::Backend>(
    value: Tensor<IB, 1>,
    shape: &[usize],
    rank: usize,
    world: usize,
) -> Tensor<IB, 1> {
    let (rows_each, per_row) = shard_rows(shape, world);
    let mine = shard_row_range(shape, rank, world);
    let pad = (rows_each - mine.len()) * per_row;
    let (device, dtype) = (value.device(), FloatDType::from(value.dtype()));
    let zeros = |len: usize| Tensor::<IB, 1>::zeros([len], &device).cast(dtype);
    let rows = mine.start * per_row..mine.end * per_row;
    match (mine.is_empty(), pad) {
        (true, _) => zeros(pad),
        (false, 0) => value.slice([rows]),
        (false, _) => Tensor::cat(vec![value.slice([rows]), zeros(pad)], 0),
    }
}

impl<B: AutodiffBackend + GatherParam> Strategy<B> for Fsdp<B> {
    fn name(&self) -> &'static str {
        match self.sharding {
            ShardingStrategy::ShardGradOp => "fsdp_shard_grad_op",
            ShardingStrategy::HybridShard => "fsdp_hybrid_shard",
            _ => "fsdp",
        }
    }

    fn rank_state(&self) -> &RankState<B> {
        self.ddp.rank_state()
    }

    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError> {
        self.ddp.broadcast_parameters(params)
    }

    /// Keeps this rank's block of rows of each trainable parameter; other parameters (buffers
    /// such as BatchNorm's statistics) stay whole.
    fn shard_parameters(
        &self,
        params: Vec<SetupParam<Inner<B>>>,
    ) -> Result<Vec<SetupParam<Inner<B>>>, FabricError> {
        let group = self.shard_group();
        let (rank, world) = (group.rank(), group.world_size());
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut known = HashMap::clone(&shapes);
        let sharded = params
            .into_iter()
            .map(|param| {
                if !param.trainable {
                    return param;
                }
                known.insert(param.id, param.shape.clone());
                let shard = shard_of(param.value, &param.shape, rank, world);
                // A fresh buffer: a slice may be a view that keeps the whole parameter alive.
                let shard = Tensor::from_data(shard.into_data(), self.device());
                SetupParam {
                    value: shard,
                    shape: shard_shape(&param.shape, world),
                    ..param
                }
            })
            .collect();
        *shapes = Arc::new(known);
        Ok(sharded)
    }

    fn gather(&self) -> Option<ParamGather> {
        let shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        Some(ParamGather {
            shapes: Arc::clone(&shapes),
            exchange: self.exchange.clone(),
            tracked: TrackedGather::of::<B>(),
            release: self.sharding != ShardingStrategy::ShardGradOp,
            auto_wrap: self.auto_wrap.clone(),
            // A device engine's gathers run on the rank's thread, in the order they are asked.
            prefetch: self.prefetch.clone().filter(|_| self.engine.is_none()),
        })
    }

    /// The rank's collective, once the communication thread has run what it was handed
    /// (prefetched gathers), so that the caller's collectives meet the other ranks' in order.
    fn collective(&self) -> &dyn Collective {
        self.exchange.wait_idle();
        self.rank_state().collective()
    }

    /// Reduce-scatters left by a backward pass whose gradients never reached the strategy (it
    /// failed, or ran outside it: `loss.backward()` by hand) are not this pass's: dropped.
    fn backward(
        &self,
        loss: Tensor<B, 1>,
        module: &dyn ModuleParams<B>,
        sync: bool,
    ) -> Result<(), FabricError> {
        self.exchange.discard();
        crate::strategy::run_backward(self, loss, module, sync)
    }

    /// A failed pass leaves no communication behind.
    fn pass_result(&self) -> Result<(), FabricError> {
        match self.exchange.take_error() {
            Some(error) => {
                self.exchange.discard();
                self.exchange.wait_idle();
                Err(error.into())
            }
            None => Ok(()),
        }
    }

    /// Backward handed each unit's reduce-scatter to the communication thread as the unit
    /// finished; their results (this rank's parts, averaged) join `grads` here.
    fn accumulate_gradients(
        &self,
        module: &dyn ModuleParams<B>,
        mut grads: Vec<Option<Tensor<Inner<B>, 1>>>,
        sync: bool,
    ) -> Result<(), FabricError> {
        let layout = module.layout();
        self.exchange.deliver(&layout, &mut grads, self.device());
        self.pass_result()?;
        crate::strategy::store_gradients(self, &layout, grads, sync)
    }

    /// The gradients arrive reduce-scattered and averaged by the backward pass itself.
    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<Inner<B>>>,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError> {
        Ok(grads)
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        self.ddp.sampler_shard()
    }

    /// Each rank holds one shard of every gradient: the partial norms add up (the padding rows'
    /// gradients are zero).
    fn clip_gradients_norm(
        &self,
        module: &dyn ModuleParams<B>,
        max_norm: f64,
        norm_type: f64,
    ) -> Result<f64, FabricError> {
        crate::grads::clip_norm(self.rank_state(), module, max_norm, norm_type, |partial| {
            crate::sharded::combine_norm(self.shard_group(), partial, norm_type)
        })
    }

    /// Every rank writes its own shard file (its rows of the parameters and of the optimizer
    /// state) in the directory `path`, marked with the whole shapes so that the checkpoint can
    /// be merged ([`fabric_core::checkpoint::consolidate`]) and cut again at any world size.
    /// Under `hybrid_shard` the ranks of the first process write (the others hold copies).
    fn save_checkpoint(&self, path: &Path, encode: EncodeEntries<'_>) -> Result<(), FabricError> {
        let marker = self.layout().entry();
        let marked = |file: &Path| {
            let mut entries = encode(file)?;
            entries.push(marker.clone());
            Ok(entries)
        };
        let group = self.shard_group();
        let first_copy = self.collective().rank() < group.world_size();
        let shard = first_copy.then(|| (group.rank(), group.world_size()));
        crate::sharded::save_shard(self, path, &marked, shard)
    }

    /// Each rank reads its own shard file when `path` holds FSDP shards of this world size;
    /// any other checkpoint (FSDP shards of another world size, ZeRO shards, a whole file) is
    /// read whole and cut to this rank's rows.
    fn load_checkpoint(&self, path: &Path, apply: ApplyEntries<'_>) -> Result<(), FabricError> {
        let group = self.shard_group();
        let (rank, world) = (group.rank(), group.world_size());
        let read = || {
            let files = match path.is_dir() {
                true => shard_files(path)?,
                false => Vec::new(),
            };
            if files.len() == world {
                let file = path.join(shard_file_name(rank, world));
                let mut entries = read_file(&file)?;
                if let Some(saved) = RowShards::take(&file, &mut entries)? {
                    return self.check_layout(&file, &saved).map(|()| entries);
                }
            } else if let Some(resharded) = self.reshard(path, &files, rank, world)? {
                return Ok(resharded);
            }
            let whole = match path.is_dir() {
                true => read_consolidated(path)?,
                false => read_file(path)?,
            };
            cut_rows(whole, &self.layout().shapes, rank, world, path)
        };
        checkpoint_io::load_entries(self.rank_state(), path, read, apply)
    }
}

impl<B: AutodiffBackend + GatherParam> Fsdp<B> {
    /// The ranks that share the parameters out between them: the process's ranks under
    /// `hybrid_shard` in a job of several processes, every rank otherwise.
    fn shard_group(&self) -> &dyn Collective {
        shard_group(
            self.collective(),
            self.sharding == ShardingStrategy::HybridShard,
        )
    }

    /// This rank's layout: the ranks one copy is cut among and the whole shapes of the sharded
    /// parameters.
    fn layout(&self) -> RowShards {
        let shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        RowShards {
            world_size: self.shard_group().world_size(),
            shapes: shapes
                .iter()
                .map(|(id, shape)| (id.serialize(), shape.clone()))
                .collect(),
        }
    }

    /// An FSDP checkpoint (directory `dir`) saved at another world size, cut into this rank's
    /// rows one saved file at a time (never the whole model in memory); `None` when `files` are
    /// not FSDP shards of this module's parameters (ZeRO's shards, another model), which go
    /// through the consolidated path and its errors.
    fn reshard(
        &self,
        dir: &Path,
        files: &[PathBuf],
        rank: usize,
        world: usize,
    ) -> Result<Option<Vec<Entry>>, FabricError> {
        let Some(first) = files.first() else {
            return Ok(None);
        };
        let mut entries = read_file(first)?;
        let saved = match RowShards::take(first, &mut entries)? {
            Some(saved)
                if saved.world_size == files.len() && saved.shapes == self.layout().shapes =>
            {
                saved
            }
            _ => return Ok(None),
        };
        let mut first = Some(entries);
        let read_shard = |k: usize| -> Result<Vec<Entry>, FabricError> {
            if let Some(entries) = first.take().filter(|_| k == 0) {
                return Ok(entries);
            }
            let file = &files[k];
            let mut entries = read_file(file)?;
            match RowShards::take(file, &mut entries)? {
                Some(layout) if layout == saved => Ok(entries),
                _ => Err(RowShards::foreign(file)),
            }
        };
        reshard_rows(&saved, rank, world, read_shard, dir).map(Some)
    }

    /// A shard file saved at this world size must cut the parameters as this job does.
    fn check_layout(&self, file: &Path, saved: &RowShards) -> Result<(), FabricError> {
        let mine = self.layout();
        let differs = mine
            .shapes
            .iter()
            .find(|(id, shape)| saved.shapes.get(*id).is_some_and(|s| s != *shape));
        match differs {
            Some((id, shape)) => Err(error(
                file,
                None,
                format!(
                    "parameter {id} has the whole shape {:?} in the checkpoint but {shape:?} in \
                     the module",
                    saved.shapes[id]
                ),
            )),
            None => Ok(()),
        }
    }
}

/// The ranks one copy of the parameters is cut among: the process's under `hybrid`, when the
/// job spans several processes; every rank otherwise.
pub(crate) fn shard_group(world: &dyn Collective, hybrid: bool) -> &dyn Collective {
    match hybrid {
        true => world.within_process().unwrap_or(world),
        false => world,
    }
}

/// Places a module's parameters on a sharding strategy's rank one parameter at a time, so that
/// no rank ever holds the whole model: global rank 0 materialises each parameter (Burn's lazy
/// initialisation runs then, in visit order, so the model is the same at every world size),
/// broadcasts it, and every rank keeps its part ([`Strategy::shard_parameters`]); the other
/// ranks never run the parameters' initialisers. Parameters get the ids `ids` yields.
///
/// A collective's error stops the placing (the remaining parameters are left as they are) and
/// is kept in [`error`](Self::error).
pub struct PlaceShards<'a, B: AutodiffBackend, I: Iterator<Item = ParamId>> {
    strategy: &'a dyn Strategy<B>,
    ids: I,
    /// The first error met.
    pub error: Option<FabricError>,
}

impl<'a, B: AutodiffBackend, I: Iterator<Item = ParamId>> PlaceShards<'a, B, I> {
    /// Places parameters through `strategy`, naming them with `ids`.
    pub fn new(strategy: &'a dyn Strategy<B>, ids: I) -> Self {
        Self {
            strategy,
            ids,
            error: None,
        }
    }

    /// Rank 0's value of `param` (flattened) and whether it requires grad, on every rank.
    fn broadcast<const D: usize>(
        &self,
        param: &Param<Tensor<B, D>>,
    ) -> Result<(Tensor<Inner<B>, 1>, bool), FabricError> {
        let device = self.strategy.device();
        let numel = param.lazy_shape().num_elements();
        let collective = self.strategy.collective();
        let dtypes = [DType::F32, DType::F64, DType::F16, DType::BF16];
        let (value, header) = match collective.rank() {
            0 => {
                let value = param.val();
                // -1: a dtype the others cannot receive; every rank then fails alike.
                let code = dtypes.iter().position(|d| *d == value.dtype());
                let code = code.map_or(-1.0, |c| c as f32);
                let header = [value.is_require_grad() as u8 as f32, code];
                let value = value.inner().reshape([numel]).to_device(device);
                (Some(value), header)
            }
            _ => (None, [0.0; 2]),
        };
        let header = collective.broadcast(TensorData::new(header.to_vec(), [2]), 0)?;
        let header = header.to_vec::<f32>().unwrap_or_default();
        let trainable = header.first().is_some_and(|&t| t != 0.0);
        let code = header.get(1).copied().unwrap_or(-1.0);
        let Some(&dtype) = (code >= 0.0).then(|| dtypes.get(code as usize)).flatten() else {
            return Err(FabricError::Unsupported {
                what: format!(
                    "a parameter of shape {:?} under FSDP",
                    param.lazy_shape().to_vec()
                ),
                reason: "rank 0 holds it in a dtype other than f32, f64, f16 and bf16".into(),
            });
        };
        let value = value.unwrap_or_else(|| {
            Tensor::<Inner<B>, 1>::zeros([numel], device).cast(FloatDType::from(dtype))
        });
        if collective.world_size() == 1 {
            return Ok((value, trainable));
        }
        let mut values = self.strategy.broadcast_parameters(vec![value])?;
        let value = values.pop().ok_or_else(|| FabricError::Data {
            context: "setup",
            message: "the broadcast returned no parameter".into(),
        })?;
        Ok((value, trainable))
    }
}

impl<B: AutodiffBackend, I: Iterator<Item = ParamId>> ModuleMapper<B> for PlaceShards<'_, B, I> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let Some(id) = self.ids.next() else {
            return param;
        };
        // A buffer (BatchNorm's running statistics): Burn maps it while holding a lock that
        // clones of the module share, so no collective may run here; it stays as it is.
        if param.is_initialized() && !param.val().is_require_grad() {
            return param;
        }
        let shape = param.lazy_shape().to_vec();
        let placed = self.broadcast(&param).and_then(|(value, trainable)| {
            let setup = SetupParam {
                id,
                shape,
                trainable,
                value,
            };
            let mut placed = self.strategy.shard_parameters(vec![setup])?;
            placed.pop().ok_or_else(|| FabricError::Data {
                context: "setup",
                message: "the strategy placed no parameter".into(),
            })
        });
        match placed {
            Ok(placed) => {
                let tensor = Tensor::<B, D>::from_inner(
                    placed
                        .value
                        .reshape(burn::tensor::Shape::from(placed.shape)),
                );
                let tensor = match placed.trainable {
                    true => tensor.require_grad(),
                    false => tensor,
                };
                Param::initialized(placed.id, tensor)
            }
            Err(error) => {
                self.error = Some(error);
                param
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn rows_are_cut_into_equal_padded_blocks() {
        assert_eq!(shard_rows(&[5, 3], 2), (3, 3));
        assert_eq!(shard_rows(&[4], 4), (1, 1));
        assert_eq!(shard_rows(&[2, 2], 4), (1, 2));
        let device = Default::default();
        let value =
            Tensor::<Flex, 1>::from_floats([0., 1., 2., 3., 4., 5., 6., 7., 8., 9.], &device);
        let shards: Vec<Vec<f32>> = (0..3)
            .map(|rank| {
                shard_of(value.clone(), &[5, 2], rank, 3)
                    .into_data()
                    .to_vec()
                    .unwrap()
            })
            .collect();
        assert_eq!(shards[0], [0., 1., 2., 3.]);
        assert_eq!(shards[1], [4., 5., 6., 7.]);
        assert_eq!(shards[2], [8., 9., 0., 0.]);
        // More ranks than rows: the last ranks hold padding only.
        let tail = shard_of(value, &[5, 2], 3, 4);
        assert_eq!(tail.into_data().to_vec::<f32>().unwrap(), [0.; 4]);
    }
}
