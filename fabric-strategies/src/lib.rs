//! The strategies of burn-fabric, each a type generic over `B: AutodiffBackend` implementing
//! [`fabric_core::strategy::Strategy`].

mod bucket;
mod ddp;
mod single_device;
mod zero;

pub use bucket::{Bucket, broadcast_buckets, plan_buckets, reduce_bucket, reduce_buckets};
pub use ddp::Ddp;
pub use single_device::SingleDevice;
pub use zero::{Zero, ZeroStage, partition};
