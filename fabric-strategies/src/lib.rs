//! The strategies of burn-fabric (Lightning's `strategies`): each a type generic over
//! `B: AutodiffBackend` implementing [`Strategy`], which owns the rank's collective, precision
//! plugin and gradients and runs backward, clipping, the optimizer step and checkpoint I/O.
#![warn(missing_docs)]

mod bucket;
mod checkpoint_io;
mod comm_thread;
mod ddp;
mod exchange;
mod fsdp;
mod grads;
mod module;
mod overlap;
mod prefetch;
mod rank_state;
mod sharded;
mod single_device;
mod strategy;
mod zero;

pub use bucket::{Bucket, broadcast_buckets, plan_buckets, reduce_bucket, reduce_buckets};
pub use checkpoint_io::{ApplyEntries, EncodeEntries, agree, read, read_file};
pub use comm_thread::CommThread;
pub use ddp::Ddp;
pub use fsdp::{Fsdp, ParamGather, PlaceShards, shard_of};
pub use grads::{GradStore, clip_norm, clip_value};
pub use module::{
    AssignParams, CollectParams, FlatGrad, GatherParams, ModuleParams, OptimizerStep, ParamSlot,
    Params, SetupParam, StepTarget, flatten_gradients, gather_whole, layout,
};
pub use overlap::{Overlap, ParamWatch, WatchSink};
pub use prefetch::UnitOrder;
pub use rank_state::RankState;
pub use sharded::Sharded;
pub use single_device::SingleDevice;
pub use strategy::Strategy;
pub use zero::{Zero, ZeroStage, partition};
