//! Checkpoint I/O for a rank (Lightning's `CheckpointIO` as the strategy drives it): whole files
//! written by global rank 0, read by every rank, and the agreement that makes a failure on one
//! rank an error on all.

use crate::rank_state::RankState;
use burn::tensor::backend::AutodiffBackend;
use fabric_collective::{Collective, ReduceOp, all_reduce_scalar};
use fabric_core::FabricError;
use fabric_core::checkpoint::{
    Entry, decode, encode, error, read_consolidated, remove_stale_temporaries, write_atomic,
};
use std::path::Path;

/// Makes the entries to save (errors name the file at the path given and the entry).
pub type EncodeEntries<'a> = &'a dyn Fn(&Path) -> Result<Vec<Entry>, FabricError>;

/// Takes the entries a checkpoint held at the path given (the precision's own already removed).
pub type ApplyEntries<'a> = &'a mut dyn FnMut(&Path, Vec<Entry>) -> Result<(), FabricError>;

/// What `encode` makes, plus the precision's own state.
pub fn entries<B: AutodiffBackend>(
    state: &RankState<B>,
    path: &Path,
    encode: EncodeEntries<'_>,
) -> Result<Vec<Entry>, FabricError> {
    let mut entries = encode(path)?;
    state
        .precision()
        .save_state(&mut entries)
        .map_err(|reason| error(path, None, reason))?;
    Ok(entries)
}

/// Global rank 0 writes the whole checkpoint to `path`, atomically.
pub fn save_whole<B: AutodiffBackend>(
    state: &RankState<B>,
    path: &Path,
    encode_entries: EncodeEntries<'_>,
) -> Result<(), FabricError> {
    let collective = state.collective();
    let written = if collective.rank() == 0 {
        entries(state, path, encode_entries).and_then(|e| write_atomic(path, &encode(&e)))
    } else {
        Ok(())
    };
    agree(
        collective,
        "save",
        path,
        written,
        "rank 0 could not write it",
    )
}

/// Every rank reads `path` (a file, or a directory of shards consolidated in memory) and
/// applies it.
pub fn load_whole<B: AutodiffBackend>(
    state: &RankState<B>,
    path: &Path,
    apply: ApplyEntries<'_>,
) -> Result<(), FabricError> {
    let read = || {
        if path.is_dir() {
            read_consolidated(path)
        } else {
            read_file(path)
        }
    };
    load_entries(state, path, read, apply)
}

/// Reads the entries with `read`, restores the precision's state from them, hands the rest to
/// `apply`, and agrees on the outcome. Rank 0 first removes the stale temporaries of earlier
/// killed saves beside it.
pub fn load_entries<B: AutodiffBackend>(
    state: &RankState<B>,
    path: &Path,
    read: impl FnOnce() -> Result<Vec<Entry>, FabricError>,
    apply: ApplyEntries<'_>,
) -> Result<(), FabricError> {
    let collective = state.collective();
    if collective.rank() == 0 {
        remove_stale_temporaries(path.parent().unwrap_or(Path::new(".")));
    }
    let loaded = read().and_then(|mut entries| {
        state.precision().load_state(path, &mut entries)?;
        apply(path, entries)
    });
    agree(
        collective,
        "load",
        path,
        loaded,
        "another rank could not load it",
    )
}

/// The entries of the checkpoint file at `path`.
pub fn read_file(path: &Path) -> Result<Vec<Entry>, FabricError> {
    decode(path, &read(path)?)
}

/// The bytes of `path`, or an error naming it.
pub fn read(path: &Path) -> Result<Vec<u8>, FabricError> {
    std::fs::read(path).map_err(|e| {
        let reason = if e.kind() == std::io::ErrorKind::NotFound {
            "not found".to_string()
        } else {
            format!("cannot read it: {e}")
        };
        error(path, None, reason)
    })
}

/// Makes every rank return an error if any rank failed `operation` on `path`; `elsewhere` says
/// what went wrong on the others.
pub fn agree<T>(
    collective: &dyn Collective,
    operation: &'static str,
    path: &Path,
    outcome: Result<T, FabricError>,
    elsewhere: &str,
) -> Result<T, FabricError> {
    if collective.world_size() == 1 {
        return outcome;
    }
    let mine = f64::from(u8::from(outcome.is_err()));
    let failed = all_reduce_scalar(collective, mine, ReduceOp::Max)?;
    match outcome {
        Ok(_) if failed > 0.0 => Err(error(
            path,
            None,
            format!("`{operation}` failed: {elsewhere}"),
        )),
        outcome => outcome,
    }
}
