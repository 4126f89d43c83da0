//! In-place access to the elements of host-memory tensors (Flex, LibTorch CPU): where
//! [`FusedAdam`](crate::FusedAdam) can update a parameter in the tensor's own memory. Built with
//! the `flex` or `tch` feature; without either, `host_stub.rs` stands in.

use burn::tensor::backend::Backend;
use std::any::{Any, TypeId};

/// Whether tensors of backend `B` on `device` keep their f32 elements in host memory this
/// module reaches, and if so whether the update should run over the rank's rayon threads.
/// LibTorch runs on one thread: its OpenMP workers still spin after the backward pass, and
/// rayon threads beside them made the loop slower, not faster (measured).
pub(crate) fn in_place<B: Backend>(device: &B::Device) -> Option<bool> {
    let backend = TypeId::of::<B>();
    #[cfg(feature = "flex")]
    if backend == TypeId::of::<burn::backend::Flex>() {
        return Some(true);
    }
    #[cfg(feature = "tch")]
    if backend == TypeId::of::<burn::backend::LibTorch>() {
        use burn::backend::libtorch::LibTorchDevice;
        let cpu =
            (device as &dyn Any).downcast_ref::<LibTorchDevice>() == Some(&LibTorchDevice::Cpu);
        return cpu.then_some(false);
    }
    let _ = (backend, device);
    None
}

/// Replaces a non-contiguous tensor by a contiguous copy.
pub(crate) fn make_contiguous<P: 'static>(primitive: &mut P) {
    #[cfg(feature = "flex")]
    if let Some(t) = (primitive as &mut dyn Any).downcast_mut::<burn_flex::FlexTensor>()
        && !t.is_contiguous()
    {
        *t = t.to_contiguous();
    }
    #[cfg(feature = "tch")]
    if let Some(t) =
        (primitive as &mut dyn Any).downcast_mut::<burn::backend::libtorch::TchTensor>()
        && !t.tensor.is_contiguous()
    {
        *t = burn::backend::libtorch::TchTensor::new(t.tensor.contiguous());
    }
}

/// `primitive`'s f32 elements for reading, if it is a contiguous f32 host tensor (a view into a
/// shared buffer included).
pub(crate) fn slice<P: 'static>(primitive: &P) -> Option<&[f32]> {
    #[cfg(feature = "flex")]
    if let Some(t) = (primitive as &dyn Any).downcast_ref::<burn_flex::FlexTensor>() {
        return t.as_slice::<f32>();
    }
    #[cfg(feature = "tch")]
    if let Some(t) = (primitive as &dyn Any).downcast_ref::<burn::backend::libtorch::TchTensor>() {
        let (ptr, len) = torch_elements(t)?;
        // SAFETY: a contiguous f32 CPU tensor holds `len` initialised f32s at `ptr`, alive as
        // long as the borrowed tensor; nothing writes them while it is borrowed here.
        return Some(unsafe { std::slice::from_raw_parts(ptr, len) });
    }
    None
}

/// `primitive`'s f32 elements for writing, if it is a contiguous f32 host tensor whose storage
/// no other tensor shares (the backends' own test before writing in place).
pub(crate) fn slice_mut<P: 'static>(primitive: &mut P) -> Option<&mut [f32]> {
    let primitive = primitive as &mut dyn Any;
    #[cfg(feature = "flex")]
    if primitive.is::<burn_flex::FlexTensor>() {
        let t = primitive.downcast_mut::<burn_flex::FlexTensor>()?;
        if t.dtype() != burn::tensor::DType::F32 {
            return None;
        }
        let (start, end) = t.layout().contiguous_offsets()?;
        return t.try_storage_mut::<f32>()?.get_mut(start..end);
    }
    #[cfg(feature = "tch")]
    if let Some(t) = primitive.downcast_mut::<burn::backend::libtorch::TchTensor>() {
        if !t.can_mut() {
            return None;
        }
        let (ptr, len) = torch_elements(t)?;
        // SAFETY: as in `slice`; and the storage is this tensor's alone (`can_mut`), borrowed
        // mutably, so no other reference to these elements exists.
        return Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) });
    }
    None
}

/// Where a contiguous f32 LibTorch CPU tensor keeps its elements, and how many.
#[cfg(feature = "tch")]
fn torch_elements(t: &burn::backend::libtorch::TchTensor) -> Option<(*mut f32, usize)> {
    let tensor = &t.tensor;
    let ok = tensor.kind() == tch::Kind::Float
        && tensor.device() == tch::Device::Cpu
        && tensor.is_contiguous();
    ok.then(|| (tensor.data_ptr().cast::<f32>(), tensor.numel()))
}
