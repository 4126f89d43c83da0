//! The one place that picks the device engine for DDP's gradient buckets: NCCL when the ranks
//! are distinct CUDA devices of this process (feature `cuda`), else the fused kernel when they
//! share one CubeCL device (features `wgpu`, `cuda`), else none (the host collective). Kept
//! apart from the seam (`device.rs`) and the engines so that none imports another.

use crate::device::DeviceEngine;
use burn::tensor::backend::Backend;
use fabric_core::FabricError;

/// The device engine for local ranks on `devices` (one device each, in this process), if
/// backend `B` has one: NCCL for Burn's `Cuda` backend (feature `cuda`) with two or more
/// distinct devices, the fused shared-device engine when they all share one Wgpu or Cuda device. `Ok(None)` means the host collectives do the work. An error means the engine
/// applies but cannot run on this machine (no NCCL library): a typed error, never a panic.
pub fn device_engine<B: Backend>(
    devices: &[B::Device],
) -> Result<Option<DeviceEngine<B>>, FabricError> {
    #[cfg(feature = "cuda")]
    if let Some(engine) = crate::nccl::engine::<B>(devices)? {
        return Ok(Some(engine));
    }
    Ok(crate::shared_device::engine::<B>(devices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_backends_have_no_device_engine() {
        type F = burn::backend::Flex;
        let engine = device_engine::<F>(&[Default::default(), Default::default()]).unwrap();
        assert!(engine.is_none());
    }
}
