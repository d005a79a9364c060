//! The integer kernels of quantized models (`model::integer`): products on
//! byte activations, their int32 sums brought back to bytes by one float
//! multiplication rounded to nearest even, as XNNPACK requantizes.

mod depthwise;
mod gemm;
#[cfg(test)]
pub(crate) mod testing;

pub use depthwise::{Depthwise, Geometry};
pub use gemm::Gemm;

/// How an int32 sum becomes an output byte:
/// `clamp(round_ties_even(sum * scale) + output_zero, low, high)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requantize {
    /// One per output channel.
    pub scale: Vec<f32>,
    pub output_zero: i32,
    pub low: u8,
    pub high: u8,
}

/// Whether this CPU runs the products on vector instructions: elsewhere the
/// portable kernels are correct but slower than the float plan.
pub fn has_vector_kernels() -> bool {
    gemm::has_vector_kernels()
}
