//! `Fabric::save` / `Fabric::load`: what goes into a checkpoint and how it comes back.
//!
//! A [`Checkpoint`] names what to save (modules, optimizers, schedulers, loader epochs, any serde
//! value); a [`Restore`] names where to load it back (in place). Global rank 0 writes, every rank
//! reads, and every rank returns the same outcome. Module records go through Burn's named
//! MessagePack recorder (so `ParamId`s survive and optimizer state still matches its
//! parameters); after loading, each parameter is checked against the module's shape and cast back
//! to the dtype it had (Burn's records load in the default float dtype).

use crate::fabric::Fabric;
use crate::optimizer::FabricOptimizer;
use burn::lr_scheduler::LrScheduler;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::Optimizer;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};
use fabric_core::FabricError;
use fabric_core::backend::BackendDevices;
use fabric_core::checkpoint::{Entry, EntryKind, Settings, decode_record, encode_record, error};
use fabric_core::loader::RankDataLoader;
use fabric_strategies::agree;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;

type Encoded = Result<(EntryKind, Settings, Vec<u8>), String>;

/// Something that can be written into a checkpoint.
trait SaveItem {
    fn encode(&self) -> Encoded;
}

/// Something a checkpoint entry can be loaded into.
trait LoadItem<B: AutodiffBackend> {
    fn kind(&self) -> EntryKind;
    fn decode(&mut self, entry: &Entry, device: &B::Device) -> Result<(), String>;
}

/// What to save: named modules, optimizers, schedulers, loader epochs and values.
#[derive(Default)]
pub struct Checkpoint<'a> {
    items: Vec<(String, Box<dyn SaveItem + 'a>)>,
}

/// Where to load a checkpoint back: the same names, borrowed mutably.
pub struct Restore<'a, B: AutodiffBackend> {
    items: Vec<(String, Box<dyn LoadItem<B> + 'a>)>,
    strict: bool,
}

/// The checkpoint entries a [`Restore`] did not ask for (Lightning returns them from `load`).
#[derive(Debug, Clone, Default)]
pub struct Remainder {
    entries: Vec<Entry>,
}

impl<'a> Checkpoint<'a> {
    /// Nothing to save yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn with(mut self, key: &str, item: impl SaveItem + 'a) -> Self {
        self.items.push((key.to_string(), Box::new(item)));
        self
    }

    /// A module's parameters (and their `ParamId`s).
    pub fn module<B: AutodiffBackend, M: AutodiffModule<B>>(self, key: &str, model: &'a M) -> Self {
        self.with(
            key,
            ModuleItem::<B, M> {
                model,
                _b: Default::default(),
            },
        )
    }

    /// An optimizer's state.
    pub fn optimizer<B, M, O>(self, key: &str, optimizer: &'a FabricOptimizer<B, M, O>) -> Self
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        self.with(key, OptimizerSave(optimizer))
    }

    /// A learning-rate scheduler's state.
    pub fn scheduler<B: Backend, S: LrScheduler>(self, key: &str, scheduler: &'a S) -> Self {
        self.with(key, SchedulerSave::<B, S>(scheduler, Default::default()))
    }

    /// The epoch a data loader starts next.
    pub fn loader<BT: Backend, I, O>(
        self,
        key: &str,
        loader: &'a RankDataLoader<BT, I, O>,
    ) -> Self {
        self.with(key, ValueSave(loader.next_epoch()))
    }

    /// Any serde value (step, epoch, best metric, configuration...).
    pub fn value<T: Serialize>(self, key: &str, value: &'a T) -> Self {
        self.with(key, ValueSave(value))
    }

    /// Encodes every item.
    pub(crate) fn encode(&self) -> Result<Vec<Entry>, (String, String)> {
        self.items
            .iter()
            .map(|(key, item)| {
                let (kind, settings, bytes) = item.encode().map_err(|e| (key.clone(), e))?;
                Ok(Entry {
                    key: key.clone(),
                    kind,
                    settings,
                    bytes,
                })
            })
            .collect()
    }
}

impl<B: AutodiffBackend> Default for Restore<'_, B> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            strict: true,
        }
    }
}

impl<'a, B: AutodiffBackend> Restore<'a, B> {
    /// Nothing to restore: `load` then returns every entry in the [`Remainder`].
    pub fn new() -> Self {
        Self::default()
    }

    fn with(mut self, key: &str, item: impl LoadItem<B> + 'a) -> Self {
        self.items.push((key.to_string(), Box::new(item)));
        self
    }

    /// With `strict` (the default), a key asked for but absent from the file is an error;
    /// without, it is skipped and its target left as it was.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Loads a module in place: shapes must match the module's, dtypes are kept.
    pub fn module<M: AutodiffModule<B>>(self, key: &str, model: &'a mut M) -> Self {
        self.with(key, ModuleLoad { model })
    }

    /// Loads an optimizer's state.
    pub fn optimizer<M, O>(self, key: &str, optimizer: &'a mut FabricOptimizer<B, M, O>) -> Self
    where
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        self.with(key, OptimizerLoad(optimizer))
    }

    /// Loads a learning-rate scheduler's state.
    pub fn scheduler<S: LrScheduler>(self, key: &str, scheduler: &'a mut S) -> Self {
        self.with(key, SchedulerLoad(scheduler))
    }

    /// Sets the epoch a data loader starts next.
    pub fn loader<BT: Backend, I, O>(
        self,
        key: &str,
        loader: &'a mut RankDataLoader<BT, I, O>,
    ) -> Self {
        self.with(key, LoaderLoad(loader))
    }

    /// Replaces a serde value.
    pub fn value<T: DeserializeOwned>(self, key: &str, value: &'a mut T) -> Self {
        self.with(key, ValueLoad(value))
    }
}

impl Remainder {
    /// The keys of the unconsumed entries, in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_str())
    }

    /// Number of unconsumed entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every entry was consumed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// An unconsumed value entry, decoded; `None` if there is no such key.
    pub fn value<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        self.entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| {
                if e.kind != EntryKind::Value {
                    return Err(format!("entry `{key}` is a {:?}, not a value", e.kind));
                }
                serde_json::from_slice(&e.bytes).map_err(|err| format!("entry `{key}`: {err}"))
            })
            .transpose()
    }
}

struct ModuleItem<'a, B, M> {
    model: &'a M,
    _b: std::marker::PhantomData<fn() -> B>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> SaveItem for ModuleItem<'_, B, M> {
    fn encode(&self) -> Encoded {
        let layout = layout::<B, M>(self.model);
        let settings = if layout.iter().any(|p| p.dtype == DType::F64) {
            Settings::Double
        } else {
            Settings::Full
        };
        let bytes = encode_record::<B, _>(self.model.clone().into_record(), settings)?;
        Ok((EntryKind::Module, settings, bytes))
    }
}

struct ModuleLoad<'a, M> {
    model: &'a mut M,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> LoadItem<B> for ModuleLoad<'_, M> {
    fn kind(&self) -> EntryKind {
        EntryKind::Module
    }

    fn decode(&mut self, entry: &Entry, device: &B::Device) -> Result<(), String> {
        let record = decode_record::<B, M::Record>(&entry.bytes, entry.settings, device)?;
        *self.model = load_checked::<B, M>(self.model, record)?;
        Ok(())
    }
}

/// `model` with `record` loaded, after checking every parameter's shape and restoring dtypes.
pub(crate) fn load_checked<B: Backend, M: Module<B>>(
    model: &M,
    record: M::Record,
) -> Result<M, String> {
    let before = layout::<B, M>(model);
    let loaded = model.clone().load_record(record);
    let after = layout::<B, M>(&loaded);
    if before.len() != after.len() {
        return Err(format!(
            "the module has {} parameters but the checkpoint {}",
            before.len(),
            after.len()
        ));
    }
    if let Some((want, got)) = before.iter().zip(&after).find(|(a, b)| a.shape != b.shape) {
        return Err(format!(
            "parameter `{}` has shape {:?} in the checkpoint but {:?} in the module",
            want.path, got.shape, want.shape
        ));
    }
    Ok(loaded.map(&mut CastEach {
        dtypes: before.into_iter().map(|p| p.dtype),
    }))
}

/// One float parameter's path, shape and dtype.
pub(crate) struct ParamInfo {
    pub path: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Every float parameter of `model`, in visit order.
pub(crate) fn layout<B: Backend, M: Module<B>>(model: &M) -> Vec<ParamInfo> {
    struct Layout {
        path: Vec<String>,
        params: Vec<ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for Layout {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            self.params.push(ParamInfo {
                path: self
                    .path
                    .iter()
                    .filter(|p| !p.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("."),
                shape: value.dims().to_vec(),
                dtype: value.dtype(),
            });
        }
    }
    let mut visitor = Layout {
        path: Vec::new(),
        params: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.params
}

/// Casts each float parameter to the next dtype, keeping ids and `require_grad`.
struct CastEach<I: Iterator<Item = DType>> {
    dtypes: I,
}

impl<B: Backend, I: Iterator<Item = DType>> ModuleMapper<B> for CastEach<I> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(dtype) = self.dtypes.next() else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        if tensor.dtype() == dtype {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let target = match dtype {
            DType::F64 => FloatDType::F64,
            DType::F16 => FloatDType::F16,
            DType::BF16 => FloatDType::BF16,
            _ => FloatDType::F32,
        };
        let require_grad = tensor.is_require_grad();
        let mut cast = tensor.cast(target).detach();
        if require_grad {
            cast = cast.require_grad();
        }
        Param::from_mapped_value(id, cast, mapper)
    }
}

struct OptimizerSave<'a, B: AutodiffBackend, M, O>(&'a FabricOptimizer<B, M, O>);

impl<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<M, B>> SaveItem
    for OptimizerSave<'_, B, M, O>
{
    fn encode(&self) -> Encoded {
        Ok((
            EntryKind::Optimizer,
            Settings::Full,
            encode_record::<B, _>(self.0.to_record(), Settings::Full)?,
        ))
    }
}

struct OptimizerLoad<'a, B: AutodiffBackend, M, O>(&'a mut FabricOptimizer<B, M, O>);

impl<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<M, B>> LoadItem<B>
    for OptimizerLoad<'_, B, M, O>
{
    fn kind(&self) -> EntryKind {
        EntryKind::Optimizer
    }

    fn decode(&mut self, entry: &Entry, device: &B::Device) -> Result<(), String> {
        let record = decode_record::<B, O::Record>(&entry.bytes, entry.settings, device)?;
        self.0.set_record(record);
        self.0.mark_loaded();
        Ok(())
    }
}

struct SchedulerSave<'a, B, S>(&'a S, std::marker::PhantomData<fn() -> B>);

impl<B: Backend, S: LrScheduler> SaveItem for SchedulerSave<'_, B, S> {
    fn encode(&self) -> Encoded {
        Ok((
            EntryKind::Scheduler,
            Settings::Full,
            encode_record::<B, _>(self.0.to_record::<B>(), Settings::Full)?,
        ))
    }
}

struct SchedulerLoad<'a, S>(&'a mut S);

impl<B: AutodiffBackend, S: LrScheduler> LoadItem<B> for SchedulerLoad<'_, S> {
    fn kind(&self) -> EntryKind {
        EntryKind::Scheduler
    }

    fn decode(&mut self, entry: &Entry, device: &B::Device) -> Result<(), String> {
        let record = decode_record::<B, S::Record<B>>(&entry.bytes, entry.settings, device)?;
        *self.0 = self.0.clone().load_record::<B>(record);
        Ok(())
    }
}

struct ValueSave<T>(T);

impl<T: Serialize> SaveItem for ValueSave<T> {
    fn encode(&self) -> Encoded {
        let bytes =
            serde_json::to_vec(&self.0).map_err(|e| format!("cannot encode the value: {e}"))?;
        Ok((EntryKind::Value, Settings::Full, bytes))
    }
}

struct ValueLoad<'a, T>(&'a mut T);

impl<B: AutodiffBackend, T: DeserializeOwned> LoadItem<B> for ValueLoad<'_, T> {
    fn kind(&self) -> EntryKind {
        EntryKind::Value
    }

    fn decode(&mut self, entry: &Entry, _device: &B::Device) -> Result<(), String> {
        *self.0 = serde_json::from_slice(&entry.bytes)
            .map_err(|e| format!("the value does not fit: {e}"))?;
        Ok(())
    }
}

struct LoaderLoad<'a, BT: Backend, I, O>(&'a mut RankDataLoader<BT, I, O>);

impl<B: AutodiffBackend, BT: Backend, I, O> LoadItem<B> for LoaderLoad<'_, BT, I, O> {
    fn kind(&self) -> EntryKind {
        EntryKind::Value
    }

    fn decode(&mut self, entry: &Entry, _device: &B::Device) -> Result<(), String> {
        let epoch: u64 =
            serde_json::from_slice(&entry.bytes).map_err(|e| format!("not a loader epoch: {e}"))?;
        self.0.set_epoch(epoch);
        Ok(())
    }
}

impl<'a, B: AutodiffBackend> Restore<'a, B> {
    /// Loads `entries` (read from `path`) into the items, in place; returns the entries not
    /// asked for.
    fn apply(
        &mut self,
        path: &Path,
        mut entries: Vec<Entry>,
        device: &B::Device,
    ) -> Result<Remainder, FabricError> {
        for (key, item) in self.items.iter_mut() {
            let Some(i) = entries.iter().position(|e| &e.key == key) else {
                if self.strict {
                    return Err(error(
                        path,
                        Some(key),
                        "not in the checkpoint (restore with `.strict(false)` to skip missing entries)",
                    ));
                }
                continue;
            };
            let entry = entries.remove(i);
            if entry.kind != item.kind() {
                return Err(error(
                    path,
                    Some(key),
                    format!(
                        "holds a {:?} but a {:?} was asked for",
                        entry.kind,
                        item.kind()
                    ),
                ));
            }
            item.decode(&entry, device)
                .map_err(|reason| error(path, Some(key), reason))?;
        }
        Ok(Remainder { entries })
    }
}

impl<B: AutodiffBackend + BackendDevices> Fabric<B> {
    /// Writes `checkpoint` to `path` and returns on every rank once it is on disk. Under
    /// `16-mixed` the loss scaler's state is saved too.
    ///
    /// Under DDP and on one device global rank 0 writes one file, atomically (a crash leaves
    /// the previous file intact). Under a sharded strategy (`zero1`, `zero2`) `path` is a
    /// directory and every rank writes its own file in it, `shard-RRRRR-of-NNNNN.fabric`,
    /// holding the whole checkpoint with that rank's part of each optimizer's state (see
    /// [`consolidate`](crate::consolidate)).
    pub fn save(
        &self,
        path: impl AsRef<Path>,
        checkpoint: Checkpoint<'_>,
    ) -> Result<(), FabricError> {
        let encode = |file: &Path| {
            checkpoint
                .encode()
                .map_err(|(key, reason)| error(file, Some(&key), reason))
        };
        self.rank_strategy("save")?
            .save_checkpoint(path.as_ref(), &encode)
    }

    /// Loads `path` into what `restore` names, in place, on every rank, and returns the entries
    /// it did not ask for. A missing, truncated or corrupted file, or one whose shapes do not
    /// fit, is an error naming the file and the first offending entry, on every rank. Stale
    /// temporaries of an earlier killed save are removed. Under `16-mixed` the loss scaler's
    /// state is restored.
    ///
    /// A directory of shards (written under `zero1`/`zero2`) loads each rank's own shard when
    /// the strategy is sharded at the same world size; otherwise the shards are consolidated in
    /// memory first, so it loads at any world size and under any strategy. A sharded strategy
    /// that loads a whole optimizer state keeps only its own part of it (at the next step).
    pub fn load(
        &mut self,
        path: impl AsRef<Path>,
        mut restore: Restore<'_, B>,
    ) -> Result<Remainder, FabricError> {
        let strategy = self.rank_strategy("load")?;
        let device = strategy.device().clone();
        let mut remainder = Remainder::default();
        strategy.load_checkpoint(path.as_ref(), &mut |file, entries| {
            remainder = restore.apply(file, entries, &device)?;
            Ok(())
        })?;
        Ok(remainder)
    }

    /// Loads a plain Burn module file (written by `Module::save_file` with
    /// `NamedMpkFileRecorder<FullPrecisionSettings>`) into `model`, with the same shape checks.
    pub fn load_raw<M: AutodiffModule<B>>(
        &self,
        path: impl AsRef<Path>,
        model: &mut M,
    ) -> Result<(), FabricError> {
        let path = path.as_ref();
        let strategy = self.rank_strategy("load_raw")?;
        let loaded = fabric_strategies::read(path).and_then(|bytes| {
            let record = decode_record::<B, M::Record>(&bytes, Settings::Full, strategy.device())
                .map_err(|reason| error(path, None, reason))?;
            load_checked::<B, M>(model, record).map_err(|reason| error(path, None, reason))
        });
        *model = agree(
            strategy.collective(),
            "load_raw",
            path,
            loaded,
            "another rank could not load it",
        )?;
        Ok(())
    }
}
