//! Exporting model weights for other frameworks.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use fabric_core::FabricError;
use fabric_core::checkpoint::{error, write_atomic};
use serde_json::Value;
use std::path::Path;

/// Writes `model`'s parameters to `path` as safetensors, in PyTorch's layout: keys are module
/// paths (`l1.weight`, `l1.bias`, ...) and `Linear` weights are transposed to `[out, in]`, so
/// `model.load_state_dict(safetensors.torch.load_file(path))` works on the matching PyTorch
/// module. Dtypes are kept. The file is written atomically, and its bytes depend only on the
/// weights: the header's keys are in sorted order (safetensors leaves the metadata map's order to
/// chance), so two identical runs can be compared by checksum.
pub fn export_safetensors<B: Backend, M: Module<B>>(
    model: &M,
    path: impl AsRef<Path>,
) -> Result<(), FabricError> {
    let path = path.as_ref();
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .metadata("producer", "burn-fabric");
    model
        .save_into(&mut store)
        .map_err(|e| error(path, None, format!("cannot collect the parameters: {e}")))?;
    let bytes = store
        .get_bytes()
        .map_err(|e| error(path, None, format!("cannot encode safetensors: {e}")))?;
    let bytes = with_sorted_header(bytes).map_err(|reason| error(path, None, reason))?;
    write_atomic(path, &bytes)
}

/// `file` (safetensors: an 8-byte little-endian header length, a JSON header, the data) with the
/// header's keys sorted at every level. Data offsets are relative to the data, so they stand.
fn with_sorted_header(file: Vec<u8>) -> Result<Vec<u8>, String> {
    let bad = |what: &str| format!("cannot reorder the safetensors header: {what}");
    let length: [u8; 8] = file
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("no header length"))?;
    let end = usize::try_from(u64::from_le_bytes(length))
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= file.len())
        .ok_or_else(|| bad("the header length exceeds the file"))?;
    let header: Value = serde_json::from_slice(&file[8..end]).map_err(|e| bad(&e.to_string()))?;
    let mut header = serde_json::to_vec(&sorted(header)).map_err(|e| bad(&e.to_string()))?;
    // The data starts 8-byte aligned, as safetensors writes it: pad the header with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + file.len() - end);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&file[end..]);
    Ok(out)
}

/// `value` with every object's keys inserted in sorted order (so serialised sorted whether or
/// not serde_json preserves insertion order).
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}
