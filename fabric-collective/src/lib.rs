//! The collectives of burn-fabric, in one crate: the [`Collective`] trait and its engines —
//! [`SingleProcess`], the in-process [`ThreadGroup`] with its thread [`launcher`], MPI processes
//! (`mpi` feature; [`Processes`] joins them), and the device engines DDP averages gradient
//! buckets with (NCCL on distinct CUDA GPUs, the fused all-reduce-and-cast kernel for ranks
//! sharing one CubeCL device) — and [`device_engine`], the one function that picks among those.
//!
//! Buffers travel as `TensorData`: dtype-tagged host bytes. Moving a CPU tensor into `TensorData`
//! and back is free for Flex when the tensor is not shared, so the in-process engine reduces
//! straight in the tensors' own memory.
#![warn(missing_docs)]

mod collective;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
pub mod device;
mod engine;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod fused;
#[cfg(feature = "mpi")]
mod hierarchical;
mod host;
pub mod launcher;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "mpi")]
mod processes;
#[cfg(not(feature = "mpi"))]
#[path = "processes_stub.rs"]
mod processes;
mod reduce;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod shared_device;
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
#[path = "shared_device_stub.rs"]
pub mod shared_device;
mod single;
mod thread_group;

pub use collective::{Collective, ReduceOp, all_reduce_scalar, check_rank};
pub use device::{DeviceCollective, DeviceEngine, ThroughHost};
pub use engine::device_engine;
#[cfg(feature = "mpi")]
pub use hierarchical::HierarchicalCollective;
pub use host::{pack, slice_flat, split};
pub use processes::{Processes, Training};
pub use single::SingleProcess;
pub use thread_group::{ThreadCollective, ThreadGroup};
