//! NCCL for Burn's `Cuda` backend: the local ranks' gradient buckets are all-reduced in device
//! memory, never copied to the host.
//!
//! Each rank thread drives its own GPU. CubeCL's CUDA server keeps one NCCL communicator per
//! device (created by `ncclCommInitRank` on first use, every device of the group joining) and
//! runs the reduction on a communication stream that waits for the compute stream, so the
//! reduction follows the backward pass that produced the gradients. This engine hands the
//! buffers under Burn's fusion layer to that server and puts the results back in the fusion
//! stream. NCCL spans the devices of one process; ranks in other processes are joined by MPI
//! on the host.

use crate::Collective;
use crate::ReduceOp;
use crate::cube::{CubeTensor, from_cube, into_cube};
use crate::device::{DeviceCollective, DeviceEngine, same_type};
use burn::backend::Cuda;
use burn::backend::cuda::CudaDevice;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_cubecl::CubeBackend;
use cubecl::Runtime;
use cubecl::cuda::CudaRuntime;
use cubecl::server::ReduceOperation;
use cubecl_common::device::{Device as _, DeviceId};
use fabric_core::CollectiveError;
use fabric_core::FabricError;
use std::any::TypeId;

/// The backend under Burn's fusion layer for `Cuda`.
type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;

/// Why NCCL cannot run here, or `Ok` when its library loads.
pub fn probe() -> Result<(), FabricError> {
    // SAFETY: only tries to dlopen the NCCL library; nothing is called through it.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(FabricError::DriverUnavailable {
            backend: "cuda",
            accelerator: "cuda".into(),
            reason: "DDP over several GPUs needs NCCL and its library (libnccl.so.2) is not \
                     installed on this machine (pip's nvidia-nccl-cu12 or the distribution's \
                     libnccl2 provides it)"
                .into(),
        })
    }
}

/// The NCCL engine for `devices` when `B` is Burn's `Cuda` and there are several distinct
/// devices.
pub(crate) fn engine<B: Backend>(
    devices: &[B::Device],
) -> Result<Option<DeviceEngine<B>>, FabricError> {
    if TypeId::of::<B>() != TypeId::of::<Cuda>() || devices.len() < 2 {
        return Ok(None);
    }
    // `B` is `Cuda`, so every device is a `CudaDevice`.
    let Some(devices) = devices
        .iter()
        .map(|device| same_type::<B::Device, CudaDevice>(device.clone()))
        .collect::<Option<Vec<CudaDevice>>>()
    else {
        return Ok(None);
    };
    let ids: Vec<DeviceId> = devices.iter().map(|device| device.to_id()).collect();
    // NCCL joins one rank per GPU; ranks that share a GPU are the fused engine's.
    if (1..ids.len()).any(|i| ids[..i].contains(&ids[i])) {
        return Ok(None);
    }
    probe()?;
    Ok(Some(DeviceEngine::new("nccl", move |rank| {
        Box::new(Generic::<B> {
            nccl: Nccl {
                rank,
                device: devices[rank].clone(),
                group: ids.clone(),
            },
            _backend: std::marker::PhantomData,
        })
    })))
}

/// One rank's NCCL collective.
struct Nccl {
    rank: usize,
    device: CudaDevice,
    /// Every device of the group, in rank order.
    group: Vec<DeviceId>,
}

impl Nccl {
    fn fail(&self, operation: &'static str, message: String) -> CollectiveError {
        CollectiveError::Engine {
            rank: self.rank,
            engine: "nccl",
            operation,
            message,
        }
    }

    fn all_reduce(
        &self,
        tensor: Tensor<Cuda, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<Cuda, 1>, CollectiveError> {
        let op = match op {
            ReduceOp::Sum => ReduceOperation::Sum,
            ReduceOp::Mean => ReduceOperation::Mean,
            other => {
                return Err(self.fail(
                    "all_reduce",
                    format!("`{other}` is not a device reduction (only `sum` and `mean` are)"),
                ));
            }
        };
        // Runs what the fusion stream still holds for this tensor and hands over its buffer.
        let (cube, client) = into_cube::<CudaRuntime, Cube>(tensor);
        let (shape, dtype) = (cube.meta.shape().clone(), cube.dtype);
        // In place when nothing else holds the buffer; otherwise into a new one.
        let out = (!cube.can_mut()).then(|| {
            let buffer = cube.client.empty(shape.num_elements() * dtype.size());
            CubeTensor::new_contiguous(
                cube.client.clone(),
                cube.device.clone(),
                shape.clone(),
                buffer,
                dtype,
            )
        });
        let dst = out.as_ref().unwrap_or(&cube).handle.clone();
        let mut compute = cube.client.clone();
        compute.all_reduce(
            cube.handle.clone(),
            dst,
            dtype.into(),
            self.group.clone(),
            op,
        );
        Ok(from_cube::<CudaRuntime, Cube>(&client, out.unwrap_or(cube)))
    }

    fn wait(&self) -> Result<(), CollectiveError> {
        let client = CudaRuntime::client(&self.device);
        // The compute stream waits for the communication stream, then the host for both.
        client.sync_collective();
        cubecl_common::future::block_on(client.sync())
            .map_err(|e| self.fail("wait", format!("{e:?}")))
    }
}

/// [`Nccl`] serving the generic backend `B`, which [`engine`] checked is `Cuda`.
struct Generic<B: Backend> {
    nccl: Nccl,
    _backend: std::marker::PhantomData<fn() -> B>,
}

impl<B: Backend> DeviceCollective<B> for Generic<B> {
    fn all_reduce(
        &self,
        _host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        let not_cuda = || {
            self.nccl
                .fail("all_reduce", "the tensor is not a `Cuda` tensor".into())
        };
        let tensor = same_type::<_, Tensor<Cuda, 1>>(tensor).ok_or_else(not_cuda)?;
        let reduced = self.nccl.all_reduce(tensor, op)?;
        same_type::<_, Tensor<B, 1>>(reduced).ok_or_else(not_cuda)
    }

    fn wait(&self) -> Result<(), CollectiveError> {
        self.nccl.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without NCCL (every CI machine here) the engine is a typed error naming the
    /// library; with NCCL it is built.
    #[test]
    fn nccl_engine_or_typed_error() {
        let devices = [CudaDevice::new(0), CudaDevice::new(1)];
        match engine::<Cuda>(&devices) {
            Ok(engine) => assert_eq!(engine.map(|e| e.name()), Some("nccl")),
            Err(err) => {
                let text = err.to_string();
                assert!(text.contains("libnccl.so.2"), "{text}");
                assert!(matches!(err, FabricError::DriverUnavailable { .. }));
            }
        }
        // One device, or another backend: no engine at all.
        assert!(engine::<Cuda>(&devices[..1]).unwrap().is_none());
    }
}
