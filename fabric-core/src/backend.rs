//! Which devices a backend offers on this machine, and how a requested accelerator and device
//! selection resolve to the device of every local rank.

use crate::FabricError;
use crate::config::{Accelerator, Devices};
use crate::gather::GatherParam;
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;

/// The devices one accelerator offers.
#[derive(Debug, Clone, PartialEq)]
pub enum DevicePool<D> {
    /// One device that any number of ranks share (the CPU).
    Shared(D),
    /// Countable devices, in id order (GPUs); each rank takes one.
    Countable(Vec<D>),
}

/// A backend Fabric can place ranks on. Implemented for each backend behind its Cargo feature,
/// and for `Autodiff<B>` of each.
pub trait BackendDevices: GatherParam {
    /// Short backend name, as printed in the resolved config (`flex`, `ndarray`, ...).
    fn backend_name() -> &'static str;

    /// Accelerators this backend can run on; the first is what `auto` picks.
    fn accelerators() -> &'static [Accelerator];

    /// The devices of one concrete accelerator (never `Auto` or `Gpu`).
    fn device_pool(accelerator: Accelerator) -> Result<DevicePool<Self::Device>, FabricError>;
}

impl<B: BackendDevices, C: CheckpointStrategy> BackendDevices for Autodiff<B, C> {
    fn backend_name() -> &'static str {
        B::backend_name()
    }

    fn accelerators() -> &'static [Accelerator] {
        B::accelerators()
    }

    fn device_pool(accelerator: Accelerator) -> Result<DevicePool<Self::Device>, FabricError> {
        B::device_pool(accelerator)
    }
}

#[cfg(feature = "flex")]
impl GatherParam for burn::backend::Flex {}

#[cfg(feature = "flex")]
impl BackendDevices for burn::backend::Flex {
    fn backend_name() -> &'static str {
        "flex"
    }

    fn accelerators() -> &'static [Accelerator] {
        &[Accelerator::Cpu]
    }

    fn device_pool(accelerator: Accelerator) -> Result<DevicePool<Self::Device>, FabricError> {
        cpu_only::<Self>(accelerator)
    }
}

#[cfg(feature = "ndarray")]
impl GatherParam for burn::backend::NdArray {}

#[cfg(feature = "ndarray")]
impl BackendDevices for burn::backend::NdArray {
    fn backend_name() -> &'static str {
        "ndarray"
    }

    fn accelerators() -> &'static [Accelerator] {
        &[Accelerator::Cpu]
    }

    fn device_pool(accelerator: Accelerator) -> Result<DevicePool<Self::Device>, FabricError> {
        cpu_only::<Self>(accelerator)
    }
}

#[cfg(feature = "tch")]
impl GatherParam for burn::backend::LibTorch {}

#[cfg(feature = "tch")]
impl BackendDevices for burn::backend::LibTorch {
    fn backend_name() -> &'static str {
        "tch"
    }

    /// CUDA first, so `auto` picks a GPU where LibTorch sees one (as Lightning does).
    fn accelerators() -> &'static [Accelerator] {
        &[Accelerator::Cuda, Accelerator::Cpu]
    }

    fn device_pool(accelerator: Accelerator) -> Result<DevicePool<Self::Device>, FabricError> {
        use burn::backend::libtorch::LibTorchDevice;
        match accelerator {
            Accelerator::Cpu => Ok(DevicePool::Shared(LibTorchDevice::Cpu)),
            Accelerator::Cuda => {
                // LibTorch's own device count is always 1; ask torch's CUDA runtime.
                let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
                if count == 0 {
                    return Err(no_driver::<Self>(
                        accelerator,
                        "this libtorch sees no CUDA device (a CPU-only libtorch, or no GPU)",
                    ));
                }
                Ok(DevicePool::Countable(
                    (0..count).map(LibTorchDevice::Cuda).collect(),
                ))
            }
            other => Err(unavailable::<Self>(other)),
        }
    }
}

#[cfg(feature = "wgpu")]
impl GatherParam for burn::backend::Wgpu {}

#[cfg(feature = "wgpu")]
impl BackendDevices for burn::backend::Wgpu {
    fn backend_name() -> &'static str {
        "wgpu"
    }

    fn accelerators() -> &'static [Accelerator] {
        &[Accelerator::Wgpu]
    }

    /// Discrete GPUs are countable (one rank each); otherwise the ranks share wgpu's default
    /// adapter (an integrated GPU, or a software one such as Mesa's lavapipe).
    fn device_pool(accelerator: Accelerator) -> Result<DevicePool<Self::Device>, FabricError> {
        use burn::backend::wgpu::WgpuDevice;
        if accelerator != Accelerator::Wgpu {
            return Err(unavailable::<Self>(accelerator));
        }
        // Probe first: without an adapter Burn panics inside its device thread.
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapters =
            cubecl_common::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        if adapters.is_empty() {
            return Err(no_driver::<Self>(
                accelerator,
                "wgpu found no adapter: no GPU driver and no Vulkan software driver (on Debian, \
                 `apt-get install mesa-vulkan-drivers libvulkan1` provides lavapipe)",
            ));
        }
        let discrete = adapters
            .iter()
            .filter(|a| a.get_info().device_type == wgpu::DeviceType::DiscreteGpu)
            .count();
        Ok(if discrete > 0 {
            DevicePool::Countable((0..discrete).map(WgpuDevice::DiscreteGpu).collect())
        } else {
            DevicePool::Shared(WgpuDevice::DefaultDevice)
        })
    }
}

#[cfg(feature = "cuda")]
impl GatherParam for burn::backend::Cuda {}

#[cfg(feature = "cuda")]
impl BackendDevices for burn::backend::Cuda {
    fn backend_name() -> &'static str {
        "cuda"
    }

    fn accelerators() -> &'static [Accelerator] {
        &[Accelerator::Cuda]
    }

    fn device_pool(accelerator: Accelerator) -> Result<DevicePool<Self::Device>, FabricError> {
        use burn::backend::cuda::CudaDevice;
        use cudarc::driver::{result, sys};
        if accelerator != Accelerator::Cuda {
            return Err(unavailable::<Self>(accelerator));
        }
        // Probe first: cudarc panics when the driver library is missing.
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(no_driver::<Self>(
                accelerator,
                "the NVIDIA driver library (libcuda.so.1) is not installed on this machine",
            ));
        }
        let count = result::init()
            .and_then(|()| result::device::get_count())
            .map_err(|e| no_driver::<Self>(accelerator, &format!("the CUDA driver failed: {e}")))?;
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Err(no_driver::<Self>(
                accelerator,
                "the CUDA driver sees no device",
            ));
        }
        Ok(DevicePool::Countable(
            (0..count).map(CudaDevice::new).collect(),
        ))
    }
}

#[allow(dead_code)]
fn no_driver<B: BackendDevices>(accelerator: Accelerator, reason: &str) -> FabricError {
    FabricError::DriverUnavailable {
        backend: B::backend_name(),
        accelerator: accelerator.to_string(),
        reason: reason.to_string(),
    }
}

/// The pool of a CPU-only backend: its one default device, shared.
#[allow(dead_code)]
fn cpu_only<B: BackendDevices>(
    accelerator: Accelerator,
) -> Result<DevicePool<B::Device>, FabricError> {
    match accelerator {
        Accelerator::Cpu => Ok(DevicePool::Shared(B::Device::default())),
        other => Err(unavailable::<B>(other)),
    }
}

fn unavailable<B: BackendDevices>(accelerator: Accelerator) -> FabricError {
    FabricError::AcceleratorUnavailable {
        accelerator: accelerator.to_string(),
        backend: B::backend_name(),
        available: B::accelerators()
            .iter()
            .map(|a| format!("`{a}`"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The accelerator and the devices of the local ranks (one entry per rank on this node).
#[derive(Debug, Clone, PartialEq)]
pub struct Placement<D> {
    /// The concrete accelerator (never `Auto` or `Gpu`).
    pub accelerator: Accelerator,
    /// Device of local rank `i` at index `i`.
    pub devices: Vec<D>,
}

/// Resolves `accelerator` and `devices` against what backend `B` has on this machine.
///
/// On a shared (CPU) device any count `N >= 1` gives `N` ranks on it, as in Lightning; id lists
/// and `-1` are rejected there. On countable devices a count larger than the machine has, or an
/// id it lacks, is an error naming both.
pub fn resolve_placement<B: BackendDevices>(
    accelerator: Accelerator,
    devices: &Devices,
) -> Result<Placement<B::Device>, FabricError> {
    let supported = B::accelerators();
    let (accelerator, pool) = match accelerator {
        // The first accelerator that has a device here (LibTorch: CUDA, else the CPU).
        Accelerator::Auto => {
            let mut last = Err(unavailable::<B>(accelerator));
            for candidate in supported {
                last = B::device_pool(*candidate).map(|pool| (*candidate, pool));
                if last.is_ok() {
                    break;
                }
            }
            last?
        }
        Accelerator::Gpu => {
            let gpu = *[Accelerator::Cuda, Accelerator::Wgpu]
                .iter()
                .find(|a| supported.contains(a))
                .ok_or_else(|| unavailable::<B>(Accelerator::Gpu))?;
            (gpu, B::device_pool(gpu)?)
        }
        other if supported.contains(&other) => (other, B::device_pool(other)?),
        other => return Err(unavailable::<B>(other)),
    };
    let devices = match pool {
        DevicePool::Shared(device) => match devices {
            Devices::Auto => vec![device],
            Devices::Count(n) => vec![device; *n],
            Devices::All | Devices::Ids(_) => {
                return Err(FabricError::InvalidSetting {
                    setting: "devices",
                    value: devices.to_string(),
                    valid: format!(
                        "a positive count (ranks sharing the device) or `auto` on `{accelerator}`"
                    ),
                });
            }
        },
        DevicePool::Countable(pool) => select_countable(accelerator, devices, pool)?,
    };
    if devices.is_empty() {
        return Err(FabricError::TooManyDevices {
            accelerator: accelerator.to_string(),
            requested: 1,
            available: 0,
        });
    }
    Ok(Placement {
        accelerator,
        devices,
    })
}

fn select_countable<D: Clone>(
    accelerator: Accelerator,
    devices: &Devices,
    pool: Vec<D>,
) -> Result<Vec<D>, FabricError> {
    match devices {
        Devices::Auto | Devices::All => Ok(pool),
        Devices::Count(n) if *n > pool.len() => Err(FabricError::TooManyDevices {
            accelerator: accelerator.to_string(),
            requested: *n,
            available: pool.len(),
        }),
        Devices::Count(n) => Ok(pool[..*n].to_vec()),
        Devices::Ids(ids) => {
            let mut seen = ids.clone();
            seen.sort_unstable();
            seen.dedup();
            let duplicate = seen.len() != ids.len();
            if duplicate || ids.is_empty() || ids.iter().any(|&id| id >= pool.len()) {
                return Err(FabricError::InvalidDeviceIds {
                    accelerator: accelerator.to_string(),
                    requested: ids.clone(),
                    available: (0..pool.len()).collect(),
                    duplicate,
                });
            }
            Ok(ids.iter().map(|&id| pool[id].clone()).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countable_selection_checks_counts_and_ids() {
        let pool = vec!["d0", "d1", "d2"];
        let pick = |d: Devices| select_countable(Accelerator::Cuda, &d, pool.clone());
        assert_eq!(pick(Devices::Auto).unwrap(), pool);
        assert_eq!(pick(Devices::All).unwrap(), pool);
        assert_eq!(pick(Devices::Count(2)).unwrap(), vec!["d0", "d1"]);
        assert_eq!(pick(Devices::Ids(vec![2, 0])).unwrap(), vec!["d2", "d0"]);

        let err = pick(Devices::Count(5)).unwrap_err().to_string();
        assert!(err.contains('5') && err.contains("only 3"), "{err}");
        let err = pick(Devices::Ids(vec![0, 7])).unwrap_err().to_string();
        assert!(err.contains("[0, 7]") && err.contains("[0, 1, 2]"), "{err}");
        let err = pick(Devices::Ids(vec![1, 1])).unwrap_err().to_string();
        assert!(err.contains("unique"), "{err}");
    }
}
