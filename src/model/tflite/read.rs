//! Verifies a TFLite flatbuffer and reads its first subgraph into a source
//! graph: tensors with their shapes, types, quantization and constant bytes,
//! operators with their codes, and the pixel normalisation of the input.
//!
//! The bytes are untrusted: the flatbuffer is verified first, and every
//! buffer, opcode and tensor index is checked here, once, so that the rewrite
//! can index the graph freely (it checks the shapes and byte lengths it uses).

use tract_tflite::tflite::{self, BuiltinOperator, TensorType};

use super::metadata::{self, Metadata};
use super::quant::Quant;
use super::{DequantizeError, MeanStd, Normalization, Result, malformed, unsupported};

/// A tensor of the original model, read and checked.
#[derive(Debug, Clone)]
pub(super) struct SourceTensor<'a> {
    pub(super) name: String,
    pub(super) shape: Vec<i32>,
    pub(super) ty: TensorType,
    pub(super) quant: Option<Quant>,
    pub(super) data: Option<&'a [u8]>,
}

/// An operator of the original model, with the options this rebuild needs.
pub(super) struct SourceOp<'a> {
    pub(super) code: BuiltinOperator,
    pub(super) inputs: Vec<i32>,
    pub(super) outputs: Vec<i32>,
    pub(super) flat: tflite::Operator<'a>,
}

/// The first subgraph of the original model, read and checked.
pub(super) struct Graph<'a> {
    pub(super) tensors: Vec<SourceTensor<'a>>,
    pub(super) ops: Vec<SourceOp<'a>>,
    pub(super) inputs: Vec<i32>,
    pub(super) outputs: Vec<i32>,
    /// The model's TFLite metadata, if it has any.
    pub(super) metadata: Option<Metadata>,
}

impl<'a> Graph<'a> {
    /// Verifies `bytes` as a TFLite flatbuffer and reads its graph.
    pub(super) fn from_bytes(bytes: &'a [u8]) -> Result<Graph<'a>> {
        if bytes.len() < 8 || !tflite::model_buffer_has_identifier(bytes) {
            return Err(DequantizeError::NotTflite);
        }
        let model = tflite::root_as_model(bytes).map_err(|e| malformed(e.to_string()))?;
        let mut graph = Graph::read(&model)?;
        graph.metadata = metadata::read(&model).map_err(DequantizeError::Metadata)?;
        Ok(graph)
    }

    fn read(model: &tflite::Model<'a>) -> Result<Graph<'a>> {
        let subgraphs = model.subgraphs().ok_or_else(|| malformed("no subgraphs"))?;
        if subgraphs.is_empty() {
            return Err(malformed("no subgraphs"));
        }
        let graph = subgraphs.get(0);
        let buffers = model.buffers();
        let codes = model.operator_codes().ok_or_else(|| malformed("no operator codes"))?;
        let flat_tensors = graph.tensors().ok_or_else(|| malformed("no tensors"))?;

        let mut tensors = Vec::with_capacity(flat_tensors.len());
        for (ix, t) in flat_tensors.iter().enumerate() {
            let name = t.name().unwrap_or("").to_string();
            let shape: Vec<i32> = t.shape().map(|s| s.iter().collect()).unwrap_or_default();
            if shape.iter().any(|&d| d < 0) {
                return Err(unsupported(format!("tensor {ix} ({name}) has a dynamic shape {shape:?}")));
            }
            let quant = t.quantization().and_then(|q| {
                let scale: Vec<f32> = q.scale()?.iter().collect();
                if scale.is_empty() {
                    return None;
                }
                let zero_point: Vec<i64> = q.zero_point().map(|z| z.iter().collect()).unwrap_or_default();
                Some(Quant { scale, zero_point, axis: q.quantized_dimension().max(0) as usize })
            });
            let data = match t.buffer() as usize {
                0 => None,
                b => {
                    let buffers = buffers.ok_or_else(|| malformed("no buffers"))?;
                    if b >= buffers.len() {
                        return Err(malformed(format!("tensor {ix} ({name}) names buffer {b} of {}", buffers.len())));
                    }
                    buffers.get(b).data().map(|d| d.bytes()).filter(|d| !d.is_empty())
                }
            };
            tensors.push(SourceTensor { name, shape, ty: t.type_(), quant, data });
        }

        let check = |ix: i32, what: &str| -> Result<()> {
            if ix < 0 || ix as usize >= tensors.len() {
                Err(malformed(format!("{what} names tensor {ix} of {}", tensors.len())))
            } else {
                Ok(())
            }
        };
        let inputs: Vec<i32> = graph.inputs().ok_or_else(|| malformed("no inputs"))?.iter().collect();
        let outputs: Vec<i32> = graph.outputs().ok_or_else(|| malformed("no outputs"))?.iter().collect();
        for &i in &inputs {
            check(i, "the graph input")?;
        }
        for &o in &outputs {
            check(o, "the graph output")?;
        }

        let mut ops = vec![];
        for (n, op) in graph.operators().ok_or_else(|| malformed("no operators"))?.iter().enumerate() {
            let code_ix = op.opcode_index() as usize;
            if code_ix >= codes.len() {
                return Err(malformed(format!("operator {n} names opcode {code_ix} of {}", codes.len())));
            }
            let code = codes.get(code_ix);
            // The runtime's rule: the larger of the two fields is the real code.
            let code = BuiltinOperator(code.builtin_code().0.max(code.deprecated_builtin_code() as i32));
            let op_inputs: Vec<i32> = op.inputs().map(|v| v.iter().collect()).unwrap_or_default();
            let op_outputs: Vec<i32> = op.outputs().map(|v| v.iter().collect()).unwrap_or_default();
            for &i in &op_inputs {
                // -1 marks an omitted optional input.
                if i != -1 {
                    check(i, &format!("operator {n} ({code:?})"))?;
                }
            }
            if op_outputs.is_empty() {
                return Err(malformed(format!("operator {n} ({code:?}) has no output")));
            }
            for &o in &op_outputs {
                check(o, &format!("operator {n} ({code:?})"))?;
            }
            ops.push(SourceOp { code, inputs: op_inputs, outputs: op_outputs, flat: op });
        }
        Ok(Graph { tensors, ops, inputs, outputs, metadata: None })
    }

    /// How pixels become the model's input: as `given` (by the user), else
    /// for a quantized input its quantization, which defines the bytes the model
    /// takes (a normalization in its metadata describes the float model it
    /// was quantized from, and agrees with it or is beside the point); for a
    /// float input, the metadata's normalization, else the MobileNet
    /// convention, with a warning.
    pub(super) fn input_normalization(&self, given: Option<MeanStd>) -> Result<Normalization> {
        let [input] = self.inputs[..] else {
            return Err(unsupported(format!("{} inputs, an image classifier has one", self.inputs.len())));
        };
        let t = &self.tensors[input as usize];
        if let Some(given) = given {
            return match t.ty {
                TensorType::FLOAT32 | TensorType::UINT8 | TensorType::INT8 => Ok(Normalization::from(given)),
                ty => Err(unsupported(format!("input of type {ty:?}"))),
            };
        }
        let described = self.metadata.as_ref().and_then(|m| m.normalization);
        match (t.ty, &t.quant) {
            (TensorType::FLOAT32, _) => match described {
                Some(given) => {
                    tracing::debug!(?given, "input normalization from the model's metadata");
                    Ok(Normalization::from(given))
                }
                None => {
                    tracing::warn!(
                        "the model's float input comes with no normalization: guessing (pixel - 127.5) / 127.5, \
                         the MobileNet convention; pass --mean and --std if it was trained otherwise \
                         (--mean 0 --std 1 for pixels in [0, 255], --mean 0 --std 255 for [0, 1])"
                    );
                    Ok(Normalization::from(MeanStd::MOBILENET))
                }
            },
            (TensorType::UINT8 | TensorType::INT8, Some(q)) => {
                let (scale, zp) = q.single().ok_or_else(|| unsupported("per-axis quantized input"))?;
                // An int8 input holds the pixel shifted down by 128.
                let shift = if t.ty == TensorType::INT8 { -128.0 } else { 0.0 };
                Ok(Normalization::uniform(scale, (shift - zp as f32) * scale))
            }
            (ty, _) => Err(unsupported(format!("input of type {ty:?}"))),
        }
    }

    /// Whether the graph's output already is a probability per class: it
    /// comes from a SOFTMAX or a LOGISTIC, maybe through ops that only
    /// change its type or shape.
    pub(super) fn output_is_probability(&self) -> bool {
        let [mut tensor] = self.outputs[..] else { return false };
        // Each step goes back one op: at most as many steps as ops.
        for _ in 0..=self.ops.len() {
            let Some(op) = self.ops.iter().find(|op| op.outputs.contains(&tensor)) else { return false };
            match op.code {
                BuiltinOperator::SOFTMAX | BuiltinOperator::LOGISTIC => return true,
                BuiltinOperator::QUANTIZE
                | BuiltinOperator::DEQUANTIZE
                | BuiltinOperator::RESHAPE
                | BuiltinOperator::SQUEEZE => match op.inputs.first() {
                    Some(&input) if input >= 0 => tensor = input,
                    _ => return false,
                },
                _ => return false,
            }
        }
        false
    }
}
