//! Plans a fully quantized TFLite graph as an integer network
//! (`model::integer`): each operator becomes a step over byte activations,
//! with the requantization its tensors' scales and zero points give.
//!
//! What it takes: CONV_2D, DEPTHWISE_CONV_2D (depth multiplier 1),
//! FULLY_CONNECTED, ADD of equal shapes, AVERAGE_POOL_2D, MEAN over height
//! and width, SOFTMAX, RESHAPE, SQUEEZE and QUANTIZE, on uint8 or int8
//! activations quantized per tensor, with uint8 weights or int8 weights per
//! tensor or per channel, no dilation. Anything else it refuses, and the
//! model goes to the float rebuild instead, with the same rounding
//! emulated: the reason is logged at debug level.

use tract_tflite::tflite::{ActivationFunctionType, BuiltinOperator, Padding, TensorType};

use super::super::integer::{Activation, Addition, Averaging, Bounds, Im2col, Network, Step};
use super::super::kernels::integer::{Depthwise, Gemm, Geometry, Requantize, has_vector_kernels};
use super::read::{Graph, SourceOp, SourceTensor};
use super::{Normalization, Result, malformed, unsupported};

/// The most bytes of activations (and im2col copies) one session may hold.
const MAX_ACTIVATION_BYTES: usize = 512 << 20;

impl Graph<'_> {
    /// The graph as an integer network reading pixels as `normalization`
    /// says, or why it cannot be one.
    pub(super) fn integer(&self, normalization: Normalization) -> Result<Network> {
        if !has_vector_kernels() {
            return Err(unsupported("this CPU has no 8-bit dot-product instructions the integer steps use"));
        }
        let mut plan = Planner { graph: self, slots: vec![None; self.tensors.len()], sizes: vec![], scratch: 0 };
        let [input] = self.inputs[..] else { return Err(unsupported("more than one input")) };
        let [output] = self.outputs[..] else { return Err(unsupported("more than one output")) };
        let image = plan.activation(input)?;
        let steps = self
            .ops
            .iter()
            .enumerate()
            .map(|(n, op)| {
                plan.step(op).map_err(|e| match e {
                    super::DequantizeError::Unsupported(m) => unsupported(format!("operator {n} ({:?}): {m}", op.code)),
                    e => e,
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let out = plan.activation(output)?;
        let shape = &self.tensors[input as usize].shape;
        let [1, height, width, 3] = shape[..] else {
            return Err(unsupported(format!("input of shape {shape:?}")));
        };
        let pixels = height as usize * width as usize;
        if plan.sizes[image.slot] != pixels * 3 {
            return Err(malformed("the input's size does not match its shape"));
        }
        // Each slot is at most the limit, so the sum cannot wrap.
        let total: usize = plan.sizes.iter().fold(plan.scratch, |total, &size| total.saturating_add(size));
        if total > MAX_ACTIVATION_BYTES {
            return Err(unsupported(format!("{} MiB of activations", total >> 20)));
        }
        let output_shape = self.tensors[output as usize].shape.iter().map(|&d| d as usize).collect();
        let size = (height as usize, width as usize);
        let pixel_bytes = pixel_bytes(normalization, image);
        Ok(Network::new(steps, plan.sizes, image.slot, pixel_bytes, size, out, output_shape, plan.scratch))
    }
}

/// For each channel, the byte each 8-bit pixel value becomes on the input's
/// grid.
fn pixel_bytes(n: Normalization, input: Activation) -> Box<[[u8; 256]; 3]> {
    let mut table = Box::new([[0u8; 256]; 3]);
    for (c, row) in table.iter_mut().enumerate() {
        for (p, byte) in row.iter_mut().enumerate() {
            let real = p as f32 * n.scale[c] + n.offset[c];
            let q = (real / input.scale).round_ties_even() + input.zero as f32;
            *byte = q.clamp(0.0, 255.0) as u8;
        }
    }
    table
}

struct Planner<'g, 'a> {
    graph: &'g Graph<'a>,
    /// The slot of each tensor that has one.
    slots: Vec<Option<usize>>,
    sizes: Vec<usize>,
    scratch: usize,
}

impl Planner<'_, '_> {
    fn tensor(&self, ix: i32) -> Result<&SourceTensor<'_>> {
        usize::try_from(ix)
            .ok()
            .and_then(|ix| self.graph.tensors.get(ix))
            .ok_or_else(|| unsupported("an omitted input"))
    }

    /// The byte activation tensor `ix` is, given a slot on first sight.
    fn activation(&mut self, ix: i32) -> Result<Activation> {
        let t = self.tensor(ix)?;
        if t.data.is_some() {
            return Err(unsupported(format!("constant {} where an activation was expected", t.name)));
        }
        let (scale, zero) = activation_grid(t)?;
        let size = elements(&t.shape).filter(|&size| size <= MAX_ACTIVATION_BYTES);
        let Some(size) = size.filter(|&size| size > 0) else {
            return Err(unsupported(format!("activation {} of shape {:?}", t.name, t.shape)));
        };
        let slot = match self.slots[ix as usize] {
            Some(slot) => slot,
            None => {
                self.sizes.push(size);
                self.slots[ix as usize] = Some(self.sizes.len() - 1);
                self.sizes.len() - 1
            }
        };
        Ok(Activation { slot, scale, zero })
    }

    /// Tensor `to` kept in the slot of `from`: the same bytes, another shape.
    fn alias(&mut self, from: i32, to: i32) -> Result<()> {
        let source = self.activation(from)?;
        let t = self.tensor(to)?;
        if activation_grid(t)? != (source.scale, source.zero) {
            return Err(unsupported("a reshape that changes the quantization"));
        }
        if elements(&t.shape) != Some(self.sizes[source.slot]) {
            return Err(malformed("a reshape that changes the number of values"));
        }
        if self.slots[to as usize].is_some() {
            return Err(malformed("a tensor written twice"));
        }
        self.slots[to as usize] = Some(source.slot);
        Ok(())
    }

    /// The output activation of `op`, new: a graph writing a tensor twice,
    /// or its own input, is refused.
    fn output(&mut self, op: &SourceOp) -> Result<Activation> {
        let [ix] = op.outputs[..] else { return Err(unsupported("more than one output")) };
        if self.slots.get(ix as usize).is_some_and(Option::is_some) {
            return Err(malformed("a tensor written twice"));
        }
        self.activation(ix)
    }

    fn step(&mut self, op: &SourceOp) -> Result<Option<Step>> {
        let f = &op.flat;
        let input_ix = *op.inputs.first().ok_or_else(|| malformed("no input"))?;
        let missing = || malformed("options missing");
        match op.code {
            BuiltinOperator::RESHAPE | BuiltinOperator::SQUEEZE => {
                self.alias(input_ix, op.outputs[0])?;
                Ok(None)
            }
            BuiltinOperator::QUANTIZE => {
                let input = self.activation(input_ix)?;
                let t = self.tensor(op.outputs[0])?;
                // uint8 to int8 of the same scale: the same bytes, as int8 is held.
                if activation_grid(t)? == (input.scale, input.zero) {
                    self.alias(input_ix, op.outputs[0])?;
                    return Ok(None);
                }
                let output = self.output(op)?;
                if self.sizes[output.slot] != self.sizes[input.slot] {
                    return Err(malformed("a QUANTIZE that changes the number of values"));
                }
                let bounds = bounds(output, ActivationFunctionType::NONE);
                Ok(Some(Step::Requantize { input, output: output.slot, scale: input.scale / output.scale, bounds }))
            }
            BuiltinOperator::CONV_2D => {
                let o = f.builtin_options_as_conv_2_doptions().ok_or_else(missing)?;
                no_dilation((o.dilation_h_factor(), o.dilation_w_factor()))?;
                let input = self.activation(input_ix)?;
                let output = self.output(op)?;
                let [_, _, _, oc] = self.shape4(op.outputs[0])?;
                let weights = self.weights(op, 0, oc)?;
                let [woc, kh, kw, wic] = weights.shape[..] else {
                    return Err(malformed("weights not of rank 4"));
                };
                let stride = (o.stride_h(), o.stride_w());
                let geometry = self.geometry((input_ix, op.outputs[0]), (kh, kw), stride, o.padding())?;
                if (woc, wic) != (oc, geometry.channels) {
                    return Err(malformed("weights that do not match the input and output"));
                }
                let depth = kh * kw * wic;
                let gemm = self.product(op, (input, output), &weights, depth, o.fused_activation_function())?;
                let pixels = geometry.output.0 * geometry.output.1;
                if (kh, kw, geometry.stride, geometry.pad) == (1, 1, (1, 1), (0, 0)) {
                    return Ok(Some(Step::Product { input: input.slot, output: output.slot, pixels, gemm }));
                }
                let im2col = Im2col { geometry, zero: input.zero as u8 };
                let scratch = pixels.checked_mul(depth).ok_or_else(|| malformed("a convolution too large"))?;
                self.scratch = self.scratch.max(scratch);
                Ok(Some(Step::Convolution { input: input.slot, output: output.slot, im2col, gemm }))
            }
            BuiltinOperator::DEPTHWISE_CONV_2D => {
                let o = f.builtin_options_as_depthwise_conv_2_doptions().ok_or_else(missing)?;
                no_dilation((o.dilation_h_factor(), o.dilation_w_factor()))?;
                let input = self.activation(input_ix)?;
                let output = self.output(op)?;
                let [_, _, _, oc] = self.shape4(op.outputs[0])?;
                let weights = self.weights(op, 3, oc)?;
                let [1, kh, kw, wc] = weights.shape[..] else {
                    return Err(malformed("depthwise weights not of shape [1, h, w, channels]"));
                };
                let stride = (o.stride_h(), o.stride_w());
                let geometry = self.geometry((input_ix, op.outputs[0]), (kh, kw), stride, o.padding())?;
                if geometry.channels != oc {
                    return Err(unsupported("a depth multiplier other than 1"));
                }
                if wc != oc {
                    return Err(malformed("weights that do not match the channels"));
                }
                let requantize = self.requantize(input, output, &weights, o.fused_activation_function())?;
                let conv = Depthwise::new(
                    geometry,
                    weights.bytes,
                    weights.signed,
                    &weights.zero,
                    input.zero,
                    &self.bias(op, oc)?,
                    requantize,
                )
                .map_err(malformed)?;
                Ok(Some(Step::Depthwise { input: input.slot, output: output.slot, conv }))
            }
            BuiltinOperator::FULLY_CONNECTED => {
                let o = f.builtin_options_as_fully_connected_options().ok_or_else(missing)?;
                if o.weights_format() != tract_tflite::tflite::FullyConnectedOptionsWeightsFormat::DEFAULT {
                    return Err(unsupported("shuffled weights"));
                }
                let input = self.activation(input_ix)?;
                let output = self.output(op)?;
                let out_channels = *self.tensor(op.outputs[0])?.shape.last().unwrap_or(&0) as usize;
                let weights = self.weights(op, 0, out_channels)?;
                let [oc, depth] = weights.shape[..] else {
                    return Err(malformed("weights not of rank 2"));
                };
                let rows = self.sizes[input.slot] / depth.max(1);
                if oc != out_channels || rows * depth != self.sizes[input.slot] || rows * oc != self.sizes[output.slot]
                {
                    return Err(malformed("weights that do not match the input and output"));
                }
                let gemm = self.product(op, (input, output), &weights, depth, o.fused_activation_function())?;
                Ok(Some(Step::Product { input: input.slot, output: output.slot, pixels: rows, gemm }))
            }
            BuiltinOperator::ADD => {
                let o = f.builtin_options_as_add_options().ok_or_else(missing)?;
                let b_ix = *op.inputs.get(1).ok_or_else(|| malformed("missing input 1"))?;
                let (a, b) = (self.activation(input_ix)?, self.activation(b_ix)?);
                let output = self.output(op)?;
                let same = |ix| self.tensor(ix).map(|t| t.shape.clone());
                if same(input_ix)? != same(b_ix)? || same(input_ix)? != same(op.outputs[0])? {
                    return Err(unsupported("an ADD that broadcasts"));
                }
                let sum = Addition::new(a, b, output.scale)
                    .ok_or_else(|| unsupported("an ADD whose scales are too far apart"))?;
                let bounds = bounds(output, o.fused_activation_function());
                Ok(Some(Step::Add { a: a.slot, b: b.slot, output: output.slot, sum, bounds }))
            }
            BuiltinOperator::AVERAGE_POOL_2D => {
                let o = f.builtin_options_as_pool_2_doptions().ok_or_else(missing)?;
                let input = self.activation(input_ix)?;
                let output = self.output(op)?;
                let window = (positive(o.filter_height())?, positive(o.filter_width())?);
                let stride = (o.stride_h(), o.stride_w());
                let pool = self.geometry((input_ix, op.outputs[0]), window, stride, o.padding())?;
                if self.shape4(op.outputs[0])?[3] != pool.channels {
                    return Err(malformed("an output that does not match the pooling"));
                }
                let bounds = bounds(output, o.fused_activation_function());
                // TFLite's own kernel, which runs it, keeps the input's grid.
                if (output.scale, output.zero) != (input.scale, input.zero) {
                    return Err(unsupported("an average pool that changes the quantization"));
                }
                let rounding = Averaging::Divided { signed: self.tensor(input_ix)?.ty == TensorType::INT8 };
                Ok(Some(Step::Pool { input, output: output.slot, pool, rounding, bounds }))
            }
            BuiltinOperator::MEAN => {
                let input = self.activation(input_ix)?;
                let axes = op.inputs.get(1).map(|&ix| self.tensor(ix)).transpose()?;
                let axes: Vec<i32> = match axes.and_then(|t| t.data) {
                    Some(bytes) if axes.is_some_and(|t| t.ty == TensorType::INT32) => {
                        bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                    }
                    _ => return Err(unsupported("a MEAN over axes that are not constant")),
                };
                let [_, ih, iw, c] = self.shape4(input_ix)?;
                if !(axes == [1, 2] || axes == [2, 1]) {
                    return Err(unsupported(format!("a MEAN over axes {axes:?}")));
                }
                let output = self.output(op)?;
                if self.sizes[output.slot] != c {
                    return Err(malformed("an output that does not match the mean"));
                }
                let pool = Geometry {
                    input: (ih, iw),
                    channels: c,
                    output: (1, 1),
                    kernel: (ih, iw),
                    stride: (1, 1),
                    pad: (0, 0),
                };
                let bounds = bounds(output, ActivationFunctionType::NONE);
                let rounding = Averaging::Scaled { from: input.scale, to: output.scale };
                Ok(Some(Step::Pool { input, output: output.slot, pool, rounding, bounds }))
            }
            BuiltinOperator::SOFTMAX => {
                let beta = f.builtin_options_as_softmax_options().map(|o| o.beta()).unwrap_or(1.0);
                let input = self.activation(input_ix)?;
                let output = self.output(op)?;
                let width = *self.tensor(input_ix)?.shape.last().unwrap_or(&0) as usize;
                let size = self.sizes[input.slot];
                if width == 0 || !size.is_multiple_of(width) || self.sizes[output.slot] != size {
                    return Err(malformed("a softmax whose output does not match its input"));
                }
                Ok(Some(Step::Softmax {
                    input: input.slot,
                    output: output.slot,
                    width,
                    exponent: beta * input.scale,
                    output_scale: output.scale,
                    unsigned: self.tensor(op.outputs[0])?.ty == TensorType::UINT8,
                    bounds: bounds(output, ActivationFunctionType::NONE),
                }))
            }
            code => {
                let name = code.variant_name().map(str::to_string).unwrap_or_else(|| format!("#{}", code.0));
                Err(unsupported(format!("operator {name} has no integer step")))
            }
        }
    }

    /// The window of `kernel` sliding over tensor `input` into tensor
    /// `output` by `stride` with `padding`, checked against the output's
    /// size; its channels are the input's.
    fn geometry(
        &self,
        (input, output): (i32, i32),
        kernel: (usize, usize),
        stride: (i32, i32),
        padding: Padding,
    ) -> Result<Geometry> {
        let [_, ih, iw, channels] = self.shape4(input)?;
        let [_, oh, ow, _] = self.shape4(output)?;
        let stride = (positive(stride.0)?, positive(stride.1)?);
        let (pad, out) = self::padding(padding, (ih, iw), kernel, stride)?;
        if out != (oh, ow) {
            return Err(malformed("an output that does not match the window"));
        }
        Ok(Geometry { channels, input: (ih, iw), output: out, kernel, stride, pad })
    }

    /// The four sides of a `[1, h, w, c]` tensor.
    fn shape4(&self, ix: i32) -> Result<[usize; 4]> {
        match self.tensor(ix)?.shape[..] {
            [1, h, w, c] if h > 0 && w > 0 && c > 0 => Ok([1, h as usize, w as usize, c as usize]),
            ref shape => Err(unsupported(format!("a tensor of shape {shape:?} where [1, h, w, c] was expected"))),
        }
    }

    /// The constant 8-bit weights of `op` (its input 1), whose channels
    /// (`channels` of them) run along `axis`.
    fn weights(&self, op: &SourceOp, axis: usize, channels: usize) -> Result<Weights<'_>> {
        let ix = *op.inputs.get(1).ok_or_else(|| malformed("missing weights"))?;
        let t = self.tensor(ix)?;
        let (Some(bytes), Some(q)) = (t.data, t.quant.as_ref()) else {
            return Err(unsupported("weights that are not constant and quantized"));
        };
        let signed = match t.ty {
            TensorType::UINT8 => false,
            TensorType::INT8 => true,
            ty => return Err(unsupported(format!("weights of type {ty:?}"))),
        };
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        if elements(&t.shape) != Some(bytes.len()) {
            return Err(malformed(format!("weights {} that do not fit their shape", t.name)));
        }
        let per_channel = q.scale.len() > 1;
        if per_channel && (q.axis != axis || q.scale.len() != channels) {
            return Err(unsupported("weights quantized along another axis"));
        }
        if q.zero_point.len() > 1 && q.zero_point.len() != q.scale.len() {
            return Err(malformed("weights with as many zero points as scales"));
        }
        let scale = (0..channels).map(|c| q.scale[if per_channel { c } else { 0 }]).collect();
        let range = if signed { -128..=127 } else { 0..=255 };
        let zero = (0..channels)
            .map(|c| *q.zero_point.get(c).or(q.zero_point.first()).unwrap_or(&0))
            .map(|z| {
                i32::try_from(z)
                    .ok()
                    .filter(|z| range.contains(z))
                    .ok_or_else(|| malformed(format!("a weight zero point of {z}")))
            })
            .collect::<Result<_>>()?;
        Ok(Weights { bytes, signed, shape, scale, zero })
    }

    /// The int32 bias of `op` (its input 2), zero where omitted.
    fn bias(&self, op: &SourceOp, channels: usize) -> Result<Vec<i32>> {
        let Some(&ix) = op.inputs.get(2).filter(|&&ix| ix >= 0) else { return Ok(vec![0; channels]) };
        let t = self.tensor(ix)?;
        match (t.ty, t.data) {
            (TensorType::INT32, Some(bytes)) if bytes.len() == channels * 4 => {
                Ok(bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            _ => Err(unsupported("a bias that is not constant int32 of one value per channel")),
        }
    }

    /// The matrix product of `op`, its `weights` (one row of `depth` bytes
    /// per output channel) times rows of `input`, into `output`.
    fn product(
        &self,
        op: &SourceOp,
        (input, output): (Activation, Activation),
        weights: &Weights,
        depth: usize,
        fused: ActivationFunctionType,
    ) -> Result<Gemm> {
        let channels = weights.scale.len();
        let requantize = self.requantize(input, output, weights, fused)?;
        let bias = self.bias(op, channels)?;
        let Weights { bytes, signed, zero, .. } = weights;
        Ok(Gemm::new(channels, depth, bytes, *signed, zero, input.zero, &bias, requantize))
    }

    /// The requantization of a product of `input` and `weights` into `output`.
    fn requantize(
        &self,
        input: Activation,
        output: Activation,
        weights: &Weights,
        fused: ActivationFunctionType,
    ) -> Result<Requantize> {
        let Bounds { zero, low, high } = bounds(output, fused);
        // As XNNPACK computes it, in float32.
        let scale: Vec<f32> = weights.scale.iter().map(|&w| input.scale * w / output.scale).collect();
        if let Some(bad) = scale.iter().find(|s| !s.is_finite()) {
            return Err(malformed(format!("weights whose scale makes a product's scale {bad}")));
        }
        Ok(Requantize { scale, output_zero: zero, low, high })
    }
}

struct Weights<'a> {
    bytes: &'a [u8],
    signed: bool,
    shape: Vec<usize>,
    scale: Vec<f32>,
    zero: Vec<i32>,
}

/// The scale and zero point of an 8-bit activation as it is held: int8
/// values shifted up by 128.
fn activation_grid(t: &SourceTensor) -> Result<(f32, i32)> {
    let Some((scale, zero)) = t.quant.as_ref().and_then(|q| q.single()) else {
        return Err(unsupported(format!("activation {} not quantized per tensor", t.name)));
    };
    if !(scale.is_finite() && scale > 0.0) {
        return Err(malformed(format!("activation {} has the scale {scale}", t.name)));
    }
    let zero = match t.ty {
        TensorType::UINT8 => zero,
        TensorType::INT8 => zero + 128,
        ty => return Err(unsupported(format!("activation {} of type {ty:?}", t.name))),
    };
    if !(0..=255).contains(&zero) {
        return Err(malformed(format!("activation {} has the zero point {zero}", t.name)));
    }
    Ok((scale, zero as i32))
}

/// The bytes an activation of `output` may take after `fused`, as TFLite
/// computes the range: the real bounds on the output's grid, within a byte.
fn bounds(output: Activation, fused: ActivationFunctionType) -> Bounds {
    let at = |real: f32| (real / output.scale).round() as i32 + output.zero;
    let (low, high) = match fused {
        ActivationFunctionType::RELU => (at(0.0), 255),
        ActivationFunctionType::RELU6 => (at(0.0), at(6.0)),
        ActivationFunctionType::RELU_N1_TO_1 => (at(-1.0), at(1.0)),
        _ => (0, 255),
    };
    Bounds { zero: output.zero, low: low.clamp(0, 255) as u8, high: high.clamp(0, 255) as u8 }
}

fn no_dilation(dilation: (i32, i32)) -> Result<()> {
    match dilation {
        (1, 1) => Ok(()),
        _ => Err(unsupported("dilation")),
    }
}

/// Padding before the first row and column, and the output's size, as
/// TFLite computes them.
fn padding(
    padding: Padding,
    input: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
) -> Result<((usize, usize), (usize, usize))> {
    if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 {
        return Err(malformed("a kernel or stride of zero"));
    }
    let side = |input: usize, kernel: usize, stride: usize| -> Result<(usize, usize)> {
        match padding {
            Padding::SAME => {
                let out = input.div_ceil(stride);
                let reach = (out - 1).checked_mul(stride).and_then(|r| r.checked_add(kernel));
                let total = reach.ok_or_else(|| malformed("a window too large"))?.saturating_sub(input);
                Ok((total / 2, out))
            }
            Padding::VALID if kernel <= input => Ok((0, (input - kernel) / stride + 1)),
            Padding::VALID => Err(malformed("a kernel larger than its input")),
            _ => Err(unsupported("an unknown padding")),
        }
    };
    let (pad_h, out_h) = side(input.0, kernel.0, stride.0)?;
    let (pad_w, out_w) = side(input.1, kernel.1, stride.1)?;
    Ok(((pad_h, pad_w), (out_h, out_w)))
}

/// A stride or window side from the file: at least 1.
fn positive(side: i32) -> Result<usize> {
    usize::try_from(side)
        .ok()
        .filter(|&side| side > 0)
        .ok_or_else(|| malformed(format!("a stride or window of {side}")))
}

fn elements(shape: &[i32]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph of uint8 activations of `shapes`, and no operator.
    fn activations(shapes: &[&[i32]]) -> Graph<'static> {
        let tensor = |(k, shape): (usize, &&[i32])| SourceTensor {
            name: format!("t{k}"),
            shape: shape.to_vec(),
            ty: TensorType::UINT8,
            quant: Some(super::super::quant::Quant { scale: vec![0.5], zero_point: vec![3], axis: 0 }),
            data: None,
        };
        let tensors = shapes.iter().enumerate().map(tensor).collect();
        Graph { tensors, ops: vec![], inputs: vec![0], outputs: vec![0], metadata: None }
    }

    #[test]
    fn huge_and_empty_activations_are_left_to_the_float_rebuild() {
        // 2^62 bytes, which four slots would wrap a sum of sizes with, and none.
        let graph = activations(&[&[1, 4, 4, 3], &[2097152, 2097152, 1048576], &[0, 10], &[1, 1 << 15, 1 << 15, 1]]);
        let mut plan = Planner { graph: &graph, slots: vec![None; 4], sizes: vec![], scratch: 0 };
        assert_eq!(plan.activation(0).unwrap(), Activation { slot: 0, scale: 0.5, zero: 3 });
        for ix in 1..4 {
            assert!(matches!(plan.activation(ix), Err(super::super::DequantizeError::Unsupported(_))), "tensor {ix}");
        }
        assert_eq!(plan.sizes, [48]);
    }

    #[test]
    fn padding_is_tflites() {
        // SAME, stride 2 on an even side: nothing before, one after.
        assert_eq!(padding(Padding::SAME, (224, 224), (3, 3), (2, 2)).unwrap(), ((0, 0), (112, 112)));
        assert_eq!(padding(Padding::SAME, (7, 7), (3, 3), (1, 1)).unwrap(), ((1, 1), (7, 7)));
        assert_eq!(padding(Padding::SAME, (7, 7), (3, 3), (2, 2)).unwrap(), ((1, 1), (4, 4)));
        assert_eq!(padding(Padding::VALID, (7, 7), (7, 7), (2, 2)).unwrap(), ((0, 0), (1, 1)));
        assert!(padding(Padding::VALID, (3, 3), (7, 7), (1, 1)).is_err());
        assert!(padding(Padding::SAME, (3, 3), (3, 3), (0, 1)).is_err());
    }

    #[test]
    fn fused_activations_bound_the_bytes() {
        let output = Activation { slot: 0, scale: 6.0 / 255.0, zero: 0 };
        assert_eq!(bounds(output, ActivationFunctionType::RELU6), Bounds { zero: 0, low: 0, high: 255 });
        let output = Activation { slot: 0, scale: 0.1, zero: 100 };
        assert_eq!(bounds(output, ActivationFunctionType::RELU6), Bounds { zero: 100, low: 100, high: 160 });
        assert_eq!(bounds(output, ActivationFunctionType::RELU), Bounds { zero: 100, low: 100, high: 255 });
        assert_eq!(bounds(output, ActivationFunctionType::NONE), Bounds { zero: 100, low: 0, high: 255 });
    }

    #[test]
    fn pixels_land_on_the_inputs_grid() {
        let input = Activation { slot: 0, scale: 1.0 / 128.0, zero: 128 };
        // The birds model's own normalization: each pixel is its own byte.
        let table = pixel_bytes(Normalization::uniform(1.0 / 128.0, -1.0), input);
        assert!(table.iter().all(|row| row.iter().enumerate().all(|(p, &b)| p == b as usize)));
        // Pixels in [0, 1] on a grid of [-1, 1]: the bytes halve, around the zero.
        let table = pixel_bytes(Normalization::uniform(1.0 / 255.0, 0.0), input);
        assert_eq!((table[0][0], table[0][255]), (128, 255));
    }
}
