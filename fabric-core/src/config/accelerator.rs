//! The `accelerator` setting.

use super::setting::{list, setting_from};
use crate::FabricError;
use std::fmt;
use std::str::FromStr;

/// Where the ranks run. Lightning's names; the backend compiled in decides which are available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Accelerator {
    /// The backend's preferred accelerator (GPU if it has one, else CPU).
    #[default]
    Auto,
    /// The CPU. Any number of ranks may share it.
    Cpu,
    /// Any GPU the backend supports (CUDA first, then Wgpu).
    Gpu,
    /// NVIDIA GPUs through CUDA.
    Cuda,
    /// GPUs (or a software rasteriser) through wgpu / Vulkan / Metal.
    Wgpu,
}

impl Accelerator {
    /// Every accepted spelling.
    pub const NAMES: [&'static str; 5] = ["auto", "cpu", "gpu", "cuda", "wgpu"];

    /// Lightning's name for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accelerator::Auto => "auto",
            Accelerator::Cpu => "cpu",
            Accelerator::Gpu => "gpu",
            Accelerator::Cuda => "cuda",
            Accelerator::Wgpu => "wgpu",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accelerator {
    type Err = FabricError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Accelerator::Auto),
            "cpu" => Ok(Accelerator::Cpu),
            "gpu" => Ok(Accelerator::Gpu),
            "cuda" => Ok(Accelerator::Cuda),
            "wgpu" => Ok(Accelerator::Wgpu),
            _ => Err(FabricError::InvalidSetting {
                setting: "accelerator",
                value: s.to_string(),
                valid: list(&Self::NAMES),
            }),
        }
    }
}

setting_from!(Accelerator);
