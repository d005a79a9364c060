//! The rebuilt model, as the rewrite makes it and the stages divide it, and
//! its serialization as the TFLite flatbuffer that tract reads. Apart from
//! the rewrite so that its rules speak of operators and options, not of
//! flatbuffer builder calls. Quantized weights stay as they are until a stage
//! is written (see [`Data`]).

use std::borrow::Cow;

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use tract_tflite::tflite::{self, ActivationFunctionType, BuiltinOperator, BuiltinOptions, TensorType};

use super::quant::{Quant, dequantize_into};

/// The values of a constant of the rebuilt model.
#[derive(Debug, Clone)]
pub(super) enum Data<'a> {
    /// Little-endian values as they go into the rebuilt model.
    Bytes(Cow<'a, [u8]>),
    /// Quantized values, turned into float32 only as the model is written:
    /// that happens on the thread preparing the stage, into a buffer reused
    /// from one tensor to the next, and spares a copy of every weight.
    Quantized { values: &'a [u8], stored: Stored, quant: Quant, inner: usize },
}

/// How a quantized constant stores its values.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stored {
    U8,
    I8,
    I16,
    I32,
}

impl Stored {
    pub(super) fn bytes(self) -> usize {
        match self {
            Stored::U8 | Stored::I8 => 1,
            Stored::I16 => 2,
            Stored::I32 => 4,
        }
    }
}

impl Data<'_> {
    /// Bytes in the rebuilt model.
    pub(super) fn len(&self) -> usize {
        match self {
            Data::Bytes(bytes) => bytes.len(),
            Data::Quantized { values, stored, .. } => values.len() / stored.bytes() * 4,
        }
    }

    /// The bytes to write into the rebuilt model, dequantized into `scratch`
    /// when they need to be.
    fn bytes<'s>(&'s self, scratch: &'s mut Vec<u8>) -> &'s [u8] {
        match self {
            Data::Bytes(bytes) => bytes,
            Data::Quantized { values, stored, quant, inner } => {
                let (q, n) = (quant, *inner);
                match stored {
                    Stored::U8 => dequantize_into(q, n, values.iter().map(|&v| v as i64), scratch),
                    Stored::I8 => dequantize_into(q, n, values.iter().map(|&v| v as i8 as i64), scratch),
                    Stored::I16 => {
                        let values = values.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64);
                        dequantize_into(q, n, values, scratch)
                    }
                    Stored::I32 => {
                        let values =
                            values.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64);
                        dequantize_into(q, n, values, scratch)
                    }
                }
                scratch
            }
        }
    }
}

/// A tensor of the rebuilt model.
#[derive(Debug, Clone)]
pub(super) struct NewTensor<'a> {
    pub(super) name: String,
    pub(super) shape: Vec<i32>,
    pub(super) ty: TensorType,
    pub(super) data: Option<Data<'a>>,
}

impl NewTensor<'_> {
    pub(super) fn activation(name: String, shape: Vec<i32>) -> Self {
        NewTensor { name, shape, ty: TensorType::FLOAT32, data: None }
    }
}

/// The options of an operator of the rebuilt model, the ones the rewrite
/// writes.
#[derive(Debug, Clone)]
pub(super) enum Options {
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

/// An operator of the rebuilt model.
pub(super) struct NewOp {
    pub(super) code: BuiltinOperator,
    pub(super) inputs: Vec<i32>,
    pub(super) outputs: Vec<i32>,
    pub(super) options: Options,
}

/// The rebuilt model, or one stage of it.
#[derive(Default)]
pub(super) struct Rebuilt<'a> {
    pub(super) tensors: Vec<NewTensor<'a>>,
    pub(super) ops: Vec<NewOp>,
    pub(super) inputs: Vec<i32>,
    pub(super) outputs: Vec<i32>,
}

impl<'a> Rebuilt<'a> {
    pub(super) fn push(&mut self, t: NewTensor<'a>) -> i32 {
        self.tensors.push(t);
        self.tensors.len() as i32 - 1
    }

    pub(super) fn op(&mut self, code: BuiltinOperator, inputs: Vec<i32>, outputs: Vec<i32>, options: Options) {
        self.ops.push(NewOp { code, inputs, outputs, options });
    }

    /// The model as a flatbuffer, and where in the buffer it starts.
    pub(super) fn serialize(&self) -> (Vec<u8>, usize) {
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
        let mut scratch = vec![];
        for t in &self.tensors {
            let buffer = match &t.data {
                Some(data) => {
                    let data = fb.create_vector(data.bytes(&mut scratch));
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
