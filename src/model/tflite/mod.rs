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
//! - `read`: verifies the untrusted flatbuffer and reads a checked graph,
//!   with its metadata (`metadata`) and the label file that names, from the
//!   zip appended to the flatbuffer (`zip`);
//! - `rewrite`: the float32 rewrite, operator by operator;
//! - `stages`: cuts the rebuilt graph into stages of about equal cost;
//! - `write`: the rebuilt graph and its serialization, stage by stage.
//!
//! `quant` holds the quantization parameters and arithmetic they all share.

pub mod archive;
mod integer;
mod metadata;
mod quant;
mod read;
mod rewrite;
mod stages;
mod write;
mod zip;

use super::integer::Network;
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
    #[error("malformed TFLite metadata: {0}")]
    Metadata(String),
    #[error("the label file embedded in the model: {0}")]
    EmbeddedLabels(String),
}

type Result<T> = std::result::Result<T, DequantizeError>;

fn malformed(msg: impl Into<String>) -> DequantizeError {
    DequantizeError::Malformed(msg.into())
}

fn unsupported(msg: impl Into<String>) -> DequantizeError {
    DequantizeError::Unsupported(msg.into())
}

/// How the model reads a pixel: `real = pixel * scale[c] + offset[c]` for
/// the 8-bit value of channel `c` (R, G, B), applied to every pixel before
/// it enters the float network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub scale: [f32; 3],
    pub offset: [f32; 3],
}

impl Normalization {
    /// The same for every channel.
    pub const fn uniform(scale: f32, offset: f32) -> Normalization {
        Normalization { scale: [scale; 3], offset: [offset; 3] }
    }
}

impl From<MeanStd> for Normalization {
    fn from(given: MeanStd) -> Normalization {
        let channel = |c: usize| (1.0 / given.std[c], -given.mean[c] / given.std[c]);
        let [(s0, o0), (s1, o1), (s2, o2)] = [channel(0), channel(1), channel(2)];
        Normalization { scale: [s0, s1, s2], offset: [o0, o1, o2] }
    }
}

/// A normalization as TFLite metadata's NormalizationOptions (and the
/// command line's `--mean`, `--std`) give it: `input = (pixel - mean) / std`
/// per channel (R, G, B), the pixel in [0, 255].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanStd {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl MeanStd {
    /// The MobileNet convention, `[0, 255] -> [-1, 1]`.
    pub const MOBILENET: MeanStd = MeanStd { mean: [127.5; 3], std: [127.5; 3] };

    /// From one value for every channel or one per channel, each: every
    /// value finite, no std zero.
    pub fn new(mean: &[f32], std: &[f32]) -> std::result::Result<MeanStd, String> {
        Ok(MeanStd { mean: channels(mean, "mean")?, std: channels(std, "std")? })
    }
}

/// Three channel values from one or three, checked as a `what` (mean or std).
pub fn channels(values: &[f32], what: &str) -> std::result::Result<[f32; 3], String> {
    let values = match *values {
        [v] => [v; 3],
        [r, g, b] => [r, g, b],
        _ => return Err(format!("{} values for the {what}, expected one or one per channel (R,G,B)", values.len())),
    };
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(format!("the {what} {bad} is not a finite number"));
    }
    if what == "std" && values.contains(&0.0) {
        return Err("a std of 0 divides by zero".into());
    }
    Ok(values)
}

/// A file the model carries in the zip appended to it, named by its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// A float32 rebuild of a model, ready for tract, as stages run one after
/// the other: the first takes the image, each next one the tensor its
/// predecessor gives, and the last gives the scores.
pub(crate) struct FloatModel<'a> {
    stages: Vec<Rebuilt<'a>>,
    /// How pixels become the model's input.
    pub normalization: Normalization,
    /// Whether the model's outputs already are probabilities (its graph
    /// ends in SOFTMAX or LOGISTIC).
    pub probabilities: bool,
    /// The label file the metadata names for the output.
    pub labels: Option<EmbeddedFile>,
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
/// Pixels are normalized as `given`, else as the model says (see
/// `Graph::input_normalization`). With `grids`, the stages mark where the
/// quantized model rounds its activations to 8 bits (see `rewrite`).
pub(crate) fn dequantize(bytes: &[u8], stages: usize, given: Option<MeanStd>, grids: bool) -> Result<FloatModel<'_>> {
    let graph = Graph::from_bytes(bytes)?;
    let normalization = graph.input_normalization(given)?;
    let probabilities = graph.output_is_probability();
    let labels = embedded_labels(&graph, bytes)?;
    let (rebuilt, grids) = graph.rebuild(grids)?;
    let stages = rebuilt.into_stages(stages);
    Ok(FloatModel { stages, normalization, probabilities, labels, grids })
}

/// A quantized TFLite model planned to run in 8-bit integers.
#[derive(Debug)]
pub(crate) struct IntegerModel {
    pub network: Network,
    pub normalization: Normalization,
    pub probabilities: bool,
    pub labels: Option<EmbeddedFile>,
}

/// `bytes`, a TFLite model, planned as an integer network with pixels
/// normalized as `given` or as the model says; `Ok(Err(why))` where the
/// graph has something the integer steps lack (the float rebuild takes it).
pub(crate) fn integer(bytes: &[u8], given: Option<MeanStd>) -> Result<std::result::Result<IntegerModel, String>> {
    let graph = Graph::from_bytes(bytes)?;
    let normalization = graph.input_normalization(given)?;
    // Whatever the integer steps refuse, malformed or not, is the float
    // rebuild's to take or refuse: it checks the file its own way.
    let network = match graph.integer(normalization) {
        Ok(network) => network,
        Err(why) => return Ok(Err(why.to_string())),
    };
    let probabilities = graph.output_is_probability();
    let labels = embedded_labels(&graph, bytes)?;
    Ok(Ok(IntegerModel { network, normalization, probabilities, labels }))
}

/// The label file the model's metadata names, from the zip appended to it.
fn embedded_labels(graph: &Graph, bytes: &[u8]) -> Result<Option<EmbeddedFile>> {
    let Some(name) = graph.metadata.as_ref().and_then(|m| m.labels.clone()) else { return Ok(None) };
    match zip::find(bytes, &name).map_err(DequantizeError::EmbeddedLabels)? {
        Some(bytes) => Ok(Some(EmbeddedFile { name, bytes })),
        None => {
            Err(DequantizeError::EmbeddedLabels(format!("the metadata names {name}, but no zip follows the model")))
        }
    }
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
        assert!(matches!(dequantize(b"", 1, None, true), Err(DequantizeError::NotTflite)));
        assert!(matches!(
            dequantize(b"<html><body>nope</body></html>", 1, None, true),
            Err(DequantizeError::NotTflite)
        ));
        let model = mock_model();
        for len in 0..model.len() {
            assert!(dequantize(&model[..len], 1, None, true).is_err(), "a model cut at {len} bytes was accepted");
        }
        // Every single-byte corruption either fails cleanly or still rebuilds.
        for at in 0..model.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut corrupt = model.clone();
                corrupt[at] ^= flip;
                if let Ok(float) = dequantize(&corrupt, 3, None, true) {
                    (0..float.stages()).for_each(|i| drop(float.stage(i)));
                }
            }
        }
    }
}
