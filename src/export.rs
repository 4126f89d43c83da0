//! Exporting model weights for other frameworks.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use fabric_core::FabricError;
use fabric_core::checkpoint::{error, write_atomic};
use std::path::Path;

/// Writes `model`'s parameters to `path` as safetensors, in PyTorch's layout: keys are module
/// paths (`l1.weight`, `l1.bias`, ...) and `Linear` weights are transposed to `[out, in]`, so
/// `model.load_state_dict(safetensors.torch.load_file(path))` works on the matching PyTorch
/// module. Dtypes are kept. The file is written atomically.
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
    write_atomic(path, &bytes)
}
