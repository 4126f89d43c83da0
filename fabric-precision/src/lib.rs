//! Precision plugins for burn-fabric (Lightning's `plugins/precision`).
//!
//! * `64-true`, `32-true`, `16-true`, `bf16-true`: the module's parameters are converted to the
//!   dtype once, inputs are cast to it, outputs come back in f32. No master weights: the
//!   optimizer steps (and keeps its state) in that dtype.
//! * `16-mixed`, `bf16-mixed`: parameters stay f32 (the master weights); each forward runs on a
//!   half-precision view of them (a differentiable cast, so gradients arrive in f32), with
//!   inputs cast to half and outputs back to f32. `16-mixed` adds dynamic loss scaling
//!   ([`GradScaler`], PyTorch's defaults).
//!
//! Burn has no autocast: ops do not promote dtypes, so the plugin casts every operand itself.
#![warn(missing_docs)]

mod cast;
mod grad_scaler;
mod plugin;
mod support;

pub use cast::{CastParams, ForwardInput};
pub use grad_scaler::{GradScaler, GradScalerState};
pub use plugin::{GRAD_SCALER_KEY, PrecisionMode, PrecisionPlugin};
pub use support::{backends_supporting, check_available, check_backend};
