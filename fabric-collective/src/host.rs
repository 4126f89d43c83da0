//! Packing several host buffers into one and back, for engines that move one contiguous buffer
//! per collective (MPI, or any engine without a many-buffer operation).

use burn::tensor::{Bytes, DType, TensorData};

/// Concatenates one-dimensional views of `parts` into one buffer of `dtype`: a memcpy per part.
/// Parts of another dtype are converted.
pub fn pack(parts: Vec<TensorData>, dtype: DType) -> TensorData {
    let numel: usize = parts.iter().map(TensorData::num_elements).sum();
    let size = numel * dtype.size();
    // u128 elements give the buffer the 16-byte alignment every dtype needs.
    let mut bytes = Bytes::from_elems(Vec::<u128>::with_capacity(size.div_ceil(16)));
    for part in parts {
        let part = if part.dtype == dtype {
            part
        } else {
            part.convert_dtype(dtype)
        };
        bytes.extend_from_byte_slice(part.as_bytes());
    }
    TensorData::from_bytes(bytes, [numel], dtype)
}

/// One flat buffer of `numel` elements of `dtype` holding `parts` back to back: one copy of each
/// part, into memory aligned for every dtype.
pub(crate) fn concat(parts: &[&[u8]], numel: usize, dtype: DType) -> TensorData {
    let size: usize = parts.iter().map(|p| p.len()).sum();
    let mut bytes = Bytes::from_elems(Vec::<u128>::with_capacity(size.div_ceil(16)));
    for part in parts {
        bytes.extend_from_byte_slice(part);
    }
    TensorData::from_bytes(bytes, [numel], dtype)
}

/// Elements `range` of a one-dimensional buffer, copied into a buffer of their own; `None` when
/// the buffer is shorter.
pub fn slice_flat(data: &TensorData, range: std::ops::Range<usize>) -> Option<TensorData> {
    let size = data.dtype.size();
    let part = data.as_bytes().get(range.start * size..range.end * size)?;
    Some(concat(&[part], range.len(), data.dtype))
}

/// Cuts a packed one-dimensional buffer into parts of the given shapes (copies).
pub fn split(packed: &TensorData, shapes: &[Vec<usize>]) -> Vec<TensorData> {
    let size = packed.dtype.size();
    let bytes = packed.as_bytes();
    let mut offset = 0;
    shapes
        .iter()
        .map(|shape| {
            let len = shape.iter().product::<usize>() * size;
            let mut part = Bytes::from_elems(Vec::<u128>::with_capacity(len.div_ceil(16)));
            part.extend_from_byte_slice(&bytes[offset..offset + len]);
            offset += len;
            TensorData::from_bytes(part, shape.clone(), packed.dtype)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_split_round_trips_and_aligns() {
        let parts = vec![
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
            TensorData::new(vec![5.0f64], [1]),
            TensorData::full_dtype([3], 0.0, DType::F32),
        ];
        let shapes: Vec<Vec<usize>> = parts.iter().map(|p| p.shape.to_vec()).collect();
        let packed = pack(parts, DType::F32);
        assert_eq!(
            packed.to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0]
        );
        assert!((packed.as_bytes().as_ptr() as usize).is_multiple_of(16));
        let back = split(&packed, &shapes);
        assert_eq!(back[0].shape.to_vec(), vec![2, 2]);
        assert_eq!(back[0].to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(back[1].to_vec::<f32>().unwrap(), vec![5.0]);
        assert_eq!(back[2].to_vec::<f32>().unwrap(), vec![0.0; 3]);
    }
}
