//! FSDP checkpoints: each rank's shard file holds a block of rows of every sharded parameter
//! (and of the optimizer state that matches it). Merging the blocks of all ranks gives an
//! ordinary whole checkpoint; cutting a whole checkpoint gives any rank of any world size its
//! block. Both work on the MessagePack records directly, so neither needs the module's or the
//! optimizer's type.
//!
//! A record's tensor is a map `{bytes, dtype, shape}`. In a module record it sits under a
//! parameter `{id, param}`; in an optimizer record under `item.<id>`, somewhere in that
//! parameter's state (Adam's moments). A tensor of a sharded parameter is recognised by its
//! shape: the whole shape in a whole record, the shard shape in a shard.

use super::record::{read_value, write_value};
use super::{Entry, EntryKind, error};
use crate::FabricError;
use rmpv::Value;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The key of the entry that marks a shard file of an FSDP checkpoint; it holds [`RowShards`].
pub const FSDP_SHARDS_KEY: &str = "fabric.fsdp_shards";

/// How an FSDP checkpoint is cut: the world size that saved it and the whole shape of each
/// sharded parameter, by serialised `ParamId`. Parameters not listed are whole in every shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RowShards {
    /// Ranks that saved it, one shard file each.
    pub world_size: usize,
    /// Whole shape of every sharded parameter.
    pub shapes: BTreeMap<String, Vec<usize>>,
}

impl RowShards {
    /// The marker entry a shard file carries.
    pub fn entry(&self) -> Entry {
        Entry {
            key: FSDP_SHARDS_KEY.into(),
            kind: EntryKind::Value,
            settings: Default::default(),
            // A map of strings to integer lists always serialises.
            bytes: serde_json::to_vec(self).unwrap_or_default(),
        }
    }

    /// The error for the shard file `path` whose marker is not rank 0's.
    pub fn foreign(path: &Path) -> FabricError {
        error(
            path,
            Some(FSDP_SHARDS_KEY),
            "does not belong with rank 0's shard (another FSDP layout, or a ZeRO shard)",
        )
    }

    /// Removes the marker from `entries` and returns it; `None` when there is none (a whole
    /// checkpoint, or a ZeRO shard).
    pub fn take(path: &Path, entries: &mut Vec<Entry>) -> Result<Option<Self>, FabricError> {
        let Some(at) = entries.iter().position(|e| e.key == FSDP_SHARDS_KEY) else {
            return Ok(None);
        };
        let marker = entries.remove(at);
        serde_json::from_slice(&marker.bytes)
            .map(Some)
            .map_err(|e| error(path, Some(FSDP_SHARDS_KEY), format!("unreadable: {e}")))
    }
}

/// The rows of a parameter of `shape` that each of `world` ranks holds (the first dimension
/// divided, rounded up; the last block padded), and the elements per row.
pub fn shard_rows(shape: &[usize], world: usize) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1);
    let per_row = shape.iter().skip(1).product::<usize>();
    (rows.div_ceil(world.max(1)), per_row)
}

/// The rows of the whole parameter of `shape` that rank `rank` of `world` holds (fewer than
/// [`shard_rows`] in the last blocks, none past the end: those rows are padding).
pub fn shard_row_range(shape: &[usize], rank: usize, world: usize) -> std::ops::Range<usize> {
    let rows = shape.first().copied().unwrap_or(1);
    let rows_each = shard_rows(shape, world).0;
    (rank * rows_each).min(rows)..((rank + 1) * rows_each).min(rows)
}

/// The shape of one rank's block of a parameter of `shape`.
pub fn shard_shape(shape: &[usize], world: usize) -> Vec<usize> {
    let mut shard = shape.to_vec();
    if let Some(rows) = shard.first_mut() {
        *rows = shard_rows(shape, world).0;
    }
    shard
}

/// One whole checkpoint from the entries of every rank's shard file (rank order; markers
/// already taken): rank 0's entries, each sharded tensor the concatenation of the ranks'
/// blocks without the padding. `paths` name the files in errors.
pub fn merge_rows(
    shards: Vec<Vec<Entry>>,
    layout: &RowShards,
    paths: &[&Path],
) -> Result<Vec<Entry>, FabricError> {
    let here = |rank: usize| paths.get(rank).copied().unwrap_or(Path::new("."));
    if shards.len() != layout.world_size {
        return Err(error(
            here(0),
            Some(FSDP_SHARDS_KEY),
            format!(
                "saved by {} ranks, but {} shard files were read",
                layout.world_size,
                shards.len()
            ),
        ));
    }
    let mut shards = shards.into_iter();
    let Some(first) = shards.next() else {
        return Ok(Vec::new());
    };
    let others: Vec<Vec<Entry>> = shards.collect();
    first
        .into_iter()
        .map(|mut entry| {
            if !matches!(entry.kind, EntryKind::Module | EntryKind::Optimizer) {
                return Ok(entry);
            }
            let mut values =
                vec![read_value(&entry.bytes).map_err(|r| error(here(0), Some(&entry.key), r))?];
            for (rank, entries) in others.iter().enumerate() {
                let part = entries.iter().find(|e| e.key == entry.key).ok_or_else(|| {
                    error(here(rank + 1), Some(&entry.key), "missing from this shard")
                })?;
                values.push(
                    read_value(&part.bytes)
                        .map_err(|r| error(here(rank + 1), Some(&entry.key), r))?,
                );
            }
            let merged = Merge { layout }
                .record(entry.kind, &values)
                .and_then(|v| write_value(&v))
                .map_err(|r| error(here(0), Some(&entry.key), r))?;
            entry.bytes = merged;
            Ok(entry)
        })
        .collect()
}

/// `entries` of a whole checkpoint with every tensor of a parameter in `shapes` (whole shape,
/// by serialised id) cut to rank `rank`'s block of `world`.
pub fn cut_rows(
    entries: Vec<Entry>,
    shapes: &BTreeMap<String, Vec<usize>>,
    rank: usize,
    world: usize,
    path: &Path,
) -> Result<Vec<Entry>, FabricError> {
    let cut = Cut {
        shapes,
        rank,
        world,
    };
    entries
        .into_iter()
        .map(|mut entry| {
            if matches!(entry.kind, EntryKind::Module | EntryKind::Optimizer) {
                entry.bytes = read_value(&entry.bytes)
                    .and_then(|mut v| {
                        cut.record(entry.kind, &mut v)?;
                        write_value(&v)
                    })
                    .map_err(|r| error(path, Some(&entry.key), r))?;
            }
            Ok(entry)
        })
        .collect()
}

/// Rank `rank` of `world`'s entries of an FSDP checkpoint saved at another world size
/// (`saved`), read one saved shard file at a time (`read(k)`: file `k`'s entries, marker taken):
/// each tensor of a sharded parameter becomes this rank's block of rows (the last padded),
/// filled from the saved blocks it overlaps; everything else is saved rank 0's. Holds at most
/// this rank's blocks and one saved file, never the whole model. `path` names the checkpoint
/// in errors.
pub fn reshard_rows(
    saved: &RowShards,
    rank: usize,
    world: usize,
    mut read: impl FnMut(usize) -> Result<Vec<Entry>, FabricError>,
    path: &Path,
) -> Result<Vec<Entry>, FabricError> {
    let mut entries = read(0)?;
    let mut records = Vec::with_capacity(entries.len());
    for entry in &entries {
        let record = match entry.kind {
            EntryKind::Module | EntryKind::Optimizer => {
                Some(read_value(&entry.bytes).map_err(|r| error(path, Some(&entry.key), r))?)
            }
            _ => None,
        };
        records.push(record);
    }
    for from in 0..saved.world_size {
        let place = Place {
            saved,
            rank,
            world,
            from,
        };
        // Saved rank 0's file is the one the records came from; later files are read now.
        let others = match from {
            0 => None,
            _ => Some(read(from)?),
        };
        for (entry, record) in entries.iter().zip(records.iter_mut()) {
            let Some(record) = record else { continue };
            let placed = match &others {
                None => {
                    let original = record.clone();
                    place
                        .each_param(entry.kind, record, &original, &mut |acc, _, shape| {
                            place.blank(acc, shape)
                        })
                        .and_then(|()| {
                            place.each_param(entry.kind, record, &original, &mut |acc, part, s| {
                                place.copy(acc, part, s)
                            })
                        })
                }
                Some(others) => {
                    let part = others.iter().find(|e| e.key == entry.key).ok_or_else(|| {
                        error(path, Some(&entry.key), format!("missing from shard {from}"))
                    })?;
                    let part =
                        read_value(&part.bytes).map_err(|r| error(path, Some(&entry.key), r))?;
                    place.each_param(entry.kind, record, &part, &mut |acc, part, shape| {
                        place.copy(acc, part, shape)
                    })
                }
            };
            placed.map_err(|r| error(path, Some(&entry.key), format!("shard {from}: {r}")))?;
        }
    }
    for (entry, record) in entries.iter_mut().zip(records) {
        if let Some(record) = record {
            entry.bytes = write_value(&record).map_err(|r| error(path, Some(&entry.key), r))?;
        }
    }
    Ok(entries)
}

/// Places saved rank `from`'s blocks (of `saved.world_size`) into rank `rank`'s of `world`.
struct Place<'a> {
    saved: &'a RowShards,
    rank: usize,
    world: usize,
    from: usize,
}

/// A visit of one parameter's subtree in the record being built and in a saved record.
type Visit<'v> = dyn FnMut(&mut Value, &Value, &[usize]) -> Result<(), String> + 'v;

impl Place<'_> {
    /// Calls `visit(acc, part, whole shape)` with each sharded parameter's subtree of `acc`
    /// (its `param` in a module record, its state in an optimizer record) and the same
    /// subtree of `part`.
    fn each_param(
        &self,
        kind: EntryKind,
        acc: &mut Value,
        part: &Value,
        visit: &mut Visit<'_>,
    ) -> Result<(), String> {
        if kind == EntryKind::Module {
            return self.params(acc, part, visit);
        }
        let (Some(Value::Map(items)), Some(parts)) = (field_mut(acc, "item"), field(part, "item"))
        else {
            return Ok(());
        };
        for (key, state) in items.iter_mut() {
            let Some((id, shape)) = key
                .as_str()
                .and_then(|id| Some((id, self.saved.shapes.get(id)?)))
            else {
                continue;
            };
            let other = field(parts, id).ok_or("a shard lacks a parameter's optimizer state")?;
            visit(state, other, shape)?;
        }
        Ok(())
    }

    fn params(&self, acc: &mut Value, part: &Value, visit: &mut Visit<'_>) -> Result<(), String> {
        let id = field(acc, "id").and_then(Value::as_str).map(str::to_string);
        if let Some(shape) = id.and_then(|id| self.saved.shapes.get(&id))
            && let (Some(param), Some(other)) = (field_mut(acc, "param"), field(part, "param"))
        {
            return visit(param, other, shape);
        }
        in_step(acc, part, &mut |a, p| self.params(a, p, visit))
    }

    /// Replaces every saved block (saved shard shape) in `acc` by this rank's block of zeros.
    fn blank(&self, acc: &mut Value, shape: &[usize]) -> Result<(), String> {
        let saved_rows = shard_rows(shape, self.saved.world_size).0;
        if tensor_shape(acc).as_deref() == Some(&shard_shape(shape, self.saved.world_size)[..]) {
            let bytes = field(acc, "bytes").and_then(Value::as_slice).unwrap_or(&[]);
            let per_row = row_bytes(bytes.len(), saved_rows)?;
            let rows = shard_rows(shape, self.world).0;
            set_tensor(
                acc,
                vec![0; rows * per_row],
                &shard_shape(shape, self.world),
            );
            return Ok(());
        }
        children(acc).try_for_each(|child| self.blank(child, shape))
    }

    /// Copies the rows of each saved block in `part` that fall in this rank's block into the
    /// block at the same place in `acc`.
    fn copy(&self, acc: &mut Value, part: &Value, shape: &[usize]) -> Result<(), String> {
        let saved_world = self.saved.world_size;
        if tensor_shape(part).as_deref() != Some(&shard_shape(shape, saved_world)[..]) {
            return in_step(acc, part, &mut |a, p| self.copy(a, p, shape));
        }
        let src = field(part, "bytes")
            .and_then(Value::as_slice)
            .unwrap_or(&[]);
        let per_row = row_bytes(src.len(), shard_rows(shape, saved_world).0)?;
        let held = shard_row_range(shape, self.from, saved_world);
        let mine = shard_row_range(shape, self.rank, self.world);
        let (lo, hi) = (held.start.max(mine.start), held.end.min(mine.end));
        if lo >= hi {
            return Ok(());
        }
        let from = src.get((lo - held.start) * per_row..(hi - held.start) * per_row);
        let to = match field_mut(acc, "bytes") {
            Some(Value::Binary(dst)) => {
                dst.get_mut((lo - mine.start) * per_row..(hi - mine.start) * per_row)
            }
            _ => None,
        };
        match (from, to) {
            (Some(from), Some(to)) => {
                to.copy_from_slice(from);
                Ok(())
            }
            _ => Err("a saved block and this rank's block differ in size".into()),
        }
    }
}

/// Calls `visit` on each child of `acc` with the same child of `part` (by key in maps, by
/// position in arrays).
fn in_step(
    acc: &mut Value,
    part: &Value,
    visit: &mut dyn FnMut(&mut Value, &Value) -> Result<(), String>,
) -> Result<(), String> {
    const DIFFER: &str = "the shards' records differ in structure";
    match (acc, part) {
        (Value::Map(fields), Value::Map(others)) => {
            for (key, child) in fields.iter_mut() {
                let other = others.iter().find(|(k, _)| k == key).ok_or(DIFFER)?;
                visit(child, &other.1)?;
            }
        }
        (Value::Array(items), Value::Array(others)) => {
            for (child, other) in items.iter_mut().zip(others) {
                visit(child, other)?;
            }
        }
        (Value::Map(_) | Value::Array(_), _) => return Err(DIFFER.into()),
        _ => {}
    }
    Ok(())
}

/// The value of `key` in the map `value`.
fn field<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match value {
        Value::Map(fields) => fields
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn field_mut<'a>(value: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    match value {
        Value::Map(fields) => fields
            .iter_mut()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// The shape of a tensor map `{bytes, dtype, shape}`, or `None` for any other value.
fn tensor_shape(value: &Value) -> Option<Vec<usize>> {
    field(value, "bytes")?.as_slice()?;
    field(value, "dtype")?;
    let dims = field(value, "shape")?.as_array()?;
    dims.iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect()
}

/// Rewrites a tensor map's bytes and shape.
fn set_tensor(value: &mut Value, bytes: Vec<u8>, shape: &[usize]) {
    if let Some(slot) = field_mut(value, "bytes") {
        *slot = Value::Binary(bytes);
    }
    if let Some(slot) = field_mut(value, "shape") {
        *slot = Value::Array(shape.iter().map(|&d| Value::from(d as u64)).collect());
    }
}

/// Bytes per row of a tensor holding `rows` rows in `bytes` bytes.
fn row_bytes(bytes: usize, rows: usize) -> Result<usize, String> {
    match rows {
        0 => Ok(0),
        _ if bytes.is_multiple_of(rows) => Ok(bytes / rows),
        _ => Err(format!("{bytes} bytes do not split into {rows} rows")),
    }
}

struct Merge<'a> {
    layout: &'a RowShards,
}

impl Merge<'_> {
    /// Rank 0's record with the sharded tensors merged from `ranks` (one record per rank).
    fn record(&self, kind: EntryKind, ranks: &[Value]) -> Result<Value, String> {
        let mut merged = ranks[0].clone();
        match kind {
            EntryKind::Module => self.params(&mut merged, ranks)?,
            _ => {
                let Some(Value::Map(items)) = field_mut(&mut merged, "item") else {
                    return Ok(merged);
                };
                for (key, state) in items.iter_mut() {
                    let Some(shape) = key.as_str().and_then(|id| self.layout.shapes.get(id)) else {
                        continue;
                    };
                    let parts: Vec<&Value> = ranks
                        .iter()
                        .map(|r| {
                            field(r, "item")
                                .and_then(|items| field(items, key.as_str().unwrap_or_default()))
                        })
                        .collect::<Option<_>>()
                        .ok_or_else(|| "a shard lacks a parameter's optimizer state".to_string())?;
                    self.tree(state, &parts, shape)?;
                }
            }
        }
        Ok(merged)
    }

    /// Finds the module's parameters `{id, param}` (walking `value` and the ranks' records in
    /// step) and merges those that are sharded.
    fn params(&self, value: &mut Value, ranks: &[Value]) -> Result<(), String> {
        let id = field(value, "id")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(shape) = id.and_then(|id| self.layout.shapes.get(&id)) {
            let parts: Option<Vec<&Value>> = ranks.iter().map(|r| field(r, "param")).collect();
            if let (Some(param), Some(parts)) = (field_mut(value, "param"), parts) {
                return self.tree(param, &parts, shape);
            }
        }
        walk_in_step(value, ranks, &mut |v, r| self.params(v, r))
    }

    /// Merges every tensor of shard shape in `value` (rank 0's) with the ranks' `parts`.
    fn tree(&self, value: &mut Value, parts: &[&Value], shape: &[usize]) -> Result<(), String> {
        let world = self.layout.world_size;
        let shard = shard_shape(shape, world);
        if tensor_shape(value).as_deref() == Some(&shard[..]) {
            let mut bytes = Vec::new();
            for part in parts {
                bytes.extend_from_slice(
                    field(part, "bytes")
                        .and_then(Value::as_slice)
                        .unwrap_or(&[]),
                );
            }
            let rows_each = shard_rows(shape, world).0;
            let per_row = row_bytes(bytes.len(), rows_each * world)?;
            bytes.truncate(per_row * shape.first().copied().unwrap_or(1));
            set_tensor(value, bytes, shape);
            return Ok(());
        }
        let owned: Vec<Value> = parts.iter().map(|p| (*p).clone()).collect();
        walk_in_step(value, &owned, &mut |v, r| {
            let refs: Vec<&Value> = r.iter().collect();
            self.tree(v, &refs, shape)
        })
    }
}

/// What [`walk_in_step`] calls on a value and the same value of every rank's record.
type VisitInStep<'a> = dyn FnMut(&mut Value, &[Value]) -> Result<(), String> + 'a;

/// Calls `visit` on each child of `value` with the same child of every record in `ranks`
/// (matched by key in maps, by position in arrays).
fn walk_in_step(
    value: &mut Value,
    ranks: &[Value],
    visit: &mut VisitInStep<'_>,
) -> Result<(), String> {
    match value {
        Value::Map(fields) => {
            for (key, child) in fields.iter_mut() {
                let parts: Option<Vec<Value>> = ranks
                    .iter()
                    .map(|r| match r {
                        Value::Map(f) => f.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()),
                        _ => None,
                    })
                    .collect();
                let parts = parts.ok_or("the shards' records differ in structure")?;
                visit(child, &parts)?;
            }
        }
        Value::Array(items) => {
            for (at, child) in items.iter_mut().enumerate() {
                let parts: Option<Vec<Value>> = ranks
                    .iter()
                    .map(|r| r.as_array().and_then(|a| a.get(at)).cloned())
                    .collect();
                let parts = parts.ok_or("the shards' records differ in structure")?;
                visit(child, &parts)?;
            }
        }
        _ => {}
    }
    Ok(())
}

struct Cut<'a> {
    shapes: &'a BTreeMap<String, Vec<usize>>,
    rank: usize,
    world: usize,
}

impl Cut<'_> {
    fn record(&self, kind: EntryKind, value: &mut Value) -> Result<(), String> {
        match kind {
            EntryKind::Module => self.params(value),
            _ => {
                let Some(Value::Map(items)) = field_mut(value, "item") else {
                    return Ok(());
                };
                for (key, state) in items.iter_mut() {
                    if let Some(shape) = key.as_str().and_then(|id| self.shapes.get(id)) {
                        self.tree(state, shape)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn params(&self, value: &mut Value) -> Result<(), String> {
        let id = field(value, "id")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(shape) = id.and_then(|id| self.shapes.get(&id))
            && let Some(param) = field_mut(value, "param")
        {
            return self.tree(param, shape);
        }
        children(value).try_for_each(|child| self.params(child))
    }

    /// Cuts every tensor of the whole shape `shape` in `value` to this rank's block.
    fn tree(&self, value: &mut Value, shape: &[usize]) -> Result<(), String> {
        if tensor_shape(value).as_deref() == Some(shape) {
            let bytes = field(value, "bytes")
                .and_then(Value::as_slice)
                .unwrap_or(&[]);
            let rows = shape.first().copied().unwrap_or(1);
            let per_row = row_bytes(bytes.len(), rows)?;
            let shard = shard_shape(shape, self.world);
            let rows_each = shard_rows(shape, self.world).0;
            let mine = shard_row_range(shape, self.rank, self.world);
            // Zero bytes are 0.0 in every float dtype: the padding rows.
            let mut block = vec![0u8; rows_each * per_row];
            block[..mine.len() * per_row]
                .copy_from_slice(&bytes[mine.start * per_row..mine.end * per_row]);
            set_tensor(value, block, &shard);
            return Ok(());
        }
        children(value).try_for_each(|child| self.tree(child, shape))
    }
}

/// The children of a map or array.
fn children(value: &mut Value) -> Box<dyn Iterator<Item = &mut Value> + '_> {
    match value {
        Value::Map(fields) => Box::new(fields.iter_mut().map(|(_, v)| v)),
        Value::Array(items) => Box::new(items.iter_mut()),
        _ => Box::new(std::iter::empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f32], shape: &[usize]) -> Value {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Value::Map(vec![
            (Value::from("bytes"), Value::Binary(bytes)),
            (Value::from("dtype"), Value::from("F32")),
            (
                Value::from("shape"),
                Value::Array(shape.iter().map(|&d| Value::from(d as u64)).collect()),
            ),
        ])
    }

    fn floats(value: &Value) -> Vec<f32> {
        field(value, "bytes")
            .and_then(Value::as_slice)
            .unwrap_or(&[])
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn module(weight: Value, bias: Value) -> Entry {
        let param = |id: &str, t: Value| {
            Value::Map(vec![
                (Value::from("id"), Value::from(id)),
                (Value::from("param"), t),
            ])
        };
        let record = Value::Map(vec![(
            Value::from("item"),
            Value::Map(vec![
                (Value::from("weight"), param("w", weight)),
                (Value::from("bias"), param("b", bias)),
            ]),
        )]);
        Entry {
            key: "model".into(),
            kind: EntryKind::Module,
            settings: Default::default(),
            bytes: write_value(&record).unwrap(),
        }
    }

    fn optimizer(moment: Value, time: u64) -> Entry {
        let state = Value::Map(vec![
            (Value::from("moment"), moment),
            (Value::from("time"), Value::from(time)),
        ]);
        let record = Value::Map(vec![(
            Value::from("item"),
            Value::Map(vec![(Value::from("w"), state)]),
        )]);
        Entry {
            key: "optim".into(),
            kind: EntryKind::Optimizer,
            settings: Default::default(),
            bytes: write_value(&record).unwrap(),
        }
    }

    /// The tensor at `path` (keys) in an entry's record.
    fn at(entry: &Entry, path: &[&str]) -> Value {
        let mut value = read_value(&entry.bytes).unwrap();
        for key in path {
            value = field(&value, key).unwrap().clone();
        }
        value
    }

    #[test]
    fn cutting_then_merging_gives_back_the_whole_checkpoint_at_every_world_size() {
        // `w` is [5, 2] (5 rows do not divide by 2, 3 or 4); `b` stays whole.
        let w: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let whole = vec![
            module(tensor(&w, &[5, 2]), tensor(&[7.0, 8.0], &[2])),
            optimizer(
                tensor(&w.iter().map(|v| v * 10.0).collect::<Vec<_>>(), &[5, 2]),
                3,
            ),
        ];
        let shapes = BTreeMap::from([("w".to_string(), vec![5, 2])]);
        for world in 1..=6 {
            let shards: Vec<Vec<Entry>> = (0..world)
                .map(|rank| cut_rows(whole.clone(), &shapes, rank, world, Path::new("x")).unwrap())
                .collect();
            let rows = 5usize.div_ceil(world);
            let last = at(&shards[world - 1][0], &["item", "weight", "param"]);
            assert_eq!(tensor_shape(&last), Some(vec![rows, 2]), "world {world}");
            let first = floats(&at(&shards[0][0], &["item", "weight", "param"]));
            assert_eq!(first, w[..rows * 2], "world {world}");
            let layout = RowShards {
                world_size: world,
                shapes: shapes.clone(),
            };
            let paths = vec![Path::new("x"); world];
            let merged = merge_rows(shards, &layout, &paths).unwrap();
            assert_eq!(merged, whole, "world {world}");
        }
    }

    #[test]
    fn resharding_one_saved_file_at_a_time_gives_each_rank_the_cut_of_the_whole() {
        let w: Vec<f32> = (0..14).map(|v| v as f32).collect();
        let whole = vec![
            module(tensor(&w, &[7, 2]), tensor(&[7.0, 8.0], &[2])),
            optimizer(
                tensor(&w.iter().map(|v| -v).collect::<Vec<_>>(), &[7, 2]),
                3,
            ),
        ];
        let shapes = BTreeMap::from([("w".to_string(), vec![7, 2])]);
        let here = Path::new("x");
        for saved_world in 1..=5 {
            let saved: Vec<Vec<Entry>> = (0..saved_world)
                .map(|rank| cut_rows(whole.clone(), &shapes, rank, saved_world, here).unwrap())
                .collect();
            let layout = RowShards {
                world_size: saved_world,
                shapes: shapes.clone(),
            };
            for world in 1..=5 {
                for rank in 0..world {
                    let mut reads = Vec::new();
                    let got = reshard_rows(
                        &layout,
                        rank,
                        world,
                        |k| {
                            reads.push(k);
                            Ok(saved[k].clone())
                        },
                        here,
                    )
                    .unwrap();
                    let want = cut_rows(whole.clone(), &shapes, rank, world, here).unwrap();
                    assert_eq!(got, want, "{saved_world} ranks to rank {rank} of {world}");
                    assert_eq!(
                        reads,
                        (0..saved_world).collect::<Vec<_>>(),
                        "each file once"
                    );
                }
            }
        }
    }

    #[test]
    fn a_missing_shard_is_an_error() {
        let layout = RowShards {
            world_size: 2,
            shapes: BTreeMap::new(),
        };
        let err = merge_rows(vec![Vec::new()], &layout, &[Path::new("x")]).unwrap_err();
        assert!(err.to_string().contains("saved by 2 ranks"), "{err}");
    }
}
