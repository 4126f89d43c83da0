//! Code the examples share: the command-line flags that map onto the Fabric configuration, and
//! the UCI handwritten digits data set.

pub mod args;
pub mod backend;
pub mod checkpoints;
pub mod digits;
