//! What sharding strategies share (Lightning's `_Sharded`): each rank owns a part of the
//! parameters, steps only those, and saves its own shard of the checkpoint. DDP and single
//! device never see this code; a sharded strategy overrides [`Strategy`]'s step, clipping and
//! checkpoint I/O with the functions here.

use crate::checkpoint_io::{self, ApplyEntries, EncodeEntries, read_file};
use crate::module::{FlatGrad, ParamSlot, StepTarget};
use crate::strategy::Strategy;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fabric_collective::{Collective, ReduceOp, all_reduce_scalar};
use fabric_core::FabricError;
use fabric_core::checkpoint::{
    FSDP_SHARDS_KEY, encode, error, read_consolidated, remove_stale_temporaries, shard_file_name,
    shard_files, write_atomic,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// A strategy whose ranks each own a part of the parameters.
pub trait Sharded<B: AutodiffBackend>: Strategy<B> {
    /// The owning rank of each parameter of `layout`; the same on every rank.
    fn owners(&self, layout: &[ParamSlot]) -> Vec<usize>;

    /// After a sharded step, gives every rank the updated trainable parameters (flattened,
    /// layout order; only those this rank owns are current here).
    fn sync_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
        layout: &[ParamSlot],
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError>;
}

/// The optimizer step of a sharded strategy: each rank steps the parameters it owns (so its
/// optimizer state covers only those; a freshly loaded whole record is trimmed to them), then
/// the owners hand the updated values to everyone.
pub fn step<B: AutodiffBackend, S: Sharded<B> + ?Sized>(
    strategy: &S,
    lr: f64,
    target: &mut dyn StepTarget<B>,
) -> Result<(), FabricError> {
    let layout = target.layout();
    let rank = strategy.collective().rank();
    let owned: Vec<bool> = strategy
        .owners(&layout)
        .into_iter()
        .map(|owner| owner == rank)
        .collect();
    let grads: Vec<FlatGrad<Inner<B>>> = strategy
        .rank_state()
        .grads()
        .take(&layout)
        .into_iter()
        .zip(&owned)
        .map(|(g, &mine)| FlatGrad {
            grad: g.grad.filter(|_| mine),
            ..g
        })
        .collect();
    if !strategy.precision().step_allowed() {
        return Ok(());
    }
    if target.take_loaded() {
        let keep: BTreeSet<String> = layout
            .iter()
            .zip(&owned)
            .filter(|(_, mine)| **mine)
            .map(|(slot, _)| slot.id.serialize())
            .collect();
        target
            .retain_state(&keep)
            .map_err(|message| FabricError::Data {
                context: "optimizer state",
                message,
            })?;
    }
    target.step(lr, grads);
    let synced = strategy.sync_parameters(target.values(), &layout)?;
    target.assign(synced);
    Ok(())
}

/// Combines this rank's partial gradient norm into the job's (a sum of `|g|^p`, or the max for
/// the infinity norm): each rank holds only its own gradients (its parameters under ZeRO, its
/// rows of every parameter under FSDP).
pub fn combine_norm(
    collective: &dyn Collective,
    partial: f64,
    norm_type: f64,
) -> Result<f64, FabricError> {
    let op = if norm_type.is_infinite() {
        ReduceOp::Max
    } else {
        ReduceOp::Sum
    };
    all_reduce_scalar(collective, partial, op)
}

/// Every rank writes its own file in the directory `path`, `shard-RRRRR-of-NNNNN.fabric`,
/// holding the entries its `encode_entries` makes (under ZeRO the whole checkpoint with that
/// rank's part of each optimizer's state).
pub fn save<B: AutodiffBackend, S: Strategy<B> + ?Sized>(
    strategy: &S,
    path: &Path,
    encode_entries: EncodeEntries<'_>,
) -> Result<(), FabricError> {
    let collective = strategy.collective();
    let shard = (collective.rank(), collective.world_size());
    save_shard(strategy, path, encode_entries, Some(shard))
}

/// Writes this rank's file as shard `(rank, of)` of the directory `path` (`None`: this rank
/// writes nothing, another holds the same shard), and agrees on the outcome with every rank.
pub fn save_shard<B: AutodiffBackend, S: Strategy<B> + ?Sized>(
    strategy: &S,
    path: &Path,
    encode_entries: EncodeEntries<'_>,
    shard: Option<(usize, usize)>,
) -> Result<(), FabricError> {
    let state = strategy.rank_state();
    let written = match shard {
        Some((rank, of)) => prepare_shard_dir(path, rank, of).and_then(|file| {
            let entries = checkpoint_io::entries(state, &file, encode_entries)?;
            write_atomic(&file, &encode(&entries))
        }),
        None => Ok(()),
    };
    checkpoint_io::agree(
        state.collective(),
        "save",
        path,
        written,
        "another rank could not write its shard",
    )
}

/// Each rank loads its own shard when the directory holds ZeRO shards of this world size;
/// otherwise (another world size, FSDP shards, or a whole file) the checkpoint is read whole,
/// and the next step keeps only this rank's part of the optimizer state.
pub fn load<B: AutodiffBackend, S: Sharded<B> + ?Sized>(
    strategy: &S,
    path: &Path,
    apply: ApplyEntries<'_>,
) -> Result<(), FabricError> {
    let collective = strategy.collective();
    let (rank, world) = (collective.rank(), collective.world_size());
    let read = || {
        if !path.is_dir() {
            return read_file(path);
        }
        if shard_files(path)?.len() == world {
            let file = path.join(shard_file_name(rank, world));
            let entries = read_file(&file)?;
            // FSDP's shards hold rows, not whole parameters: those are merged first.
            if !entries.iter().any(|e| e.key == FSDP_SHARDS_KEY) {
                return Ok(entries);
            }
        }
        read_consolidated(path)
    };
    checkpoint_io::load_entries(strategy.rank_state(), path, read, apply)
}

/// Creates the shard directory `dir` (rank 0 also removes shards of another world size) and
/// returns this rank's shard file in it.
fn prepare_shard_dir(dir: &Path, rank: usize, world: usize) -> Result<PathBuf, FabricError> {
    if dir.is_file() {
        return Err(error(
            dir,
            None,
            "is a file, but a sharded strategy saves a directory of shards",
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| error(dir, None, format!("cannot create the directory: {e}")))?;
    if rank == 0 {
        // Killed saves' temporaries here and in the other checkpoints' shard directories.
        remove_stale_temporaries(dir.parent().unwrap_or(Path::new(".")));
        let stale = std::fs::read_dir(dir).into_iter().flatten().flatten();
        for entry in stale {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("shard-") && !name.ends_with(&format!("-of-{world:05}.fabric")) {
                // A leftover of another world size would make the set inconsistent.
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(dir.join(shard_file_name(rank, world)))
}
