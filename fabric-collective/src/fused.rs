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
fn fused_sum_cast<L: Float, P: Float, O: Float, N: Size>(
    local: &Array<Vector<L, N>>,
    peer: &Array<Vector<P, N>>,
    out: &mut Array<Vector<O, N>>,
    divisor: f32,
) {
    if ABSOLUTE_POS < out.len() {
        let sum = Vector::<f32, N>::cast_from(local[ABSOLUTE_POS])
            + Vector::<f32, N>::cast_from(peer[ABSOLUTE_POS]);
        out[ABSOLUTE_POS] = Vector::cast_from(sum / Vector::new(divisor));
    }
}

#[cube(launch)]
fn sum_f32<L: Float, P: Float, N: Size>(
    local: &Array<Vector<L, N>>,
    peer: &Array<Vector<P, N>>,
    out: &mut Array<Vector<f32, N>>,
    divisor: f32,
) {
    if ABSOLUTE_POS < out.len() {
        let sum = Vector::<f32, N>::cast_from(local[ABSOLUTE_POS])
            + Vector::<f32, N>::cast_from(peer[ABSOLUTE_POS]);
        out[ABSOLUTE_POS] = sum / Vector::new(divisor);
    }
}

#[cube(launch)]
fn cast_f32<O: Float, N: Size>(input: &Array<Vector<f32, N>>, out: &mut Array<Vector<O, N>>) {
    if ABSOLUTE_POS < out.len() {
        out[ABSOLUTE_POS] = Vector::cast_from(input[ABSOLUTE_POS]);
    }
}

/// The widest vector the runtime loads in one access for the narrowest dtype (16 bytes on
/// CUDA: 8 halves) that divides `len`.
fn vector_size<R: Runtime>(client: &ComputeClient<R>, len: usize, narrow: usize) -> usize {
    client
        .io_optimized_vector_sizes(narrow)
        .find(|v| len.is_multiple_of(*v))
        .unwrap_or(1)
}

/// Runs `$body` with `$t` the element type of float kind `$kind`.
macro_rules! with_float {
    ($kind:expr, $t:ident => $body:expr) => {
        match $kind {
            FloatKind::F32 => {
                type $t = f32;
                $body
            }
            FloatKind::F16 => {
                type $t = f16;
                $body
            }
            FloatKind::BF16 => {
                type $t = bf16;
                $body
            }
        }
    };
}

/// One input of [`sum_scale_cast`]: a buffer and the dtype of its elements.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    /// The buffer (at least the call's `len` elements).
    pub handle: &'a Handle,
    /// Its element type.
    pub kind: FloatKind,
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
    let operand = |handle| Operand {
        handle,
        kind: input,
    };
    sum_scale_cast(
        client,
        operand(local),
        operand(peer),
        len,
        output,
        1.0,
        path,
    )
}

/// `out = output((f32(local) + f32(peer)) / divisor)` over `len` elements, the two inputs in
/// their own dtypes (an f32 running sum and a rank's half buffer, say); returns the new output
/// buffer. A `divisor` of 1 leaves the sum exact; the last step of a mean passes the world size.
pub fn sum_scale_cast<R: Runtime>(
    client: &ComputeClient<R>,
    local: Operand<'_>,
    peer: Operand<'_>,
    len: usize,
    output: FloatKind,
    divisor: f32,
    path: Path,
) -> Handle {
    let out = client.empty(len * output.size());
    if len == 0 {
        return out;
    }
    let narrow = local.kind.size().min(peer.kind.size()).min(output.size());
    let vector = vector_size(client, len, narrow);
    let units = len / vector;
    let dim = CubeDim::new(client, units);
    let count = cubecl::calculate_cube_count_elemwise(client, units, dim);
    // SAFETY: the caller's buffers hold `len` elements of their kinds; `out` was made for `len`
    // of `output` (array lengths count elements); every kernel checks `ABSOLUTE_POS < out.len()`.
    let arg = |handle: &Handle| unsafe { ArrayArg::from_raw_parts(handle.clone(), len) };
    let (l, p) = (arg(local.handle), arg(peer.handle));
    match path {
        Path::Fused => {
            with_float!(local.kind, L => with_float!(peer.kind, P => with_float!(output, O =>
                fused_sum_cast::launch::<L, P, O, R>(client, count, dim, vector, l, p, arg(&out), divisor)
            )))
        }
        Path::Unfused => {
            let tmp = client.empty(len * FloatKind::F32.size());
            with_float!(local.kind, L => with_float!(peer.kind, P =>
                sum_f32::launch::<L, P, R>(client, count.clone(), dim, vector, l, p, arg(&tmp), divisor)
            ));
            with_float!(output, O =>
                cast_f32::launch::<O, R>(client, count, dim, vector, arg(&tmp), arg(&out))
            );
        }
    }
    out
}
