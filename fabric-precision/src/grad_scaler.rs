//! Dynamic loss scaling for `16-mixed` (PyTorch's `GradScaler`): the loss is multiplied by the
//! scale so small f16 gradients do not flush to zero; gradients are divided by it before
//! clipping and stepping. A step whose gradients hold an inf or NaN (on any rank) is skipped and
//! the scale halves; after `growth_interval` clean steps in a row it doubles.

use serde::{Deserialize, Serialize};

/// The loss scaler. Its state belongs in checkpoints ([`GradScaler::state`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    state: GradScalerState,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u64,
}

/// What a checkpoint keeps of a [`GradScaler`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    /// The current scale.
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub growth_tracker: u64,
    /// Steps skipped so far because of inf/NaN gradients.
    pub skipped_steps: u64,
}

impl Default for GradScaler {
    /// PyTorch's defaults: initial scale 2^16, ×2 after 2000 clean steps, ×0.5 on overflow.
    fn default() -> Self {
        Self {
            state: GradScalerState {
                scale: 65536.0,
                growth_tracker: 0,
                skipped_steps: 0,
            },
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl GradScaler {
    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// The checkpointable state.
    pub fn state(&self) -> GradScalerState {
        self.state
    }

    /// Restores a checkpointed state.
    pub fn load_state(&mut self, state: GradScalerState) {
        self.state = state;
    }

    /// Records the outcome of one optimizer step: `finite` is false when the step was skipped
    /// for inf/NaN gradients. Returns whether the optimizer may step.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.state.growth_tracker += 1;
            if self.state.growth_tracker >= self.growth_interval {
                self.state.scale *= self.growth_factor;
                self.state.growth_tracker = 0;
            }
        } else {
            self.state.scale *= self.backoff_factor;
            self.state.growth_tracker = 0;
            self.state.skipped_steps += 1;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() {
        let mut scaler = GradScaler::default();
        assert_eq!(scaler.scale(), 65536.0);
        assert!(!scaler.update(false));
        assert_eq!((scaler.scale(), scaler.state().skipped_steps), (32768.0, 1));
        for _ in 0..1999 {
            assert!(scaler.update(true));
        }
        assert_eq!(scaler.scale(), 32768.0);
        scaler.update(true);
        assert_eq!(scaler.scale(), 65536.0);
        assert_eq!(scaler.state().growth_tracker, 0);
        // an overflow resets the count of clean steps
        for _ in 0..10 {
            scaler.update(true);
        }
        scaler.update(false);
        assert_eq!(scaler.state().growth_tracker, 0);
        let mut restored = GradScaler::default();
        restored.load_state(scaler.state());
        assert_eq!(restored, scaler);
    }
}
