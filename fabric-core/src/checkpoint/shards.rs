//! Sharded checkpoints: a directory with one checkpoint file per rank (under ZeRO each holding
//! the whole model but only its rank's optimizer state; under FSDP a block of rows of every
//! parameter, see [`rows`](super::rows)), and the consolidation that merges them into one
//! ordinary checkpoint file loadable at any world size.
//!
//! An optimizer record is Burn's named MessagePack: a map whose `item` maps each parameter id
//! to that parameter's state. Shards hold disjoint ids, so merging is a union of the `item`
//! maps, and keeping one rank's part is a filter on them; neither needs the optimizer's type.

use super::record::{read_value, write_value};
use super::rows::{FSDP_SHARDS_KEY, RowShards, merge_rows};
use super::{Entry, EntryKind, decode, encode, error, write_atomic};
use crate::FabricError;
use rmpv::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// File name of rank `rank`'s shard in a job of `world_size` ranks.
pub fn shard_file_name(rank: usize, world_size: usize) -> String {
    format!("shard-{rank:05}-of-{world_size:05}.fabric")
}

/// Reads `(rank, world_size)` back from a shard's file name.
fn parse_shard_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("shard-")?.strip_suffix(".fabric")?;
    let (rank, world) = rest.split_once("-of-")?;
    Some((rank.parse().ok()?, world.parse().ok()?))
}

/// The shard files of the checkpoint directory `dir`, in rank order. Every rank's shard must be
/// there, all from one world size.
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, FabricError> {
    let listing =
        std::fs::read_dir(dir).map_err(|e| error(dir, None, format!("cannot list it: {e}")))?;
    let mut found: Vec<(usize, usize, PathBuf)> = listing
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let (rank, world) = parse_shard_name(&name)?;
            Some((rank, world, entry.path()))
        })
        .collect();
    found.sort();
    let Some(&(_, world, _)) = found.first() else {
        return Err(error(
            dir,
            None,
            "holds no shard files (`shard-RRRRR-of-NNNNN.fabric`); is it a sharded checkpoint?",
        ));
    };
    let worlds: BTreeSet<usize> = found.iter().map(|(_, w, _)| *w).collect();
    if worlds.len() > 1 {
        return Err(error(
            dir,
            None,
            format!("mixes shards of world sizes {worlds:?}"),
        ));
    }
    let ranks: Vec<usize> = found.iter().map(|(r, _, _)| *r).collect();
    if ranks != (0..world).collect::<Vec<_>>() {
        let missing: Vec<usize> = (0..world).filter(|r| !ranks.contains(r)).collect();
        return Err(error(
            dir,
            None,
            format!("a world of {world} ranks, but the shards of ranks {missing:?} are missing"),
        ));
    }
    Ok(found.into_iter().map(|(_, _, path)| path).collect())
}

/// Reads and checks every shard of `dir` and merges them into one whole checkpoint's entries.
/// ZeRO shards: rank 0's entries, with each optimizer entry's state taken from all ranks. FSDP
/// shards: each sharded parameter's rows (and its optimizer state's) from all ranks.
pub fn read_consolidated(dir: &Path) -> Result<Vec<Entry>, FabricError> {
    let files = shard_files(dir)?;
    let mut shards = Vec::new();
    let mut layouts = Vec::new();
    for path in &files {
        let bytes =
            std::fs::read(path).map_err(|e| error(path, None, format!("cannot read it: {e}")))?;
        let mut entries = decode(path, &bytes)?;
        layouts.push(RowShards::take(path, &mut entries)?);
        shards.push(entries);
    }
    if let Some(layout) = layouts.first().cloned().flatten() {
        if let Some(at) = layouts.iter().position(|l| l.as_ref() != Some(&layout)) {
            return Err(RowShards::foreign(&files[at]));
        }
        let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        return merge_rows(shards, &layout, &paths);
    }
    if let Some(at) = layouts.iter().position(Option::is_some) {
        return Err(error(
            &files[at],
            Some(FSDP_SHARDS_KEY),
            "is an FSDP shard among ZeRO shards",
        ));
    }
    let mut shards = shards.into_iter().zip(files);
    let Some((mut merged, _)) = shards.next() else {
        return Ok(Vec::new());
    };
    for (entries, path) in shards {
        for target in merged.iter_mut().filter(|e| e.kind == EntryKind::Optimizer) {
            let Some(part) = entries.iter().find(|e| e.key == target.key) else {
                return Err(error(&path, Some(&target.key), "missing from this shard"));
            };
            target.bytes = merge_records(&target.bytes, &part.bytes)
                .map_err(|reason| error(&path, Some(&target.key), reason))?;
        }
    }
    Ok(merged)
}

/// Merges the shards of the checkpoint directory `dir` into one checkpoint file at `output`
/// (default: `dir` with `.consolidated` appended), loadable at any world size; returns its path.
pub fn consolidate(dir: &Path, output: Option<&Path>) -> Result<PathBuf, FabricError> {
    let output = output.map(Path::to_path_buf).unwrap_or_else(|| {
        let mut name = dir.as_os_str().to_owned();
        name.push(".consolidated");
        PathBuf::from(name)
    });
    let entries = read_consolidated(dir)?;
    write_atomic(&output, &encode(&entries))?;
    Ok(output)
}

/// The `item` map of a record (parameter id → state).
fn items(record: &mut Value) -> Result<&mut Vec<(Value, Value)>, String> {
    let Value::Map(fields) = record else {
        return Err("the record is not a map".into());
    };
    match fields.iter_mut().find(|(k, _)| k.as_str() == Some("item")) {
        Some((_, Value::Map(items))) => Ok(items),
        _ => Err("the record has no `item` map of parameter states".into()),
    }
}

/// `a`'s record with `b`'s parameter states added (`b` wins where both hold one).
pub fn merge_records(a: &[u8], b: &[u8]) -> Result<Vec<u8>, String> {
    let mut a = read_value(a)?;
    let mut b = read_value(b)?;
    let extra = std::mem::take(items(&mut b)?);
    let merged = items(&mut a)?;
    for (key, value) in extra {
        match merged.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => merged.push((key, value)),
        }
    }
    write_value(&a)
}

/// `record` keeping only the states of the parameters whose serialised ids are in `keep`.
pub fn retain_record(record: &[u8], keep: &BTreeSet<String>) -> Result<Vec<u8>, String> {
    let mut value = read_value(record)?;
    items(&mut value)?.retain(|(k, _)| k.as_str().is_some_and(|k| keep.contains(k)));
    write_value(&value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(items: &[(&str, i64)]) -> Vec<u8> {
        let items = items
            .iter()
            .map(|(k, v)| (Value::from(*k), Value::from(*v)))
            .collect();
        let value = Value::Map(vec![
            (Value::from("metadata"), Value::from("m")),
            (Value::from("item"), Value::Map(items)),
        ]);
        write_value(&value).unwrap()
    }

    #[test]
    fn merge_is_the_union_and_retain_filters() {
        let merged = merge_records(&record(&[("a", 1)]), &record(&[("b", 2), ("c", 3)])).unwrap();
        assert_eq!(merged, record(&[("a", 1), ("b", 2), ("c", 3)]));
        let keep: BTreeSet<String> = ["a", "c"].map(String::from).into();
        assert_eq!(
            retain_record(&merged, &keep).unwrap(),
            record(&[("a", 1), ("c", 3)])
        );
    }

    #[test]
    fn a_record_without_items_is_an_error() {
        let value = write_value(&Value::Map(vec![(Value::from("x"), Value::from(1))])).unwrap();
        assert!(merge_records(&value, &value).unwrap_err().contains("item"));
        assert!(merge_records(b"\xc1", &value).is_err());
    }

    #[test]
    fn shard_names_round_trip_and_gaps_are_named() {
        assert_eq!(parse_shard_name(&shard_file_name(3, 12)), Some((3, 12)));
        assert_eq!(parse_shard_name("other.fabric"), None);
        let dir = std::env::temp_dir().join(format!("fabric-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for rank in [0, 2] {
            std::fs::write(dir.join(shard_file_name(rank, 3)), b"").unwrap();
        }
        let err = shard_files(&dir).unwrap_err().to_string();
        assert!(err.contains("[1]"), "{err}");
        std::fs::write(dir.join(shard_file_name(1, 3)), b"").unwrap();
        assert_eq!(shard_files(&dir).unwrap().len(), 3);
        std::fs::write(dir.join(shard_file_name(0, 2)), b"").unwrap();
        assert!(shard_files(&dir).unwrap_err().to_string().contains("mixes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
