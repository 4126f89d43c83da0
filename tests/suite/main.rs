//! burn-fabric's test suite on the default backends, in one test binary so that Burn's generic
//! training code is compiled and linked once (the feature-gated jobs — `mpi`, `backends`,
//! `fused` — stay binaries of their own).

#[path = "../common/mod.rs"]
mod common;

mod checkpoint;
mod clipping;
mod collectives;
mod config;
mod dataloader;
mod ddp_equivalence;
mod export;
mod faults;
mod fsdp;
mod fused_adam;
mod logging;
mod overlap;
mod precision;
mod train_step;
mod zero;
