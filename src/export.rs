//! Exporting model weights for other frameworks.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use burn_store::{
    BurnToPyTorchAdapter, ModuleAdapter, ModuleSnapshot, SafetensorsStore, TensorSnapshot,
    TensorSnapshotError,
};
use fabric_core::FabricError;
use fabric_core::checkpoint::{error, write_atomic};
use fabric_strategies::ParamGather;
use serde_json::Value;
use std::borrow::Cow;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::rc::Rc;

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

/// [`export_safetensors`] of a model whose parameters are FSDP shards, streamed: every rank
/// gathers one parameter at a time, in the file's order, and rank 0 (`writer`) writes it and
/// drops it, so no rank holds more than one whole parameter. The file's bytes are those
/// [`export_safetensors`] writes for the gathered model. A gather's error is kept by the
/// exchange (`Strategy::pass_result` reports it).
pub(crate) fn export_sharded<B: Backend, M: Module<B>>(
    model: &M,
    gather: &ParamGather,
    writer: bool,
    path: &Path,
) -> Result<(), FabricError> {
    let fail = |reason: String| error(path, None, reason);
    let adapter = BurnToPyTorchAdapter;
    let tensors: Vec<(String, Lazy)> = model
        .collect(None, None, false)
        .into_iter()
        .map(|snapshot| {
            let whole = match snapshot.tensor_id.and_then(|id| gather.shapes.get(&id)) {
                Some(shape) => gathered(snapshot, shape.clone(), gather),
                None => snapshot,
            };
            let adapted = adapter.adapt(&whole);
            let dtype = file_dtype(adapted.dtype).ok_or_else(|| {
                fail(format!(
                    "`{}` is {:?}, which safetensors export does not take",
                    adapted.full_path(),
                    adapted.dtype
                ))
            })?;
            Ok((adapted.full_path(), Lazy(adapted, dtype)))
        })
        .collect::<Result<_, FabricError>>()?;
    let mut metadata: std::collections::HashMap<String, String> =
        SafetensorsStore::default_metadata().into_iter().collect();
    metadata.insert("producer".into(), "burn-fabric".into());
    if !writer {
        // The same gathers in the same order, written nowhere.
        return safetensors::serialize_to_file(tensors, Some(metadata), Path::new("/dev/null"))
            .map_err(|e| fail(format!("cannot gather the parameters: {e}")));
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".exporting");
    let temporary = std::path::PathBuf::from(temporary);
    safetensors::serialize_to_file(tensors, Some(metadata), &temporary)
        .map_err(|e| fail(format!("cannot write safetensors: {e}")))?;
    sort_header_in_place(&temporary).map_err(fail)?;
    std::fs::rename(&temporary, path)
        .map_err(|e| fail(format!("cannot rename {}: {e}", temporary.display())))
}

/// `shard`'s whole parameter of `shape`, gathered from every rank when its data is asked for.
fn gathered(shard: TensorSnapshot, shape: Vec<usize>, gather: &ParamGather) -> TensorSnapshot {
    let (dtype, id) = (shard.dtype, shard.tensor_id.unwrap_or_default());
    let path_stack = shard.path_stack.clone().unwrap_or_default();
    let container_stack = shard.container_stack.clone().unwrap_or_default();
    let exchange = gather.exchange.clone();
    let numel: usize = shape.iter().product();
    let whole_shape = shape.clone();
    let data = Rc::new(move || -> Result<TensorData, TensorSnapshotError> {
        let rows = shard.to_data()?;
        let len = rows.num_elements();
        let flat = TensorData::from_bytes(rows.into_bytes(), [len], dtype);
        let mut bytes = exchange.gather(flat).into_bytes().to_vec();
        // Without the padding rows.
        bytes.truncate(numel * dtype.size());
        Ok(TensorData::from_bytes_vec(
            bytes,
            whole_shape.clone(),
            dtype,
        ))
    });
    TensorSnapshot::from_closure(data, dtype, shape.into(), path_stack, container_stack, id)
}

/// The safetensors dtype of a tensor of `dtype` (as burn-store writes them), if it has one.
fn file_dtype(dtype: DType) -> Option<safetensors::Dtype> {
    use safetensors::Dtype;
    Some(match dtype {
        DType::F64 => Dtype::F64,
        DType::F32 | DType::Flex32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U64 => Dtype::U64,
        DType::U32 => Dtype::U32,
        DType::U8 => Dtype::U8,
        _ => return None,
    })
}

/// A tensor of the file (and its dtype there), its data made when the file is written.
struct Lazy(TensorSnapshot, safetensors::Dtype);

impl safetensors::View for Lazy {
    fn dtype(&self) -> safetensors::Dtype {
        self.1
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    /// Gathers (a collective every rank runs in the same order). An error is kept by the
    /// exchange and the data is zeros of the right length, so that the file's layout stands.
    fn data(&self) -> Cow<'_, [u8]> {
        match self.0.to_data() {
            Ok(data) => Cow::Owned(data.into_bytes().to_vec()),
            Err(_) => Cow::Owned(vec![0; self.0.data_len()]),
        }
    }

    fn data_len(&self) -> usize {
        self.0.data_len()
    }
}

/// Rewrites the header of the safetensors file at `path` with its keys sorted (the same length:
/// only the order changes), as [`export_safetensors`] writes it.
fn sort_header_in_place(path: &Path) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot reopen {}: {e}", path.display()))?;
    let mut length = [0u8; 8];
    std::io::Read::read_exact(&mut file, &mut length).map_err(|e| e.to_string())?;
    let header_len = usize::try_from(u64::from_le_bytes(length)).map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 8 + header_len];
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    std::io::Read::read_exact(&mut file, &mut head).map_err(|e| e.to_string())?;
    let sorted = with_sorted_header(head)?;
    if sorted.len() != 8 + header_len {
        return Err("the sorted safetensors header changed length".into());
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    file.write_all(&sorted).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())
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
