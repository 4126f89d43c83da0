//! Precision plugins for burn-fabric.
//!
//! This crate is the home of the precision seam (Lightning's `plugins/precision`). Today
//! burn-fabric runs `32-true` only, which needs no plugin: the module, inputs and gradients stay
//! in f32 and the façade rejects every other precision at configuration time with
//! [`FabricError::PrecisionNotAvailable`](fabric_core::FabricError::PrecisionNotAvailable).
//! The true (`64`, `16`, `bf16`) and mixed (`16-mixed` with loss scaling, `bf16-mixed`) plugins
//! land here.

use fabric_core::FabricError;
use fabric_core::config::Precision;

/// The precisions this build can run.
pub const AVAILABLE: [Precision; 1] = [Precision::Full];

/// Checks that `precision` can run in this build; the error names it and what can.
pub fn check_available(precision: Precision) -> Result<(), FabricError> {
    if AVAILABLE.contains(&precision) {
        return Ok(());
    }
    let available = AVAILABLE
        .iter()
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let reason = match precision {
        Precision::TransformerEngine | Precision::TransformerEngineFloat16 => {
            "NVIDIA Transformer Engine is a PyTorch library with no Burn counterpart".to_string()
        }
        _ => "burn-fabric does not implement this precision plugin yet".to_string(),
    };
    Err(FabricError::PrecisionNotAvailable {
        precision: precision.to_string(),
        reason,
        available,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_precision_is_available() {
        assert!(check_available(Precision::Full).is_ok());
        for p in [
            Precision::Bf16Mixed,
            Precision::HalfTrue,
            Precision::TransformerEngine,
        ] {
            let err = check_available(p).unwrap_err().to_string();
            assert!(err.contains(p.as_str()) && err.contains("32-true"), "{err}");
        }
    }
}
