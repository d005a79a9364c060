//! TensorFlow Lite files: found in an archive, read, rebuilt as float32 and
//! cut into stages that tract loads.

pub mod archive;
pub mod dequantize;
