//! Rebuilds a quantized TensorFlow Lite model as an all-float32 one that tract
//! can run.
//!
//! tract-tflite 0.23 cannot translate fully uint8-quantized graphs whose ADDs
//! mix quantization parameters, and has no QUANTIZE/DEQUANTIZE ops. It does run
//! float32 graphs of the same operators correctly, so this module rewrites the
//! flatbuffer: every constant is dequantized to its real values, every
//! activation becomes float32 with no quantization parameters, and the quirks
//! of both sides are made explicit:
//!
//! - quantized models often store no fused activation: the ReLU / ReLU6 clamp
//!   is implied by the output's quantization range, which cannot go below zero
//!   or above six. In float it has to be written out, or every ReLU vanishes.
//! - QUANTIZE and DEQUANTIZE are identities on real values, so they disappear.
//! - tract's FULLY_CONNECTED wants a rank-2 input, and its SQUEEZE removes
//!   several axes with stale indices: both become explicit RESHAPEs.
//!
//! The input bytes are untrusted: the flatbuffer is verified first, and every
//! index, shape and buffer length is checked before use.

use std::borrow::Cow;
use std::collections::HashMap;

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use tract_tflite::tflite::{self, ActivationFunctionType, BuiltinOperator, BuiltinOptions, TensorType};

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

/// The most float32 weights a rebuilt model may hold, with room to spare
/// under the 2 GiB limit of a flatbuffer.
const MAX_FLOAT_BYTES: usize = 1536 << 20;

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

/// A float32 rebuild of a model, ready for tract.
#[derive(Debug)]
pub struct FloatModel {
    /// The flatbuffer, written back to front: it starts at `head`.
    buffer: Vec<u8>,
    head: usize,
    /// The pixel normalisation equivalent to the original input's quantization.
    pub normalization: Normalization,
}

impl FloatModel {
    /// The TFLite flatbuffer.
    pub fn tflite(&self) -> &[u8] {
        &self.buffer[self.head..]
    }
}

/// Rebuilds `bytes`, a TFLite model of any quantization, as a float32 model.
pub fn dequantize(bytes: &[u8]) -> Result<FloatModel> {
    if bytes.len() < 8 || !tflite::model_buffer_has_identifier(bytes) {
        return Err(DequantizeError::NotTflite);
    }
    let model = tflite::root_as_model(bytes).map_err(|e| malformed(e.to_string()))?;
    let graph = Graph::read(&model)?;
    let normalization = graph.input_normalization()?;
    let (buffer, head) = graph.rebuild()?.serialize();
    Ok(FloatModel { buffer, head, normalization })
}

/// Quantization of one tensor, per tensor or per axis.
#[derive(Debug, Clone)]
struct Quant {
    scale: Vec<f32>,
    zero_point: Vec<i64>,
    axis: usize,
}

impl Quant {
    fn single(&self) -> Option<(f32, i64)> {
        (self.scale.len() == 1).then(|| (self.scale[0], self.zero_point.first().copied().unwrap_or(0)))
    }
}

/// A tensor of the original model, read and checked.
#[derive(Debug, Clone)]
struct SourceTensor<'a> {
    name: String,
    shape: Vec<i32>,
    ty: TensorType,
    quant: Option<Quant>,
    data: Option<&'a [u8]>,
}

/// An operator of the original model, with the options this rebuild needs.
struct SourceOp<'a> {
    code: BuiltinOperator,
    inputs: Vec<i32>,
    outputs: Vec<i32>,
    flat: tflite::Operator<'a>,
}

struct Graph<'a> {
    tensors: Vec<SourceTensor<'a>>,
    ops: Vec<SourceOp<'a>>,
    inputs: Vec<i32>,
    outputs: Vec<i32>,
}

impl<'a> Graph<'a> {
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
        Ok(Graph { tensors, ops, inputs, outputs })
    }

    fn input_normalization(&self) -> Result<Normalization> {
        let [input] = self.inputs[..] else {
            return Err(unsupported(format!("{} inputs, an image classifier has one", self.inputs.len())));
        };
        let t = &self.tensors[input as usize];
        match (t.ty, &t.quant) {
            (TensorType::FLOAT32, _) => Ok(Normalization::MINUS_ONE_TO_ONE),
            (TensorType::UINT8 | TensorType::INT8, Some(q)) => {
                let (scale, zp) = q.single().ok_or_else(|| unsupported("per-axis quantized input"))?;
                // An int8 input holds the pixel shifted down by 128.
                let shift = if t.ty == TensorType::INT8 { -128.0 } else { 0.0 };
                Ok(Normalization { scale, offset: (shift - zp as f32) * scale })
            }
            (ty, _) => Err(unsupported(format!("input of type {ty:?}"))),
        }
    }

    fn rebuild(&self) -> Result<Rebuilt<'a>> {
        let mut out = Rebuilt::default();
        // Original tensor index -> rebuilt tensor index.
        let mut map: HashMap<i32, i32> = HashMap::new();
        for (ix, t) in self.tensors.iter().enumerate() {
            map.insert(ix as i32, out.push(self.rebuild_tensor(t)?));
        }
        for (n, op) in self.ops.iter().enumerate() {
            self.rebuild_op(&mut out, &mut map, op).map_err(|e| match e {
                DequantizeError::Unsupported(m) => unsupported(format!("operator {n} ({:?}): {m}", op.code)),
                DequantizeError::Malformed(m) => malformed(format!("operator {n} ({:?}): {m}", op.code)),
                e => e,
            })?;
        }
        // Flatbuffers stop at 2 GiB; uint8 weights grow fourfold as float32.
        let size: usize = out.tensors.iter().filter_map(|t| t.data.as_ref()).map(|d| d.len()).sum();
        if size > MAX_FLOAT_BYTES {
            return Err(unsupported(format!(
                "{} MiB of weights as float32, over {} MiB",
                size >> 20,
                MAX_FLOAT_BYTES >> 20
            )));
        }
        out.inputs = self.inputs.iter().map(|i| map[i]).collect();
        out.outputs = self.outputs.iter().map(|o| map[o]).collect();
        Ok(out)
    }

    fn rebuild_tensor(&self, t: &SourceTensor<'a>) -> Result<NewTensor<'a>> {
        let elements = element_count(&t.shape)
            .ok_or_else(|| malformed(format!("tensor {} is too large: {:?}", t.name, t.shape)))?;
        let Some(data) = t.data else {
            let ty = match t.ty {
                TensorType::INT32 | TensorType::INT64 | TensorType::BOOL if t.quant.is_none() => t.ty,
                _ => TensorType::FLOAT32,
            };
            return Ok(NewTensor { name: t.name.clone(), shape: t.shape.clone(), ty, data: None });
        };
        let expect = |size: usize| -> Result<()> {
            if Some(data.len()) != elements.checked_mul(size) {
                Err(malformed(format!(
                    "tensor {} holds {} bytes, which does not fit its shape {:?}",
                    t.name,
                    data.len(),
                    t.shape,
                )))
            } else {
                Ok(())
            }
        };
        let floats: Vec<u8> = match (&t.quant, t.ty) {
            (_, TensorType::FLOAT32) => {
                expect(4)?;
                return Ok(NewTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    ty: t.ty,
                    data: Some(Cow::Borrowed(data)),
                });
            }
            (None, TensorType::INT32 | TensorType::INT64 | TensorType::BOOL) => {
                expect(if t.ty == TensorType::INT64 {
                    8
                } else if t.ty == TensorType::BOOL {
                    1
                } else {
                    4
                })?;
                return Ok(NewTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    ty: t.ty,
                    data: Some(Cow::Borrowed(data)),
                });
            }
            (Some(q), TensorType::UINT8) => {
                expect(1)?;
                dequantize_values(&t.name, &t.shape, q, data.iter().map(|&v| v as i64))?
            }
            (Some(q), TensorType::INT8) => {
                expect(1)?;
                dequantize_values(&t.name, &t.shape, q, data.iter().map(|&v| v as i8 as i64))?
            }
            (Some(q), TensorType::INT16) => {
                expect(2)?;
                let values = data.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64);
                dequantize_values(&t.name, &t.shape, q, values)?
            }
            (Some(q), TensorType::INT32) => {
                expect(4)?;
                let values = data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64);
                dequantize_values(&t.name, &t.shape, q, values)?
            }
            (q, ty) => {
                return Err(unsupported(format!(
                    "constant tensor {} of type {ty:?}{}",
                    t.name,
                    if q.is_some() { " with quantization" } else { "" }
                )));
            }
        };
        Ok(NewTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: TensorType::FLOAT32,
            data: Some(floats.into()),
        })
    }

    fn rebuild_op(&self, out: &mut Rebuilt<'a>, map: &mut HashMap<i32, i32>, op: &SourceOp) -> Result<()> {
        let input = |k: usize| -> Result<i32> {
            let ix = *op.inputs.get(k).ok_or_else(|| malformed(format!("missing input {k}")))?;
            if ix < 0 {
                return Err(unsupported(format!("omitted input {k}")));
            }
            Ok(map[&ix])
        };
        let all_inputs = |k: usize| -> Result<Vec<i32>> { (0..k).map(input).collect() };
        let output = map[&op.outputs[0]];
        let out_tensor = &self.tensors[op.outputs[0] as usize];
        let activation = |fused: ActivationFunctionType| implied_activation(fused, out_tensor);
        let missing = || malformed("options missing");
        let f = &op.flat;
        match op.code {
            BuiltinOperator::QUANTIZE | BuiltinOperator::DEQUANTIZE => {
                // Identities on real values: later readers of the output read the input.
                let source = input(0)?;
                map.insert(op.outputs[0], source);
            }
            BuiltinOperator::CONV_2D => {
                let o = f.builtin_options_as_conv_2_doptions().ok_or_else(missing)?;
                let options = Options::Conv2D {
                    padding: o.padding(),
                    stride: (o.stride_w(), o.stride_h()),
                    dilation: (o.dilation_w_factor(), o.dilation_h_factor()),
                    fused: activation(o.fused_activation_function()),
                };
                let inputs = self.inputs_with_bias(out, op, map, 3)?;
                out.op(op.code, inputs, vec![output], options);
            }
            BuiltinOperator::DEPTHWISE_CONV_2D => {
                let o = f.builtin_options_as_depthwise_conv_2_doptions().ok_or_else(missing)?;
                let options = Options::Depthwise {
                    padding: o.padding(),
                    stride: (o.stride_w(), o.stride_h()),
                    dilation: (o.dilation_w_factor(), o.dilation_h_factor()),
                    depth_multiplier: o.depth_multiplier(),
                    fused: activation(o.fused_activation_function()),
                };
                let inputs = self.inputs_with_bias(out, op, map, 3)?;
                out.op(op.code, inputs, vec![output], options);
            }
            BuiltinOperator::FULLY_CONNECTED => {
                let o = f.builtin_options_as_fully_connected_options().ok_or_else(missing)?;
                if o.weights_format() != tflite::FullyConnectedOptionsWeightsFormat::DEFAULT {
                    return Err(unsupported("shuffled weights"));
                }
                let mut inputs = self.inputs_with_bias(out, op, map, 3)?;
                let weights = &out.tensors[inputs[1] as usize];
                let [_, depth] = weights.shape[..] else {
                    return Err(malformed(format!("weights of shape {:?}", weights.shape)));
                };
                let data = &out.tensors[inputs[0] as usize];
                if data.shape.len() != 2 {
                    let rows = element_count(&data.shape).unwrap_or(0) / depth.max(1) as usize;
                    let rows = i32::try_from(rows).map_err(|_| malformed("input too large"))?;
                    let name = format!("{}/flatten", data.name);
                    let flat = out.push(NewTensor::activation(name, vec![rows, depth]));
                    out.reshape(inputs[0], flat, vec![-1, depth]);
                    inputs[0] = flat;
                }
                out.op(
                    op.code,
                    inputs,
                    vec![output],
                    Options::FullyConnected { fused: activation(o.fused_activation_function()) },
                );
            }
            BuiltinOperator::AVERAGE_POOL_2D | BuiltinOperator::MAX_POOL_2D => {
                let o = f.builtin_options_as_pool_2_doptions().ok_or_else(missing)?;
                let options = Options::Pool2D {
                    padding: o.padding(),
                    stride: (o.stride_w(), o.stride_h()),
                    filter: (o.filter_width(), o.filter_height()),
                    fused: o.fused_activation_function(),
                };
                out.op(op.code, vec![input(0)?], vec![output], options);
            }
            BuiltinOperator::ADD => {
                let o = f.builtin_options_as_add_options().ok_or_else(missing)?;
                out.op(
                    op.code,
                    all_inputs(2)?,
                    vec![output],
                    Options::Add { fused: activation(o.fused_activation_function()) },
                );
            }
            BuiltinOperator::SUB => {
                let o = f.builtin_options_as_sub_options().ok_or_else(missing)?;
                out.op(
                    op.code,
                    all_inputs(2)?,
                    vec![output],
                    Options::Sub { fused: activation(o.fused_activation_function()) },
                );
            }
            BuiltinOperator::MUL => {
                let o = f.builtin_options_as_mul_options().ok_or_else(missing)?;
                out.op(
                    op.code,
                    all_inputs(2)?,
                    vec![output],
                    Options::Mul { fused: activation(o.fused_activation_function()) },
                );
            }
            BuiltinOperator::CONCATENATION => {
                let o = f.builtin_options_as_concatenation_options().ok_or_else(missing)?;
                let inputs = (0..op.inputs.len()).map(input).collect::<Result<_>>()?;
                out.op(
                    op.code,
                    inputs,
                    vec![output],
                    Options::Concatenation { axis: o.axis(), fused: activation(o.fused_activation_function()) },
                );
            }
            BuiltinOperator::SOFTMAX => {
                let beta = f.builtin_options_as_softmax_options().map(|o| o.beta()).unwrap_or(1.0);
                out.op(op.code, vec![input(0)?], vec![output], Options::Softmax { beta });
            }
            BuiltinOperator::RESHAPE | BuiltinOperator::SQUEEZE => {
                // The output's own shape says where the axes go; the plan is
                // built for one image, so no axis needs to stay free.
                out.reshape(input(0)?, output, out_tensor.shape.clone());
            }
            BuiltinOperator::MEAN | BuiltinOperator::SUM | BuiltinOperator::REDUCE_MAX => {
                let keep_dims = f.builtin_options_as_reducer_options().map(|o| o.keep_dims()).unwrap_or(false);
                out.op(op.code, all_inputs(2)?, vec![output], Options::Reducer { keep_dims });
            }
            BuiltinOperator::PAD | BuiltinOperator::PADV2 => {
                let inputs = (0..op.inputs.len()).map(input).collect::<Result<_>>()?;
                out.op(op.code, inputs, vec![output], Options::None);
            }
            BuiltinOperator::RELU
            | BuiltinOperator::RELU6
            | BuiltinOperator::LOGISTIC
            | BuiltinOperator::TANH
            | BuiltinOperator::HARD_SWISH => {
                out.op(op.code, vec![input(0)?], vec![output], Options::None);
            }
            code => {
                let name = code.variant_name().map(str::to_string).unwrap_or_else(|| format!("#{}", code.0));
                return Err(unsupported(format!("operator {name} is not supported")));
            }
        }
        Ok(())
    }

    /// The inputs of a linear operator, with a zero bias made up where the
    /// model omits it (tract wants one).
    fn inputs_with_bias(
        &self,
        out: &mut Rebuilt<'a>,
        op: &SourceOp,
        map: &HashMap<i32, i32>,
        n: usize,
    ) -> Result<Vec<i32>> {
        let mut inputs = vec![];
        for k in 0..n {
            match op.inputs.get(k).copied() {
                Some(ix) if ix >= 0 => inputs.push(map[&ix]),
                _ if k == 2 => {
                    let weights = &self.tensors[op.inputs[1] as usize];
                    // Constant weights bound the bias size by their own.
                    if weights.data.is_none() {
                        return Err(unsupported("weights that are not constant"));
                    }
                    let channels = match op.code {
                        BuiltinOperator::DEPTHWISE_CONV_2D => weights.shape.last(),
                        _ => weights.shape.first(),
                    };
                    let channels = *channels.ok_or_else(|| malformed("weights without shape"))?;
                    let zeros = vec![0u8; channels as usize * 4];
                    inputs.push(out.push(NewTensor {
                        name: format!("{}/zero_bias", weights.name),
                        shape: vec![channels],
                        ty: TensorType::FLOAT32,
                        data: Some(zeros.into()),
                    }));
                }
                _ => return Err(malformed(format!("missing input {k}"))),
            }
        }
        Ok(inputs)
    }
}

/// The activation to fuse into an operator: its own, or else the one its
/// output's quantization range implies. A uint8 output whose zero point is 0
/// cannot hold a negative value, so the quantized runtime clamps it at zero;
/// if its top is six, it clamps there too.
fn implied_activation(fused: ActivationFunctionType, output: &SourceTensor<'_>) -> ActivationFunctionType {
    if fused != ActivationFunctionType::NONE {
        return fused;
    }
    let Some((scale, zp)) = output.quant.as_ref().and_then(Quant::single) else {
        return fused;
    };
    let (qmin, qmax) = match output.ty {
        TensorType::UINT8 => (0, 255),
        TensorType::INT8 => (-128, 127),
        _ => return fused,
    };
    if zp != qmin {
        return fused;
    }
    let top = (qmax - zp) as f32 * scale;
    if (top - 6.0).abs() <= scale { ActivationFunctionType::RELU6 } else { ActivationFunctionType::RELU }
}

fn element_count(shape: &[i32]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

/// `values` dequantized, as little-endian float32 bytes.
fn dequantize_values(
    name: &str,
    shape: &[i32],
    q: &Quant,
    values: impl ExactSizeIterator<Item = i64>,
) -> Result<Vec<u8>> {
    let channels = q.scale.len();
    let mut out = vec![0u8; values.len() * 4];
    let dequantize = |v: i64, zero_point: i64, scale: f32| (v as f64 - zero_point as f64) as f32 * scale;
    if channels == 1 {
        let (scale, zero_point) = (q.scale[0], q.zero_point.first().copied().unwrap_or(0));
        for (bytes, v) in out.chunks_exact_mut(4).zip(values) {
            bytes.copy_from_slice(&dequantize(v, zero_point, scale).to_le_bytes());
        }
        return Ok(out);
    }
    if q.axis >= shape.len() || shape[q.axis] as usize != channels {
        return Err(malformed(format!("tensor {name} has {channels} scales for axis {} of shape {shape:?}", q.axis)));
    }
    if q.zero_point.len() > 1 && q.zero_point.len() != channels {
        return Err(malformed(format!("tensor {name} has {channels} scales but {} zero points", q.zero_point.len())));
    }
    let inner: usize = shape[q.axis + 1..].iter().map(|&d| d as usize).product();
    let zero_point = |c: usize| q.zero_point.get(c).or(q.zero_point.first()).copied().unwrap_or(0);
    let mut values = values;
    // Values run through the channels in blocks of `inner`.
    for (block, bytes) in out.chunks_mut(inner.max(1) * 4).enumerate() {
        let c = block % channels;
        let (scale, zero_point) = (q.scale[c], zero_point(c));
        for (bytes, v) in bytes.chunks_exact_mut(4).zip(&mut values) {
            bytes.copy_from_slice(&dequantize(v, zero_point, scale).to_le_bytes());
        }
    }
    Ok(out)
}

/// A tensor of the rebuilt model.
#[derive(Debug, Clone)]
struct NewTensor<'a> {
    name: String,
    shape: Vec<i32>,
    ty: TensorType,
    /// Little-endian values, borrowed from the original when they pass as is.
    data: Option<Cow<'a, [u8]>>,
}

impl NewTensor<'_> {
    fn activation(name: String, shape: Vec<i32>) -> Self {
        NewTensor { name, shape, ty: TensorType::FLOAT32, data: None }
    }
}

#[derive(Debug, Clone)]
enum Options {
    None,
    Conv2D {
        padding: tflite::Padding,
        stride: (i32, i32),
        dilation: (i32, i32),
        fused: ActivationFunctionType,
    },
    Depthwise {
        padding: tflite::Padding,
        stride: (i32, i32),
        dilation: (i32, i32),
        depth_multiplier: i32,
        fused: ActivationFunctionType,
    },
    Pool2D {
        padding: tflite::Padding,
        stride: (i32, i32),
        filter: (i32, i32),
        fused: ActivationFunctionType,
    },
    FullyConnected {
        fused: ActivationFunctionType,
    },
    Add {
        fused: ActivationFunctionType,
    },
    Sub {
        fused: ActivationFunctionType,
    },
    Mul {
        fused: ActivationFunctionType,
    },
    Concatenation {
        axis: i32,
        fused: ActivationFunctionType,
    },
    Softmax {
        beta: f32,
    },
    Reshape {
        shape: Vec<i32>,
    },
    Reducer {
        keep_dims: bool,
    },
}

struct NewOp {
    code: BuiltinOperator,
    inputs: Vec<i32>,
    outputs: Vec<i32>,
    options: Options,
}

#[derive(Default)]
struct Rebuilt<'a> {
    tensors: Vec<NewTensor<'a>>,
    ops: Vec<NewOp>,
    inputs: Vec<i32>,
    outputs: Vec<i32>,
}

impl<'a> Rebuilt<'a> {
    fn push(&mut self, t: NewTensor<'a>) -> i32 {
        self.tensors.push(t);
        self.tensors.len() as i32 - 1
    }

    fn op(&mut self, code: BuiltinOperator, inputs: Vec<i32>, outputs: Vec<i32>, options: Options) {
        self.ops.push(NewOp { code, inputs, outputs, options });
    }

    /// A RESHAPE from `from` to `to`, with its shape given both as the
    /// options and as a constant second input, as converters write it.
    fn reshape(&mut self, from: i32, to: i32, shape: Vec<i32>) {
        let name = format!("{}/shape", self.tensors[to as usize].name);
        let data: Vec<u8> = shape.iter().flat_map(|d| d.to_le_bytes()).collect();
        let shape_tensor = self.push(NewTensor {
            name,
            shape: vec![shape.len() as i32],
            ty: TensorType::INT32,
            data: Some(data.into()),
        });
        self.op(BuiltinOperator::RESHAPE, vec![from, shape_tensor], vec![to], Options::Reshape { shape });
    }

    /// The model as a flatbuffer, and where in the buffer it starts.
    fn serialize(&self) -> (Vec<u8>, usize) {
        // Sized for the weights up front: growing copies the whole buffer.
        let weights: usize = self.tensors.iter().filter_map(|t| t.data.as_ref()).map(|d| d.len() + 16).sum();
        let mut fb = FlatBufferBuilder::with_capacity(weights + (1 << 20));
        let mut codes: Vec<BuiltinOperator> = vec![];
        let mut code_index = |code: BuiltinOperator| -> u32 {
            match codes.iter().position(|c| *c == code) {
                Some(i) => i as u32,
                None => {
                    codes.push(code);
                    codes.len() as u32 - 1
                }
            }
        };

        let empty = tflite::Buffer::create(&mut fb, &tflite::BufferArgs { data: None });
        let mut buffers = vec![empty];
        let mut tensors = vec![];
        for t in &self.tensors {
            let buffer = match &t.data {
                Some(data) => {
                    let data = fb.create_vector(data);
                    buffers.push(tflite::Buffer::create(&mut fb, &tflite::BufferArgs { data: Some(data) }));
                    buffers.len() as u32 - 1
                }
                None => 0,
            };
            let shape = fb.create_vector(&t.shape);
            let name = fb.create_string(&t.name);
            tensors.push(tflite::Tensor::create(
                &mut fb,
                &tflite::TensorArgs { shape: Some(shape), type_: t.ty, buffer, name: Some(name), ..Default::default() },
            ));
        }

        let mut ops = vec![];
        for op in &self.ops {
            let (options_type, options) = write_options(&mut fb, &op.options);
            let inputs = fb.create_vector(&op.inputs);
            let outputs = fb.create_vector(&op.outputs);
            ops.push(tflite::Operator::create(
                &mut fb,
                &tflite::OperatorArgs {
                    opcode_index: code_index(op.code),
                    inputs: Some(inputs),
                    outputs: Some(outputs),
                    builtin_options_type: options_type,
                    builtin_options: options,
                    ..Default::default()
                },
            ));
        }

        let tensors = fb.create_vector(&tensors);
        let inputs = fb.create_vector(&self.inputs);
        let outputs = fb.create_vector(&self.outputs);
        let ops = fb.create_vector(&ops);
        let name = fb.create_string("main");
        let subgraph = tflite::SubGraph::create(
            &mut fb,
            &tflite::SubGraphArgs {
                tensors: Some(tensors),
                inputs: Some(inputs),
                outputs: Some(outputs),
                operators: Some(ops),
                name: Some(name),
            },
        );
        let codes: Vec<_> = codes
            .iter()
            .map(|&code| {
                tflite::OperatorCode::create(
                    &mut fb,
                    &tflite::OperatorCodeArgs {
                        // Codes past 127 live only in the wide field.
                        deprecated_builtin_code: code.0.min(127) as i8,
                        builtin_code: code,
                        version: 1,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let codes = fb.create_vector(&codes);
        let subgraphs = fb.create_vector(&[subgraph]);
        let buffers = fb.create_vector(&buffers);
        let description = fb.create_string("float32 rebuild by classifier");
        let model = tflite::Model::create(
            &mut fb,
            &tflite::ModelArgs {
                version: 3,
                operator_codes: Some(codes),
                subgraphs: Some(subgraphs),
                description: Some(description),
                buffers: Some(buffers),
                ..Default::default()
            },
        );
        tflite::finish_model_buffer(&mut fb, model);
        fb.collapse()
    }
}

fn write_options<'fb>(
    fb: &mut FlatBufferBuilder<'fb>,
    options: &Options,
) -> (BuiltinOptions, Option<WIPOffset<flatbuffers::UnionWIPOffset>>) {
    use tflite::*;
    match options {
        Options::None => (BuiltinOptions::NONE, None),
        Options::Conv2D { padding, stride, dilation, fused } => {
            let args = Conv2DOptionsArgs {
                padding: *padding,
                stride_w: stride.0,
                stride_h: stride.1,
                dilation_w_factor: dilation.0,
                dilation_h_factor: dilation.1,
                fused_activation_function: *fused,
            };
            (BuiltinOptions::Conv2DOptions, Some(Conv2DOptions::create(fb, &args).as_union_value()))
        }
        Options::Depthwise { padding, stride, dilation, depth_multiplier, fused } => {
            let args = DepthwiseConv2DOptionsArgs {
                padding: *padding,
                stride_w: stride.0,
                stride_h: stride.1,
                depth_multiplier: *depth_multiplier,
                dilation_w_factor: dilation.0,
                dilation_h_factor: dilation.1,
                fused_activation_function: *fused,
            };
            (BuiltinOptions::DepthwiseConv2DOptions, Some(DepthwiseConv2DOptions::create(fb, &args).as_union_value()))
        }
        Options::Pool2D { padding, stride, filter, fused } => {
            let args = Pool2DOptionsArgs {
                padding: *padding,
                stride_w: stride.0,
                stride_h: stride.1,
                filter_width: filter.0,
                filter_height: filter.1,
                fused_activation_function: *fused,
            };
            (BuiltinOptions::Pool2DOptions, Some(Pool2DOptions::create(fb, &args).as_union_value()))
        }
        Options::FullyConnected { fused } => {
            let args = FullyConnectedOptionsArgs { fused_activation_function: *fused, ..Default::default() };
            (BuiltinOptions::FullyConnectedOptions, Some(FullyConnectedOptions::create(fb, &args).as_union_value()))
        }
        Options::Add { fused } => {
            let args = AddOptionsArgs { fused_activation_function: *fused, pot_scale_int16: false };
            (BuiltinOptions::AddOptions, Some(AddOptions::create(fb, &args).as_union_value()))
        }
        Options::Sub { fused } => {
            let args = SubOptionsArgs { fused_activation_function: *fused, pot_scale_int16: false };
            (BuiltinOptions::SubOptions, Some(SubOptions::create(fb, &args).as_union_value()))
        }
        Options::Mul { fused } => {
            let args = MulOptionsArgs { fused_activation_function: *fused };
            (BuiltinOptions::MulOptions, Some(MulOptions::create(fb, &args).as_union_value()))
        }
        Options::Concatenation { axis, fused } => {
            let args = ConcatenationOptionsArgs { axis: *axis, fused_activation_function: *fused };
            (BuiltinOptions::ConcatenationOptions, Some(ConcatenationOptions::create(fb, &args).as_union_value()))
        }
        Options::Softmax { beta } => {
            let args = SoftmaxOptionsArgs { beta: *beta };
            (BuiltinOptions::SoftmaxOptions, Some(SoftmaxOptions::create(fb, &args).as_union_value()))
        }
        Options::Reshape { shape } => {
            let new_shape = fb.create_vector(shape);
            let args = ReshapeOptionsArgs { new_shape: Some(new_shape) };
            (BuiltinOptions::ReshapeOptions, Some(ReshapeOptions::create(fb, &args).as_union_value()))
        }
        Options::Reducer { keep_dims } => {
            let args = ReducerOptionsArgs { keep_dims: *keep_dims };
            (BuiltinOptions::ReducerOptions, Some(ReducerOptions::create(fb, &args).as_union_value()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mock_model.tflite")).unwrap()
    }

    fn rebuilt_ops(bytes: &[u8]) -> Vec<(BuiltinOperator, ActivationFunctionType)> {
        let model = tflite::root_as_model(bytes).unwrap();
        let codes = model.operator_codes().unwrap();
        let graph = model.subgraphs().unwrap().get(0);
        graph
            .operators()
            .unwrap()
            .iter()
            .map(|op| {
                let code = codes.get(op.opcode_index() as usize).builtin_code();
                let fused = op
                    .builtin_options_as_conv_2_doptions()
                    .map(|o| o.fused_activation_function())
                    .or(op.builtin_options_as_add_options().map(|o| o.fused_activation_function()))
                    .unwrap_or(ActivationFunctionType::NONE);
                (code, fused)
            })
            .collect()
    }

    #[test]
    fn rebuild_is_float_with_explicit_activations() {
        let float = dequantize(&mock()).unwrap();
        assert_eq!(float.normalization, Normalization { scale: 1.0 / 255.0, offset: 0.0 });
        let model = tflite::root_as_model(float.tflite()).unwrap();
        let graph = model.subgraphs().unwrap().get(0);
        for t in graph.tensors().unwrap() {
            assert!(t.quantization().is_none(), "{:?} keeps its quantization", t.name());
            assert!(matches!(t.type_(), TensorType::FLOAT32 | TensorType::INT32), "{:?}", t.name());
        }
        let ops = rebuilt_ops(float.tflite());
        use ActivationFunctionType as A;
        use BuiltinOperator as B;
        assert_eq!(
            ops,
            [
                (B::CONV_2D, A::RELU6), // range [0, 6]
                (B::CONV_2D, A::RELU),  // range [0, 0.5]
                (B::ADD, A::RELU),
                (B::AVERAGE_POOL_2D, A::NONE),
                (B::RESHAPE, A::NONE), // rank 4 to rank 2 for FULLY_CONNECTED
                (B::FULLY_CONNECTED, A::NONE),
                (B::SOFTMAX, A::NONE),
            ]
        );
    }

    #[test]
    fn per_axis_scales_are_honoured() {
        let q = Quant { scale: vec![0.5, 2.0], zero_point: vec![0, 1], axis: 0 };
        let values = dequantize_values("w", &[2, 3], &q, [2, 4, 6, 1, 2, 3].into_iter()).unwrap();
        let floats: Vec<f32> = values.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(floats, [1.0, 2.0, 3.0, 0.0, 2.0, 4.0]);
        let bad = dequantize_values("w", &[3, 2], &q, [0; 6].into_iter());
        assert!(matches!(bad, Err(DequantizeError::Malformed(_))));
    }

    #[test]
    fn garbage_gives_errors_not_panics() {
        assert!(matches!(dequantize(b""), Err(DequantizeError::NotTflite)));
        assert!(matches!(dequantize(b"<html><body>nope</body></html>"), Err(DequantizeError::NotTflite)));
        let model = mock();
        for len in 0..model.len() {
            assert!(dequantize(&model[..len]).is_err(), "a model cut at {len} bytes was accepted");
        }
        // Every single-byte corruption either fails cleanly or still rebuilds.
        for at in 0..model.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut corrupt = model.clone();
                corrupt[at] ^= flip;
                let _ = dequantize(&corrupt);
            }
        }
    }
}
