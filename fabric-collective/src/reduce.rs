//! Element-wise reduction of several ranks' buffers, in place, for every dtype Burn has.
//!
//! The in-process engine gives each rank one contiguous chunk of the elements; the rank combines
//! that chunk across all buffers (in rank order, so the result is deterministic and identical on
//! every rank) and writes it back into every buffer. Work is tiled so the write-back hits cache.

use crate::ReduceOp;
use burn::tensor::{DType, TensorData};
use fabric_core::CollectiveError;
use half::{bf16, f16};
use std::ops::Range;

/// Elements per tile: small enough that a tile of every buffer stays in L1/L2.
const TILE: usize = 4096;

/// Rejects combinations that have no meaning (a sum of booleans) or no kernel (quantized data).
pub(crate) fn check_supported(data: &TensorData, op: ReduceOp) -> Result<(), CollectiveError> {
    check_supported_in(data, op, "all_reduce")
}

/// [`check_supported`] for `operation` (the name its error gives).
pub(crate) fn check_supported_in(
    data: &TensorData,
    op: ReduceOp,
    operation: &'static str,
) -> Result<(), CollectiveError> {
    let unsupported = match data.dtype {
        DType::Bool(_) => matches!(op, ReduceOp::Sum | ReduceOp::Mean),
        DType::QFloat(_) => true,
        _ => false,
    };
    if unsupported {
        return Err(CollectiveError::UnsupportedDtype {
            operation,
            dtype: format!("{:?} with op {op}", data.dtype),
        });
    }
    Ok(())
}

/// Returns `data` with bytes aligned for its element type, copying only if they are not.
pub(crate) fn aligned(data: TensorData) -> TensorData {
    let align = match data.dtype {
        DType::F64 | DType::I64 | DType::U64 => 8,
        DType::F32 | DType::Flex32 | DType::I32 | DType::U32 | DType::Bool(_) => 4,
        DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
        _ => 1,
    };
    if (data.bytes.as_ptr() as usize).is_multiple_of(align) {
        return data;
    }
    let shape = data.shape.clone();
    let dtype = data.dtype;
    let bytes = data.bytes.to_vec();
    // `from_bytes_vec` reallocates with the element type's alignment.
    TensorData::from_bytes_vec(bytes, shape, dtype)
}

/// The chunk of `n` elements that `rank` reduces.
pub(crate) fn chunk(rank: usize, world: usize, n: usize) -> Range<usize> {
    (n * rank / world)..(n * (rank + 1) / world)
}

/// Reduces `range` of every buffer: afterwards buffer `only` (or, with `None`, every buffer)
/// holds, at each index, the combination of all buffers' values there.
///
/// # Safety
/// Each pointer addresses a live buffer of at least `range.end` elements of `dtype`, aligned for
/// it (see [`aligned`]), and no other thread reads or writes `range` of any buffer during the call.
pub(crate) unsafe fn reduce_range(
    dtype: DType,
    ptrs: &[*mut u8],
    range: Range<usize>,
    op: ReduceOp,
    only: Option<usize>,
) {
    // SAFETY: forwarded from the caller; the element type matches `dtype`.
    unsafe {
        match dtype {
            DType::F32 | DType::Flex32 => fold::<f32>(ptrs, range, op, only),
            DType::F64 => fold::<f64>(ptrs, range, op, only),
            DType::F16 => fold::<f16>(ptrs, range, op, only),
            DType::BF16 => fold::<bf16>(ptrs, range, op, only),
            DType::I64 => fold::<i64>(ptrs, range, op, only),
            DType::I32 => fold::<i32>(ptrs, range, op, only),
            DType::I16 => fold::<i16>(ptrs, range, op, only),
            DType::I8 => fold::<i8>(ptrs, range, op, only),
            DType::U64 => fold::<u64>(ptrs, range, op, only),
            DType::U32 | DType::Bool(burn::tensor::BoolStore::U32) => {
                fold::<u32>(ptrs, range, op, only)
            }
            DType::U16 => fold::<u16>(ptrs, range, op, only),
            // Booleans stored as bytes 0/1: min is AND, max is OR.
            DType::U8 | DType::Bool(_) => fold::<u8>(ptrs, range, op, only),
            DType::QFloat(_) => {}
        }
    }
}

/// Divides every element by `world` (the `Mean` after a `Sum`), rounding integers to nearest.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn divide(data: &mut TensorData, world: usize) {
    let bytes: &mut [u8] = &mut data.bytes;
    let ptr = bytes.as_mut_ptr();
    let len = bytes.len();
    // SAFETY: `ptr..ptr + len` is this buffer, aligned for its dtype by the callers (which pass
    // buffers through `aligned`), and uniquely borrowed here.
    unsafe {
        match data.dtype {
            DType::F32 | DType::Flex32 => scale::<f32>(ptr, len, world),
            DType::F64 => scale::<f64>(ptr, len, world),
            DType::F16 => scale::<f16>(ptr, len, world),
            DType::BF16 => scale::<bf16>(ptr, len, world),
            DType::I64 => scale::<i64>(ptr, len, world),
            DType::I32 => scale::<i32>(ptr, len, world),
            DType::I16 => scale::<i16>(ptr, len, world),
            DType::I8 => scale::<i8>(ptr, len, world),
            DType::U64 => scale::<u64>(ptr, len, world),
            DType::U32 => scale::<u32>(ptr, len, world),
            DType::U16 => scale::<u16>(ptr, len, world),
            DType::U8 => scale::<u8>(ptr, len, world),
            DType::Bool(_) | DType::QFloat(_) => {}
        }
    }
}

/// # Safety
/// `ptr` addresses `len` bytes of aligned, exclusively borrowed `T`s.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
unsafe fn scale<T: Elem>(ptr: *mut u8, len: usize, world: usize) {
    // SAFETY: forwarded from the caller.
    let values = unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len / size_of::<T>()) };
    for v in values {
        *v = T::store(T::mean(v.load(), world));
    }
}

/// # Safety
/// See [`reduce_range`]; `T` is the element type of every buffer.
unsafe fn fold<T: Elem>(ptrs: &[*mut u8], range: Range<usize>, op: ReduceOp, only: Option<usize>) {
    let start = range.start;
    let len = range.len();
    let world = ptrs.len();
    let bufs: Vec<&mut [T]> = ptrs
        .iter()
        // SAFETY: the caller guarantees `start + len` elements, alignment and exclusive access.
        .map(|&p| unsafe { std::slice::from_raw_parts_mut((p as *mut T).add(start), len) })
        .collect();
    match op {
        ReduceOp::Sum => tiles(bufs, T::add, None, only),
        ReduceOp::Mean => tiles(bufs, T::add, Some(world), only),
        ReduceOp::Min => tiles(bufs, T::min, None, only),
        ReduceOp::Max => tiles(bufs, T::max, None, only),
    }
}

fn tiles<T: Elem>(
    mut bufs: Vec<&mut [T]>,
    combine: impl Fn(T::Acc, T::Acc) -> T::Acc,
    mean_of: Option<usize>,
    only: Option<usize>,
) {
    let Some(len) = bufs.first().map(|b| b.len()) else {
        return;
    };
    let mut acc = vec![T::Acc::default(); TILE.min(len)];
    for start in (0..len).step_by(TILE) {
        let end = (start + TILE).min(len);
        let acc = &mut acc[..end - start];
        for (a, x) in acc.iter_mut().zip(&bufs[0][start..end]) {
            *a = x.load();
        }
        for buf in &bufs[1..] {
            for (a, x) in acc.iter_mut().zip(&buf[start..end]) {
                *a = combine(*a, x.load());
            }
        }
        if let Some(world) = mean_of {
            for a in acc.iter_mut() {
                *a = T::mean(*a, world);
            }
        }
        for (index, buf) in bufs.iter_mut().enumerate() {
            if only.is_some_and(|only| only != index) {
                continue;
            }
            for (x, a) in buf[start..end].iter_mut().zip(acc.iter()) {
                *x = T::store(*a);
            }
        }
    }
}

/// An element type and the type it is combined in.
trait Elem: Copy + 'static {
    type Acc: Copy + Default;
    fn load(self) -> Self::Acc;
    fn store(acc: Self::Acc) -> Self;
    fn add(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn min(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn max(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn mean(sum: Self::Acc, world: usize) -> Self::Acc;
}

/// Floats: combined in `$acc` (f32 for the half types); min and max propagate NaN.
macro_rules! float_elem {
    ($($t:ty => $acc:ty, $load:expr, $store:expr);* $(;)?) => {$(
        impl Elem for $t {
            type Acc = $acc;
            #[inline(always)]
            fn load(self) -> $acc { $load(self) }
            #[inline(always)]
            fn store(acc: $acc) -> Self { $store(acc) }
            #[inline(always)]
            fn add(a: $acc, b: $acc) -> $acc { a + b }
            #[inline(always)]
            fn min(a: $acc, b: $acc) -> $acc { if a.is_nan() || b < a { b } else { a } }
            #[inline(always)]
            fn max(a: $acc, b: $acc) -> $acc { if a.is_nan() || b > a { b } else { a } }
            #[inline(always)]
            fn mean(sum: $acc, world: usize) -> $acc { sum / world as $acc }
        }
    )*};
}

float_elem! {
    f32 => f32, |x| x, |a| a;
    f64 => f64, |x| x, |a| a;
    f16 => f32, f16::to_f32, f16::from_f32;
    bf16 => f32, bf16::to_f32, bf16::from_f32;
}

/// Integers: combined in i128 so sums cannot overflow before the store; a sum that does not fit
/// the element type wraps, as in PyTorch. The mean rounds to nearest, ties away from zero.
macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            type Acc = i128;
            #[inline(always)]
            fn load(self) -> i128 { self as i128 }
            #[inline(always)]
            fn store(acc: i128) -> Self { acc as $t }
            #[inline(always)]
            fn add(a: i128, b: i128) -> i128 { a.wrapping_add(b) }
            #[inline(always)]
            fn min(a: i128, b: i128) -> i128 { a.min(b) }
            #[inline(always)]
            fn max(a: i128, b: i128) -> i128 { a.max(b) }
            #[inline(always)]
            fn mean(sum: i128, world: usize) -> i128 {
                let world = world as i128;
                let half = world / 2;
                if sum >= 0 { (sum + half) / world } else { (sum - half) / world }
            }
        }
    )*};
}

int_elem!(i64, i32, i16, i8, u64, u32, u16, u8);

#[cfg(test)]
mod tests {
    use super::*;

    fn reduce_all<T: Copy>(bufs: &mut [Vec<T>], dtype: DType, op: ReduceOp) {
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr() as *mut u8).collect();
        let n = bufs[0].len();
        for rank in 0..bufs.len() {
            // SAFETY: the vectors outlive the call and each chunk is reduced once, sequentially.
            unsafe { reduce_range(dtype, &ptrs, chunk(rank, bufs.len(), n), op, None) };
        }
    }

    #[test]
    fn float_ops_across_three_buffers() {
        let base: Vec<Vec<f32>> = vec![
            (0..10_001).map(|i| i as f32).collect(),
            (0..10_001).map(|i| -(i as f32) * 0.5).collect(),
            (0..10_001).map(|i| (i % 7) as f32).collect(),
        ];
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Min, ReduceOp::Max] {
            let mut bufs = base.clone();
            reduce_all(&mut bufs, DType::F32, op);
            for i in [0usize, 1, 4095, 4096, 9999, 10_000] {
                let vals = [base[0][i], base[1][i], base[2][i]];
                let expected = match op {
                    ReduceOp::Sum => vals[0] + vals[1] + vals[2],
                    ReduceOp::Mean => (vals[0] + vals[1] + vals[2]) / 3.0,
                    ReduceOp::Min => vals.iter().cloned().fold(f32::INFINITY, f32::min),
                    ReduceOp::Max => vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
                };
                for b in &bufs {
                    assert_eq!(b[i], expected, "op {op} index {i}");
                }
            }
        }
    }

    #[test]
    fn integer_mean_rounds_to_nearest() {
        let mut bufs = vec![vec![1i32, -1, 2, 7], vec![2, -2, 2, 8]];
        reduce_all(&mut bufs, DType::I32, ReduceOp::Mean);
        // 3/2 -> 2, -3/2 -> -2, 4/2 -> 2, 15/2 -> 8
        assert_eq!(bufs[0], vec![2, -2, 2, 8]);
        assert_eq!(bufs[1], bufs[0]);
    }

    #[test]
    fn booleans_reduce_as_and_or() {
        let mut bufs = vec![vec![1u8, 1, 0, 0], vec![1, 0, 1, 0]];
        reduce_all(&mut bufs, DType::U8, ReduceOp::Min);
        assert_eq!(bufs[0], vec![1, 0, 0, 0]);
        let mut bufs = vec![vec![1u8, 1, 0, 0], vec![1, 0, 1, 0]];
        reduce_all(&mut bufs, DType::U8, ReduceOp::Max);
        assert_eq!(bufs[1], vec![1, 1, 1, 0]);
    }

    #[test]
    fn half_types_accumulate_in_f32() {
        let a = bf16::from_f32(256.0);
        let b = bf16::from_f32(1.0);
        let mut bufs = vec![vec![a, a], vec![b, b], vec![b, b]];
        reduce_all(&mut bufs, DType::BF16, ReduceOp::Sum);
        // Summed pairwise in bf16, 256 + 1 rounds back to 256 twice; in f32 it is 258.
        assert_eq!(bufs[0][0].to_f32(), 258.0);
    }

    #[test]
    fn reducing_into_one_buffer_leaves_the_others() {
        let mut bufs = vec![vec![1.0f32, 2.0], vec![10.0, 20.0], vec![100.0, 200.0]];
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr() as *mut u8).collect();
        // SAFETY: the vectors outlive the call; one call covers the whole range.
        unsafe { reduce_range(DType::F32, &ptrs, 0..2, ReduceOp::Sum, Some(1)) };
        assert_eq!(
            bufs,
            vec![vec![1.0, 2.0], vec![111.0, 222.0], vec![100.0, 200.0]]
        );
    }

    #[test]
    fn divide_is_the_mean_after_a_sum() {
        let mut data = aligned(TensorData::new(vec![3.0f32, -6.0], [2]));
        divide(&mut data, 3);
        assert_eq!(data.to_vec::<f32>().unwrap(), vec![1.0, -2.0]);
        let mut data = aligned(TensorData::new(vec![5i64, -5], [2]));
        divide(&mut data, 2);
        assert_eq!(data.to_vec::<i64>().unwrap(), vec![3, -3]);
    }

    #[test]
    fn sums_of_booleans_are_rejected() {
        let data = TensorData::new(vec![true, false], [2]);
        assert!(check_supported(&data, ReduceOp::Sum).is_err());
        assert!(check_supported(&data, ReduceOp::Max).is_ok());
    }
}
