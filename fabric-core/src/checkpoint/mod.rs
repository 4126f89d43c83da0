//! Checkpoint files: a container of named entries (module records, optimizer records, plain
//! values), each with a checksum, written so that a crash at any moment leaves the previous
//! file intact.

mod atomic;
mod container;
mod record;
mod rows;
mod shards;
mod steps;

pub use atomic::{remove_stale_temporaries, write_atomic};
pub use container::{Entry, EntryKind, Settings, decode, encode};
pub use record::{decode_record, encode_record};
pub use rows::{
    FSDP_SHARDS_KEY, RowShards, cut_rows, merge_rows, reshard_rows, shard_row_range, shard_rows,
    shard_shape,
};
pub use shards::{
    consolidate, merge_records, read_consolidated, retain_record, shard_file_name, shard_files,
};
pub use steps::{Newest, newest_checkpoint, step_checkpoint};

use crate::FabricError;
use std::path::Path;

/// A [`FabricError::Checkpoint`] about `path` (and `key`, when one entry is to blame).
pub fn error(path: &Path, key: Option<&str>, reason: impl Into<String>) -> FabricError {
    FabricError::Checkpoint {
        path: path.display().to_string(),
        key: key.map(str::to_string),
        reason: reason.into(),
    }
}
