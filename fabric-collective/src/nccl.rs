//! NCCL for Burn's `Cuda` backend: the local ranks' gradient buckets are all-reduced, and
//! FSDP's shards all-gathered and reduce-scattered, in device memory, never copied to the host.
//!
//! Each rank thread drives its own GPU. For the all-reduce, CubeCL's CUDA server keeps one NCCL
//! communicator per device (created by `ncclCommInitRank` on first use, every device of the
//! group joining) and runs the reduction on a communication stream that waits for the compute
//! stream, so the reduction follows the backward pass that produced the gradients. CubeCL has
//! no all-gather or reduce-scatter, so for those each rank makes a communicator of its own on
//! first use (`ncclCommInitRank` again, one unique id shared by the ranks of the engine, once
//! the ranks have agreed through the host collective that each can join: NCCL's set-up has no
//! timeout) with a stream of its own. The rank waits for the work queued on its thread's CubeCL
//! stream (which produced FSDP's shards and gradients), hands the buffers' device pointers to
//! `ncclAllGather`/`ncclReduceScatter` on its stream and waits for that, so each of these
//! collectives is synchronous for the rank (no overlap with compute yet). Like NCCL itself,
//! a collective a peer never joins waits without a timeout. This engine
//! hands the buffers under Burn's fusion layer to NCCL and puts the results back in the fusion
//! stream. NCCL spans the devices of one process; ranks in other processes are joined by MPI on
//! the host.

use crate::Collective;
use crate::ReduceOp;
use crate::collective::flat_len_of;
use crate::cube::{CubeTensor, from_cube, into_cube};
use crate::device::{DeviceCollective, DeviceEngine, same_type};
use burn::backend::Cuda;
use burn::backend::cuda::CudaDevice;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use cubecl::Runtime;
use cubecl::cuda::CudaRuntime;
use cubecl::server::ReduceOperation;
use cubecl_common::device::{Device as _, DeviceId};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::result::{NcclError, NcclStatus};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use fabric_core::CollectiveError;
use fabric_core::FabricError;
use std::any::TypeId;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

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
    // The unique id of the ranks' own communicators, made by the first rank that needs it.
    let id: Arc<OnceLock<Result<ncclUniqueId, String>>> = Arc::default();
    Ok(Some(DeviceEngine::new("nccl", move |rank| {
        Box::new(Generic::<B> {
            nccl: Nccl {
                rank,
                device: devices[rank].clone(),
                group: ids.clone(),
                id: Arc::clone(&id),
                comm: Mutex::new(None),
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
    /// The group's unique id for [`RankComm`], shared by its ranks.
    id: Arc<OnceLock<Result<ncclUniqueId, String>>>,
    /// This rank's communicator for gathers and reduce-scatters, made on first use.
    comm: Mutex<Option<RankComm>>,
}

/// A rank's own NCCL communicator and the stream its collectives run on.
struct RankComm {
    comm: ncclComm_t,
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator is a handle NCCL lets any thread use, one call at a time; the rank
// holds it behind a mutex.
unsafe impl Send for RankComm {}

impl Drop for RankComm {
    fn drop(&mut self) {
        // SAFETY: `comm` came from `ncclCommInitRank` and is destroyed once, here. An error
        // while tearing down leaves nothing to do.
        let _ = unsafe { cudarc::nccl::result::comm_destroy(self.comm) };
    }
}

/// NCCL's name for `dtype`, for the float types FSDP exchanges.
fn nccl_dtype(dtype: DType) -> Option<ncclDataType_t> {
    match dtype {
        DType::F64 => Some(ncclDataType_t::ncclFloat64),
        DType::F32 => Some(ncclDataType_t::ncclFloat32),
        DType::F16 => Some(ncclDataType_t::ncclFloat16),
        DType::BF16 => Some(ncclDataType_t::ncclBfloat16),
        _ => None,
    }
}

/// NCCL's name for `op`.
fn nccl_op(op: ReduceOp) -> ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncclRedOp_t::ncclSum,
        ReduceOp::Mean => ncclRedOp_t::ncclAvg,
        ReduceOp::Min => ncclRedOp_t::ncclMin,
        ReduceOp::Max => ncclRedOp_t::ncclMax,
    }
}

/// An NCCL collective from a source buffer into a destination buffer of one dtype, on a
/// communicator and stream.
type Launch = Box<
    dyn FnOnce(
        *const c_void,
        *mut c_void,
        ncclDataType_t,
        ncclComm_t,
        cudarc::nccl::sys::cudaStream_t,
    ) -> Result<NcclStatus, NcclError>,
>;

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

    /// This rank's communicator, made (every rank of the group joining) on first use.
    ///
    /// `ncclCommInitRank` waits for every rank of the group without a timeout, so the ranks
    /// first agree through `host` (with its timeout) that each is ready to join: a rank that
    /// cannot (no unique id, no context or stream on its device) makes every rank return an
    /// error rather than leaving the others waiting in NCCL.
    fn rank_comm(
        &self,
        host: &dyn Collective,
        operation: &'static str,
    ) -> Result<MutexGuard<'_, Option<RankComm>>, CollectiveError> {
        let mut guard = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_some() {
            return Ok(guard);
        }
        let prepared = self.prepare(operation);
        let ready = TensorData::new(vec![if prepared.is_ok() { 1.0f32 } else { 0.0 }], [1]);
        let all_ready = host.all_reduce(ready, ReduceOp::Min)?;
        let (id, stream) = prepared?;
        if all_ready.as_slice::<f32>().ok() != Some(&[1.0]) {
            let message = "another rank of the group could not prepare its NCCL communicator \
                           (its own error says why)";
            return Err(self.fail(operation, message.into()));
        }
        let (world, rank) = (self.group.len() as i32, self.rank as i32);
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before it is read; every rank of the group calls
        // this with the same id and world size and its own rank, on its own device's context
        // (bound to this thread by `prepare`).
        let comm = unsafe {
            cudarc::nccl::result::comm_init_rank(comm.as_mut_ptr(), world, id, rank)
                .map_err(|e| self.fail(operation, format!("ncclCommInitRank failed: {e:?}")))?;
            comm.assume_init()
        };
        *guard = Some(RankComm { comm, stream });
        Ok(guard)
    }

    /// What this rank needs to join the group's communicator: the group's unique id and a
    /// stream of its own on its device (whose context it binds to this thread).
    fn prepare(
        &self,
        operation: &'static str,
    ) -> Result<(ncclUniqueId, Arc<CudaStream>), CollectiveError> {
        let id = self
            .id
            .get_or_init(|| cudarc::nccl::result::get_uniqueid().map_err(|e| format!("{e:?}")))
            .clone()
            .map_err(|e| self.fail(operation, format!("ncclGetUniqueId failed: {e}")))?;
        let driver = |e: cudarc::driver::DriverError| {
            self.fail(
                operation,
                format!("CUDA device {}: {e:?}", self.device.index),
            )
        };
        let context = CudaContext::new(self.device.index).map_err(driver)?;
        let stream = context.new_stream().map_err(driver)?;
        Ok((id, stream))
    }

    /// Runs `launch` from `tensor`'s buffer into a new buffer of `out_len` elements of its
    /// dtype, once the device has produced `tensor`, and returns that buffer once NCCL has
    /// written it.
    fn exchange(
        &self,
        host: &dyn Collective,
        operation: &'static str,
        tensor: Tensor<Cuda, 1>,
        out_len: usize,
        launch: Launch,
    ) -> Result<Tensor<Cuda, 1>, CollectiveError> {
        let (cube, client) = into_cube::<CudaRuntime, Cube>(tensor);
        let dtype = cube.dtype;
        let nccl_type = nccl_dtype(dtype).ok_or_else(|| {
            self.fail(
                operation,
                format!("{dtype:?} is not exchanged on the device (f64, f32, f16 and bf16 are)"),
            )
        })?;
        let buffer = cube.client.empty(out_len * dtype.size());
        let out = CubeTensor::new_contiguous(
            cube.client.clone(),
            cube.device.clone(),
            Shape::new([out_len]),
            buffer,
            dtype,
        );
        let guard = self.rank_comm(host, operation)?;
        let comm = guard
            .as_ref()
            .ok_or_else(|| self.fail(operation, "no communicator".into()))?;
        let server = |e| self.fail(operation, format!("{e:?}"));
        // The input is written by kernels queued on CubeCL's streams.
        cubecl_common::future::block_on(cube.client.sync()).map_err(server)?;
        let src = cube
            .client
            .get_resource(cube.handle.clone())
            .map_err(server)?;
        let dst = cube
            .client
            .get_resource(out.handle.clone())
            .map_err(server)?;
        let driver = |e: cudarc::driver::DriverError| self.fail(operation, format!("{e:?}"));
        comm.stream.context().bind_to_thread().map_err(driver)?;
        launch(
            src.resource().ptr as *const c_void,
            dst.resource().ptr as *mut c_void,
            nccl_type,
            comm.comm,
            comm.stream.cu_stream() as _,
        )
        .map_err(|e| self.fail(operation, format!("NCCL: {e:?}")))?;
        comm.stream.synchronize().map_err(driver)?;
        // The buffers stay allocated until NCCL is done with them.
        drop((src, dst));
        Ok(from_cube::<CudaRuntime, Cube>(&client, out))
    }

    fn all_gather(
        &self,
        host: &dyn Collective,
        tensor: Tensor<Cuda, 1>,
    ) -> Result<Tensor<Cuda, 1>, CollectiveError> {
        let len = tensor.shape().num_elements();
        let world = self.group.len();
        let launch: Launch = Box::new(move |src, dst, dtype, comm, stream| {
            // SAFETY: `src` holds `len` elements and `dst` `len * world` of `dtype`, both on
            // this rank's device and alive until the stream is synchronised.
            unsafe { cudarc::nccl::result::all_gather(src, dst, len, dtype, comm, stream) }
        });
        self.exchange(host, "all_gather", tensor, len * world, launch)
    }

    fn reduce_scatter(
        &self,
        host: &dyn Collective,
        tensor: Tensor<Cuda, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<Cuda, 1>, CollectiveError> {
        let world = self.group.len();
        let dims = tensor.shape().dims::<1>();
        let n = flat_len_of(
            &dims,
            tensor.dtype(),
            "reduce_scatter",
            self.rank,
            Some(world),
        )?;
        let len = n / world;
        let op = nccl_op(op);
        let launch: Launch = Box::new(move |src, dst, dtype, comm, stream| {
            // SAFETY: `src` holds `len * world` elements and `dst` `len` of `dtype`, both on
            // this rank's device and alive until the stream is synchronised.
            unsafe { cudarc::nccl::result::reduce_scatter(src, dst, len, dtype, op, comm, stream) }
        });
        self.exchange(host, "reduce_scatter", tensor, len, launch)
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

impl<B: Backend> Generic<B> {
    /// `run` on `tensor` as the `Cuda` tensor it is.
    fn on_cuda(
        &self,
        operation: &'static str,
        tensor: Tensor<B, 1>,
        run: impl FnOnce(&Nccl, Tensor<Cuda, 1>) -> Result<Tensor<Cuda, 1>, CollectiveError>,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        let not_cuda = || {
            self.nccl
                .fail(operation, "the tensor is not a `Cuda` tensor".into())
        };
        let tensor = same_type::<_, Tensor<Cuda, 1>>(tensor).ok_or_else(not_cuda)?;
        same_type::<_, Tensor<B, 1>>(run(&self.nccl, tensor)?).ok_or_else(not_cuda)
    }
}

impl<B: Backend> DeviceCollective<B> for Generic<B> {
    fn all_reduce(
        &self,
        _host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        self.on_cuda("all_reduce", tensor, |nccl, t| nccl.all_reduce(t, op))
    }

    fn all_gather(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        self.on_cuda("all_gather", tensor, |nccl, t| nccl.all_gather(host, t))
    }

    fn reduce_scatter(
        &self,
        host: &dyn Collective,
        tensor: Tensor<B, 1>,
        op: ReduceOp,
    ) -> Result<Tensor<B, 1>, CollectiveError> {
        self.on_cuda("reduce_scatter", tensor, |nccl, t| {
            nccl.reduce_scatter(host, t, op)
        })
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
