//! Code the examples share: the command-line flags that map onto the Fabric configuration, the
//! UCI handwritten digits data set, the digits classifier, a public-domain novel as characters
//! and a GPT-style transformer for it, seeded noise and the progress bar.
#![warn(missing_docs)]

pub mod args;
pub mod backend;
pub mod digits;
pub mod gpt;
pub mod mlp;
pub mod noise;
pub mod progress;
pub mod text;
pub mod trainer;

// What `example_main!` expands to refers to these.
#[doc(hidden)]
pub use {burn as __burn, burn_fabric as __burn_fabric, clap as __clap};
