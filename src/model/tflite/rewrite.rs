//! The float32 rewrite of a TFLite graph: each operator of the source graph
//! becomes the float32 operators that compute the same real values, and each
//! tensor a float32 one, its constant values dequantized. The rules live
//! here, apart from reading and writing, because they are where the quirks
//! of both sides are made explicit:
//!
//! - quantized models often store no fused activation: the ReLU / ReLU6 clamp
//!   is implied by the output's quantization range, which cannot go below zero
//!   or above six. In float it has to be written out, or every ReLU vanishes.
//! - QUANTIZE and DEQUANTIZE are identities on real values, so they disappear.
//! - tract's FULLY_CONNECTED wants a rank-2 input, and its SQUEEZE removes
//!   several axes with stale indices: both become explicit RESHAPEs.
//! - the quantized runtime rounds every 8-bit activation to its grid, which
//!   float does not. Asked to keep that rounding, the rewrite marks it after
//!   each operator whose output has one, as a MUL by a constant that says
//!   which grid (see `model::kernels::grid`, which puts the rounding in the
//!   mark's place once tract has loaded the stage).

use std::borrow::Cow;
use std::collections::HashMap;

use tract_tflite::tflite::{self, ActivationFunctionType, BuiltinOperator, TensorType};

use super::super::kernels::grid::{self, Grid};
use super::quant::Quant;
use super::read::{Graph, SourceOp, SourceTensor};
use super::write::{Data, NewTensor, Options, Rebuilt, Stored};
use super::{DequantizeError, Result, malformed, unsupported};

/// The most float32 weights a rebuilt model may hold, with room to spare
/// under the 2 GiB limit of a flatbuffer.
const MAX_FLOAT_BYTES: usize = 1536 << 20;

impl<'a> Graph<'a> {
    /// The float32 rebuild, and the grids it marks: none unless `grids`.
    pub(super) fn rebuild(&self, grids: bool) -> Result<(Rebuilt<'a>, Vec<Grid>)> {
        let mut out = Rebuilt::default();
        let mut marked = vec![];
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
            let grid = grids.then(|| self.grid_after(op)).flatten();
            if let Some((grid, mark)) = grid.zip(grid::mark(marked.len())) {
                let output = map[&op.outputs[0]];
                let rounded = out.mark(output, mark, marked.len());
                map.insert(op.outputs[0], rounded);
                marked.push(grid);
            }
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
        Ok((out, marked))
    }

    /// The rounding the quantized runtime applies to the output of `op`,
    /// unless the op moves values without changing them (a RESHAPE, a
    /// MAX_POOL_2D, a QUANTIZE that only shifts the zero point) to the grid
    /// they are already on.
    fn grid_after(&self, op: &SourceOp) -> Option<Grid> {
        let grid = tensor_grid(&self.tensors[*op.outputs.first()? as usize])?;
        let moves = matches!(
            op.code,
            BuiltinOperator::RESHAPE
                | BuiltinOperator::SQUEEZE
                | BuiltinOperator::MAX_POOL_2D
                | BuiltinOperator::REDUCE_MAX
                | BuiltinOperator::PAD
                | BuiltinOperator::PADV2
                | BuiltinOperator::TRANSPOSE
                | BuiltinOperator::CONCATENATION
                | BuiltinOperator::QUANTIZE
        );
        let inputs = op.inputs.iter().filter(|&&i| i >= 0).map(|&i| &self.tensors[i as usize]);
        let same = |t: &SourceTensor| t.data.is_some() || tensor_grid(t) == Some(grid);
        let on_grid = moves && inputs.clone().all(same) && inputs.clone().any(|t| t.data.is_none());
        (!on_grid).then_some(grid)
    }

    fn rebuild_tensor(&self, t: &SourceTensor<'a>) -> Result<NewTensor<'a>> {
        let elements = element_count(&t.shape)
            .ok_or_else(|| malformed(format!("tensor {} is too large: {:?}", t.name, t.shape)))?;
        let name = t.name.clone();
        let Some(data) = t.data else {
            let ty = match t.ty {
                TensorType::INT32 | TensorType::INT64 | TensorType::BOOL if t.quant.is_none() => t.ty,
                _ => TensorType::FLOAT32,
            };
            return Ok(NewTensor { name, shape: t.shape.clone(), ty, data: None });
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
        let (quant, stored) = match (&t.quant, t.ty) {
            (_, TensorType::FLOAT32) => {
                expect(4)?;
                return Ok(NewTensor {
                    name: name.clone(),
                    shape: t.shape.clone(),
                    ty: t.ty,
                    data: Some(Data::Bytes(Cow::Borrowed(data))),
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
                    name: name.clone(),
                    shape: t.shape.clone(),
                    ty: t.ty,
                    data: Some(Data::Bytes(Cow::Borrowed(data))),
                });
            }
            (Some(q), TensorType::UINT8) => (q, Stored::U8),
            (Some(q), TensorType::INT8) => (q, Stored::I8),
            (Some(q), TensorType::INT16) => (q, Stored::I16),
            (Some(q), TensorType::INT32) => (q, Stored::I32),
            (q, ty) => {
                return Err(unsupported(format!(
                    "constant tensor {} of type {ty:?}{}",
                    t.name,
                    if q.is_some() { " with quantization" } else { "" }
                )));
            }
        };
        expect(stored.bytes())?;
        let inner = quant.inner(&t.name, &t.shape)?;
        Ok(NewTensor {
            name: name.clone(),
            shape: t.shape.clone(),
            ty: TensorType::FLOAT32,
            data: Some(Data::Quantized { values: data, stored, quant: quant.clone(), inner }),
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
            // TRANSPOSE: a model converted from an NCHW framework often
            // takes [1, 3, H, W] and turns it to NHWC first.
            BuiltinOperator::PAD | BuiltinOperator::PADV2 | BuiltinOperator::TRANSPOSE => {
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
                        data: Some(Data::Bytes(zeros.into())),
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

/// The grid of an 8-bit activation quantized per tensor.
fn tensor_grid(t: &SourceTensor<'_>) -> Option<Grid> {
    let (scale, zero_point) = t.quant.as_ref()?.single()?;
    let (qmin, qmax) = match t.ty {
        TensorType::UINT8 => (0, 255),
        TensorType::INT8 => (-128, 127),
        _ => return None,
    };
    Grid::new(scale, zero_point, qmin, qmax)
}

fn element_count(shape: &[i32]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

impl<'a> Rebuilt<'a> {
    /// Marks the rounding of `tensor` to grid `k`: a MUL by `mark`, a
    /// constant of the tensor's rank (no broadcast to wire). Returns the
    /// marked tensor, which later readers read instead.
    fn mark(&mut self, tensor: i32, mark: f32, k: usize) -> i32 {
        let t = &self.tensors[tensor as usize];
        let (name, shape, rank) = (format!("{}/rounded", t.name), t.shape.clone(), t.shape.len());
        let one = self.push(NewTensor {
            name: format!("grid{k}"),
            shape: vec![1; rank],
            ty: TensorType::FLOAT32,
            data: Some(Data::Bytes(mark.to_le_bytes().to_vec().into())),
        });
        let rounded = self.push(NewTensor::activation(name, shape));
        let fused = ActivationFunctionType::NONE;
        self.op(BuiltinOperator::MUL, vec![tensor, one], vec![rounded], Options::Mul { fused });
        rounded
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
            data: Some(Data::Bytes(data.into())),
        });
        self.op(BuiltinOperator::RESHAPE, vec![from, shape_tensor], vec![to], Options::Reshape { shape });
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Normalization, dequantize, mock_model};
    use super::*;

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
        let bytes = mock_model();
        let float = dequantize(&bytes, 1, None, false).unwrap();
        assert_eq!(float.normalization, Normalization::uniform(1.0 / 255.0, 0.0));
        assert!(float.probabilities, "the mock model ends in SOFTMAX");
        let stage = float.stage(0);
        let model = tflite::root_as_model(stage.bytes()).unwrap();
        let graph = model.subgraphs().unwrap().get(0);
        for t in graph.tensors().unwrap() {
            assert!(t.quantization().is_none(), "{:?} keeps its quantization", t.name());
            assert!(matches!(t.type_(), TensorType::FLOAT32 | TensorType::INT32), "{:?}", t.name());
        }
        let ops = rebuilt_ops(stage.bytes());
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
}
