//! TensorFlow Lite files: found in an archive, read, rebuilt as float32 and
//! cut into stages that tract loads.
//!
//! tract-tflite 0.23 cannot translate fully uint8-quantized graphs whose ADDs
//! mix quantization parameters, and has no QUANTIZE/DEQUANTIZE ops. It does run
//! float32 graphs of the same operators correctly, so `dequantize` rewrites the
//! flatbuffer: every constant is dequantized to its real values, every
//! activation becomes float32 with no quantization parameters, and the quirks
//! of both sides are made explicit.
//!
//! The steps, a file each, in the order a model goes through them:
//!
//! - `archive`: finds the flatbuffer, alone or in a gzip'd tar;
//! - `read`: verifies the untrusted flatbuffer and reads a checked graph;
//! - `rewrite`: the float32 rewrite, operator by operator;
//! - `stages`: cuts the rebuilt graph into stages of about equal cost;
//! - `write`: the rebuilt graph and its serialization, stage by stage.
//!
//! `quant` holds the quantization parameters and arithmetic they all share.

pub mod archive;
mod quant;
mod read;
mod rewrite;
mod stages;
mod write;

use super::kernels::grid::Grid;
use read::Graph;
use write::Rebuilt;

/// Why a model could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum DequantizeError {
    #[error("not a TensorFlow Lite model (the file identifier TFL3 is missing)")]
    NotTflite,
    #[error("malformed TensorFlow Lite flatbuffer: {0}")]
    Malformed(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, DequantizeError>;

fn malformed(msg: impl Into<String>) -> DequantizeError {
    DequantizeError::Malformed(msg.into())
}

fn unsupported(msg: impl Into<String>) -> DequantizeError {
    DequantizeError::Unsupported(msg.into())
}

/// How the model reads a pixel: `real = pixel * scale + offset`, applied to
/// every 8-bit channel value before it enters the float network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub scale: f32,
    pub offset: f32,
}

impl Normalization {
    /// The MobileNet convention, `[0, 255] -> [-1, 1]`, for float models that
    /// carry no quantization to derive it from.
    pub const MINUS_ONE_TO_ONE: Normalization = Normalization { scale: 1.0 / 127.5, offset: -1.0 };
}

/// A float32 rebuild of a model, ready for tract, as stages run one after
/// the other: the first takes the image, each next one the tensor its
/// predecessor gives, and the last gives the scores.
pub(crate) struct FloatModel<'a> {
    stages: Vec<Rebuilt<'a>>,
    /// The pixel normalisation equivalent to the original input's quantization.
    pub normalization: Normalization,
    /// The 8-bit grids of the activations whose rounding the stages mark.
    pub grids: Vec<Grid>,
}

impl std::fmt::Debug for FloatModel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FloatModel")
            .field("stages", &self.stages.len())
            .field("normalization", &self.normalization)
            .field("grids", &self.grids.len())
            .finish()
    }
}

impl FloatModel<'_> {
    /// How many stages the model was cut into.
    pub fn stages(&self) -> usize {
        self.stages.len()
    }

    /// Stage `index` as a TFLite flatbuffer.
    pub fn stage(&self, index: usize) -> Flatbuffer {
        let (buffer, head) = self.stages[index].serialize();
        Flatbuffer { buffer, head }
    }
}

/// A stage of the rebuilt model as a TFLite flatbuffer, written back to
/// front: it starts at `head`.
pub(crate) struct Flatbuffer {
    buffer: Vec<u8>,
    head: usize,
}

impl Flatbuffer {
    pub fn bytes(&self) -> &[u8] {
        &self.buffer[self.head..]
    }
}

/// Rebuilds `bytes`, a TFLite model of any quantization, as a float32 model
/// cut into at most `stages` stages of about equal weight (fewer if the graph
/// has fewer places where a single tensor flows from one part to the next).
/// With `grids`, the stages mark where the quantized model rounds its
/// activations to 8 bits (see `rewrite`).
pub(crate) fn dequantize(bytes: &[u8], stages: usize, grids: bool) -> Result<FloatModel<'_>> {
    let graph = Graph::from_bytes(bytes)?;
    let normalization = graph.input_normalization()?;
    let (rebuilt, grids) = graph.rebuild(grids)?;
    let stages = rebuilt.into_stages(stages);
    Ok(FloatModel { stages, normalization, grids })
}

/// The bytes of the small mock model the tests use.
#[cfg(test)]
fn mock_model() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mock_model.tflite")).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_gives_errors_not_panics() {
        assert!(matches!(dequantize(b"", 1, true), Err(DequantizeError::NotTflite)));
        assert!(matches!(dequantize(b"<html><body>nope</body></html>", 1, true), Err(DequantizeError::NotTflite)));
        let model = mock_model();
        for len in 0..model.len() {
            assert!(dequantize(&model[..len], 1, true).is_err(), "a model cut at {len} bytes was accepted");
        }
        // Every single-byte corruption either fails cleanly or still rebuilds.
        for at in 0..model.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut corrupt = model.clone();
                corrupt[at] ^= flip;
                if let Ok(float) = dequantize(&corrupt, 3, true) {
                    (0..float.stages()).for_each(|i| drop(float.stage(i)));
                }
            }
        }
    }
}
