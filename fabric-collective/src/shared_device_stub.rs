//! Without a CubeCL backend compiled in (features `wgpu`, `cuda`) there is no shared-device
//! engine. Stands in for `shared_device.rs`.

use crate::DeviceEngine;
use burn::tensor::backend::Backend;

/// Never an engine in this build: the host collective averages DDP's buckets.
pub fn engine<B: Backend>(_devices: &[B::Device]) -> Option<DeviceEngine<B>> {
    None
}
