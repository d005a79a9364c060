//! Quantization parameters and the arithmetic that turns quantized values
//! into real ones. Apart from the rest because every step uses them: reading
//! checks a tensor's parameters, the rewrite reads the ReLU a range implies,
//! and writing dequantizes the weights.

use super::{Result, malformed};

/// Quantization of one tensor, per tensor or per axis.
#[derive(Debug, Clone)]
pub(super) struct Quant {
    pub(super) scale: Vec<f32>,
    pub(super) zero_point: Vec<i64>,
    pub(super) axis: usize,
}

impl Quant {
    pub(super) fn single(&self) -> Option<(f32, i64)> {
        (self.scale.len() == 1).then(|| (self.scale[0], self.zero_point.first().copied().unwrap_or(0)))
    }

    /// Checks these parameters against the tensor's shape, and returns how
    /// many consecutive values share a scale: all of them, or for per-axis
    /// scales, the values inside one step of the quantized axis.
    pub(super) fn inner(&self, name: &str, shape: &[i32]) -> Result<usize> {
        let channels = self.scale.len();
        if channels == 1 {
            return Ok(usize::MAX);
        }
        if self.axis >= shape.len() || shape[self.axis] as usize != channels {
            return Err(malformed(format!(
                "tensor {name} has {channels} scales for axis {} of shape {shape:?}",
                self.axis
            )));
        }
        if self.zero_point.len() > 1 && self.zero_point.len() != channels {
            return Err(malformed(format!(
                "tensor {name} has {channels} scales but {} zero points",
                self.zero_point.len()
            )));
        }
        Ok(shape[self.axis + 1..].iter().map(|&d| d as usize).product::<usize>().max(1))
    }
}

/// Writes `values`, quantized as `q` says, into `out` as little-endian
/// float32 bytes. `inner` comes from [`Quant::inner`].
pub(super) fn dequantize_into(q: &Quant, inner: usize, values: impl ExactSizeIterator<Item = i64>, out: &mut Vec<u8>) {
    out.clear();
    out.resize(values.len() * 4, 0);
    let channels = q.scale.len();
    let zero_point = |c: usize| q.zero_point.get(c).or(q.zero_point.first()).copied().unwrap_or(0);
    let mut values = values;
    // Values run through the channels in blocks of `inner`.
    for (block, bytes) in out.chunks_mut(inner.saturating_mul(4)).enumerate() {
        let c = block % channels;
        let (scale, zero_point) = (q.scale[c], zero_point(c) as f64);
        for (bytes, v) in bytes.chunks_exact_mut(4).zip(&mut values) {
            bytes.copy_from_slice(&((v as f64 - zero_point) as f32 * scale).to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::DequantizeError;
    use super::*;

    #[test]
    fn per_axis_scales_are_honoured() {
        let q = Quant { scale: vec![0.5, 2.0], zero_point: vec![0, 1], axis: 0 };
        let inner = q.inner("w", &[2, 3]).unwrap();
        let mut values = vec![];
        dequantize_into(&q, inner, [2, 4, 6, 1, 2, 3].into_iter(), &mut values);
        let floats: Vec<f32> = values.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(floats, [1.0, 2.0, 3.0, 0.0, 2.0, 4.0]);
        assert!(matches!(q.inner("w", &[3, 2]), Err(DequantizeError::Malformed(_))));
    }
}
