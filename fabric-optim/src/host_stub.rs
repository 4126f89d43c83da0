//! Without the `flex` or `tch` feature no backend keeps its tensors in host memory this crate
//! can reach: [`FusedAdam`](crate::FusedAdam) always uses Burn's Adam. Stands in for `host.rs`.

use burn::tensor::backend::Backend;

/// Never in place.
pub(crate) fn in_place<B: Backend>(_device: &B::Device) -> Option<bool> {
    None
}

/// Nothing to make contiguous.
pub(crate) fn make_contiguous<P: 'static>(_primitive: &mut P) {}

/// No host elements.
pub(crate) fn slice<P: 'static>(_primitive: &P) -> Option<&[f32]> {
    None
}

/// No host elements.
pub(crate) fn slice_mut<P: 'static>(_primitive: &mut P) -> Option<&mut [f32]> {
    None
}
