//! The `precision` setting.

use super::setting::{Setting, list, setting_from};
use crate::FabricError;
use std::fmt;
use std::str::FromStr;

/// Numeric precision of training, with Lightning's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// `64-true`: everything in f64.
    Double,
    /// `32-true`: everything in f32 (the default).
    #[default]
    Full,
    /// `16-true`: everything in f16, no master weights, no loss scaling.
    HalfTrue,
    /// `bf16-true`: everything in bf16, no master weights.
    Bf16True,
    /// `16-mixed`: f32 master weights, f16 compute, dynamic loss scaling.
    HalfMixed,
    /// `bf16-mixed`: f32 master weights, bf16 compute.
    Bf16Mixed,
    /// `transformer-engine`: NVIDIA Transformer Engine FP8 with bf16 weights (parsed, never available).
    TransformerEngine,
    /// `transformer-engine-float16`: as above with f16 weights (parsed, never available).
    TransformerEngineFloat16,
}

impl Precision {
    /// Every canonical name.
    pub const NAMES: [&'static str; 8] = [
        "64-true",
        "32-true",
        "16-true",
        "bf16-true",
        "16-mixed",
        "bf16-mixed",
        "transformer-engine",
        "transformer-engine-float16",
    ];

    /// Lightning's historical aliases and what they mean.
    pub const ALIASES: [(&'static str, Precision); 4] = [
        ("64", Precision::Double),
        ("32", Precision::Full),
        ("16", Precision::HalfMixed),
        ("bf16", Precision::Bf16Mixed),
    ];

    /// The canonical name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Precision::Double => "64-true",
            Precision::Full => "32-true",
            Precision::HalfTrue => "16-true",
            Precision::Bf16True => "bf16-true",
            Precision::HalfMixed => "16-mixed",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::TransformerEngine => "transformer-engine",
            Precision::TransformerEngineFloat16 => "transformer-engine-float16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = FabricError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        if let Some(precision) = Self::NAMES.iter().position(|n| *n == name).map(|i| ALL[i]) {
            return Ok(precision);
        }
        if let Some((_, precision)) = Self::ALIASES.iter().find(|(alias, _)| *alias == name) {
            return Ok(*precision);
        }
        let mut valid: Vec<&str> = Self::NAMES.to_vec();
        valid.extend(Self::ALIASES.iter().map(|(alias, _)| *alias));
        Err(FabricError::InvalidSetting {
            setting: "precision",
            value: s.to_string(),
            valid: list(&valid),
        })
    }
}

const ALL: [Precision; 8] = [
    Precision::Double,
    Precision::Full,
    Precision::HalfTrue,
    Precision::Bf16True,
    Precision::HalfMixed,
    Precision::Bf16Mixed,
    Precision::TransformerEngine,
    Precision::TransformerEngineFloat16,
];

setting_from!(Precision);

/// Lightning's integer forms: `64`, `32`, `16`.
impl From<u32> for Setting<Precision> {
    fn from(bits: u32) -> Self {
        Setting::Text(bits.to_string())
    }
}

impl From<i32> for Setting<Precision> {
    fn from(bits: i32) -> Self {
        Setting::Text(bits.to_string())
    }
}
