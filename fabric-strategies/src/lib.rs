//! The strategies of burn-fabric, each a type generic over `B: AutodiffBackend` implementing
//! [`fabric_core::strategy::Strategy`].

mod bucket;
mod ddp;
mod single_device;

pub use bucket::{Bucket, plan_buckets};
pub use ddp::Ddp;
pub use single_device::SingleDevice;
