//! Which precisions a build and a backend can run.

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use fabric_core::FabricError;
use fabric_core::config::Precision;

/// The dtype a precision computes in.
pub(crate) fn compute_dtype(precision: Precision) -> Option<DType> {
    match precision {
        Precision::Double => Some(DType::F64),
        Precision::Full => Some(DType::F32),
        Precision::HalfTrue | Precision::HalfMixed => Some(DType::F16),
        Precision::Bf16True | Precision::Bf16Mixed => Some(DType::BF16),
        Precision::TransformerEngine | Precision::TransformerEngineFloat16 => None,
    }
}

/// Burn backends (by feature name) that run a dtype (Burn 0.21; Wgpu's f64 depends on the
/// adapter).
pub fn backends_supporting(dtype: DType) -> &'static [&'static str] {
    match dtype {
        DType::F64 => &["flex", "ndarray", "tch", "wgpu (adapter-dependent)"],
        DType::F16 => &["flex", "tch", "wgpu", "cuda"],
        DType::BF16 => &["flex", "tch", "cuda"],
        _ => &["flex", "ndarray", "tch", "wgpu", "cuda"],
    }
}

/// Checks that `precision` exists in burn-fabric at all (Transformer Engine does not).
pub fn check_available(precision: Precision) -> Result<(), FabricError> {
    match compute_dtype(precision) {
        Some(_) => Ok(()),
        None => Err(FabricError::PrecisionNotAvailable {
            precision: precision.to_string(),
            reason: "NVIDIA Transformer Engine is a PyTorch library with no Burn counterpart"
                .into(),
            available: "`64-true`, `32-true`, `16-true`, `bf16-true`, `16-mixed`, `bf16-mixed`"
                .into(),
        }),
    }
}

/// Checks that backend `B` (named `backend`) computes in `precision`'s dtype on `device`.
pub fn check_backend<B: Backend>(
    precision: Precision,
    backend: &'static str,
    device: &B::Device,
) -> Result<(), FabricError> {
    check_available(precision)?;
    let Some(dtype) = compute_dtype(precision) else {
        return Ok(());
    };
    if B::supports_dtype(device, dtype) {
        return Ok(());
    }
    Err(FabricError::Unsupported {
        what: format!("precision `{precision}` on the `{backend}` backend"),
        reason: format!(
            "`{backend}` has no {dtype:?} arithmetic; backends that run {dtype:?}: {}",
            backends_supporting(dtype).join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flex_runs_every_precision_and_transformer_engine_is_refused() {
        let device = Default::default();
        for p in [
            Precision::Double,
            Precision::Full,
            Precision::HalfTrue,
            Precision::Bf16True,
            Precision::HalfMixed,
            Precision::Bf16Mixed,
        ] {
            check_backend::<burn::backend::Flex>(p, "flex", &device).unwrap();
        }
        let err = check_available(Precision::TransformerEngine)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("transformer-engine") && err.contains("bf16-mixed"),
            "{err}"
        );
    }
}
