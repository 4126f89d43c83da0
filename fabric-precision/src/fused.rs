//! The fused all-reduce-and-cast kernel (CubeCL): one pass that adds a peer's gradient buffer to
//! the local one, accumulating in f32, and writes the sum in the dtype the next stage wants (f32
//! master gradients from half inputs, or half for the wire). The unfused path (add into an f32
//! buffer, then cast) is kept beside it for tests and benchmarks.
//!
//! Both run on any CubeCL runtime: Wgpu (Mesa's lavapipe on CPU-only machines) and Cuda.

pub use cubecl;
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::{bf16, f16};

/// A float element type the kernels read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatKind {
    /// `f32`.
    F32,
    /// IEEE `f16`.
    F16,
    /// `bf16` (Cuda; Wgpu has none).
    BF16,
}

impl FloatKind {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatKind::F32 => 4,
            FloatKind::F16 | FloatKind::BF16 => 2,
        }
    }
}

/// How [`sum_cast`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// One kernel: read both inputs, add in f32, write the output dtype.
    Fused,
    /// Two kernels: add into an f32 buffer, then cast it (the extra pass the fused kernel saves).
    Unfused,
}

#[cube(launch)]
fn fused_sum_cast<I: Float, O: Float, N: Size>(
    local: &Array<Vector<I, N>>,
    peer: &Array<Vector<I, N>>,
    out: &mut Array<Vector<O, N>>,
) {
    if ABSOLUTE_POS < out.len() {
        let sum = Vector::<f32, N>::cast_from(local[ABSOLUTE_POS])
            + Vector::<f32, N>::cast_from(peer[ABSOLUTE_POS]);
        out[ABSOLUTE_POS] = Vector::cast_from(sum);
    }
}

#[cube(launch)]
fn sum_f32<I: Float, N: Size>(
    local: &Array<Vector<I, N>>,
    peer: &Array<Vector<I, N>>,
    out: &mut Array<Vector<f32, N>>,
) {
    if ABSOLUTE_POS < out.len() {
        out[ABSOLUTE_POS] = Vector::<f32, N>::cast_from(local[ABSOLUTE_POS])
            + Vector::<f32, N>::cast_from(peer[ABSOLUTE_POS]);
    }
}

#[cube(launch)]
fn cast_f32<O: Float, N: Size>(input: &Array<Vector<f32, N>>, out: &mut Array<Vector<O, N>>) {
    if ABSOLUTE_POS < out.len() {
        out[ABSOLUTE_POS] = Vector::cast_from(input[ABSOLUTE_POS]);
    }
}

/// The widest vector the runtime loads in one access for the narrower of the two dtypes (16
/// bytes on CUDA: 8 halves) that divides `len`.
fn vector_size<R: Runtime>(client: &ComputeClient<R>, len: usize, narrow: usize) -> usize {
    client
        .io_optimized_vector_sizes(narrow)
        .find(|v| len % v == 0)
        .unwrap_or(1)
}

/// `out = output(f32(local) + f32(peer))` over `len` elements of `input` dtype; returns the new
/// output buffer. `local` and `peer` must hold at least `len` elements.
pub fn sum_cast<R: Runtime>(
    client: &ComputeClient<R>,
    local: &Handle,
    peer: &Handle,
    len: usize,
    input: FloatKind,
    output: FloatKind,
    path: Path,
) -> Handle {
    let out = client.empty(len * output.size());
    if len == 0 {
        return out;
    }
    let vector = vector_size(client, len, input.size().min(output.size()));
    let units = len / vector;
    let dim = CubeDim::new(client, units);
    let count = cubecl::calculate_cube_count_elemwise(client, units, dim);
    // SAFETY: the caller's buffers hold `len` elements of `input`; `out` was made for `len` of
    // `output` (array lengths count elements); every kernel checks `ABSOLUTE_POS < out.len()`.
    let arg = |handle: &Handle| unsafe { ArrayArg::from_raw_parts(handle.clone(), len) };
    match path {
        Path::Fused => {
            macro_rules! launch {
                ($i:ty, $o:ty) => {
                    fused_sum_cast::launch::<$i, $o, R>(
                        client,
                        count,
                        dim,
                        vector,
                        arg(local),
                        arg(peer),
                        arg(&out),
                    )
                };
            }
            match (input, output) {
                (FloatKind::F32, FloatKind::F32) => launch!(f32, f32),
                (FloatKind::F32, FloatKind::F16) => launch!(f32, f16),
                (FloatKind::F32, FloatKind::BF16) => launch!(f32, bf16),
                (FloatKind::F16, FloatKind::F32) => launch!(f16, f32),
                (FloatKind::F16, FloatKind::F16) => launch!(f16, f16),
                (FloatKind::F16, FloatKind::BF16) => launch!(f16, bf16),
                (FloatKind::BF16, FloatKind::F32) => launch!(bf16, f32),
                (FloatKind::BF16, FloatKind::F16) => launch!(bf16, f16),
                (FloatKind::BF16, FloatKind::BF16) => launch!(bf16, bf16),
            }
        }
        Path::Unfused => {
            let tmp = client.empty(len * FloatKind::F32.size());
            macro_rules! sum_then_cast {
                ($i:ty, $o:ty) => {{
                    sum_f32::launch::<$i, R>(
                        client,
                        count.clone(),
                        dim,
                        vector,
                        arg(local),
                        arg(peer),
                        arg(&tmp),
                    );
                    cast_f32::launch::<$o, R>(client, count, dim, vector, arg(&tmp), arg(&out))
                }};
            }
            match (input, output) {
                (FloatKind::F32, FloatKind::F32) => sum_then_cast!(f32, f32),
                (FloatKind::F32, FloatKind::F16) => sum_then_cast!(f32, f16),
                (FloatKind::F32, FloatKind::BF16) => sum_then_cast!(f32, bf16),
                (FloatKind::F16, FloatKind::F32) => sum_then_cast!(f16, f32),
                (FloatKind::F16, FloatKind::F16) => sum_then_cast!(f16, f16),
                (FloatKind::F16, FloatKind::BF16) => sum_then_cast!(f16, bf16),
                (FloatKind::BF16, FloatKind::F32) => sum_then_cast!(bf16, f32),
                (FloatKind::BF16, FloatKind::F16) => sum_then_cast!(bf16, f16),
                (FloatKind::BF16, FloatKind::BF16) => sum_then_cast!(bf16, bf16),
            }
        }
    }
    out
}
