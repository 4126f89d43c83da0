//! `DefaultBackend`: the autodiff backend the enabled Cargo feature selects (absent when no
//! backend feature is on).

/// The autodiff backend the enabled Cargo feature selects. When several backend features are
/// on, the most specific wins: `cuda`, then `tch`, then `wgpu`, then `ndarray`, then the default
/// `flex`.
#[cfg(feature = "cuda")]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::Cuda>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(feature = "tch", not(feature = "cuda")))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::LibTorch>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(feature = "wgpu", not(any(feature = "cuda", feature = "tch"))))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::Wgpu>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(
    feature = "ndarray",
    not(any(feature = "cuda", feature = "tch", feature = "wgpu"))
))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::NdArray>;

/// The autodiff backend the enabled Cargo feature selects.
#[cfg(all(
    feature = "flex",
    not(any(
        feature = "cuda",
        feature = "tch",
        feature = "wgpu",
        feature = "ndarray"
    ))
))]
pub type DefaultBackend = burn::backend::Autodiff<burn::backend::Flex>;
