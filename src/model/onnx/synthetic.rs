//! Small ONNX classifiers whose answers can be worked out by hand, built
//! here with tract-onnx's own protobuf types: the tests build them in
//! memory, and `fixtures/onnx_*.onnx` are these same bytes, for the tests
//! of the binary (`fixtures_are_what_the_generator_makes` checks them;
//! `CLASSIFIER_WRITE_FIXTURES=1 cargo test --lib onnx::` writes them).
//!
//! Pixels reach the models normalised to [-1, 1] (`p / 127.5 - 1`).

use prost::Message;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::*;

/// A fixed axis.
pub fn fixed(size: i64) -> Dimension {
    Dimension { value: Some(dimension::Value::DimValue(size)), ..Default::default() }
}

/// A dynamic axis named `name` (unnamed if empty).
pub fn dynamic(name: &str) -> Dimension {
    let value = (!name.is_empty()).then(|| dimension::Value::DimParam(name.into()));
    Dimension { value, ..Default::default() }
}

fn value_info(name: &str, elem_type: DataType, dims: Vec<Dimension>) -> ValueInfoProto {
    let tensor = type_proto::Tensor { elem_type: elem_type as i32, shape: Some(TensorShapeProto { dim: dims }) };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() }),
        ..Default::default()
    }
}

fn floats(name: &str, dims: &[i64], data: Vec<f32>) -> TensorProto {
    assert_eq!(dims.iter().product::<i64>(), data.len() as i64, "{name}");
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

fn ints(name: &str, data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: DataType::Int64 as i32,
        int64_data: data.to_vec(),
        ..Default::default()
    }
}

fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: value, ..Default::default() }
}

fn ints_attribute(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: output.into(),
        op_type: op.into(),
        input: inputs.iter().map(|i| i.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

/// A model of one graph taking `pixels` and giving `scores`, opset 13.
fn model(input: ValueInfoProto, nodes: Vec<NodeProto>, initializer: Vec<TensorProto>) -> Vec<u8> {
    let graph = GraphProto {
        name: "synthetic".into(),
        node: nodes,
        initializer,
        input: vec![input],
        output: vec![ValueInfoProto { name: "scores".into(), ..Default::default() }],
        ..Default::default()
    };
    ModelProto {
        ir_version: 7,
        producer_name: "classifier tests".into(),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Scores of the colours red, green, blue, for a `[N, 3, 4, 6]` input:
/// `softmax(2 * mean of each channel)`, through a 1x1 convolution (weights
/// twice the identity), a global average pool and a flatten, `[N, 3]` out.
pub fn colour_nchw() -> Vec<u8> {
    let weights = (0..9).map(|k| if k % 4 == 0 { 2.0 } else { 0.0 }).collect();
    model(
        value_info("pixels", DataType::Float, vec![dynamic("N"), fixed(3), fixed(4), fixed(6)]),
        vec![
            node("Conv", &["pixels", "weights", "bias"], "mixed", vec![ints_attribute("kernel_shape", &[1, 1])]),
            node("GlobalAveragePool", &["mixed"], "pooled", vec![]),
            node("Flatten", &["pooled"], "logits", vec![int_attribute("axis", 1)]),
            node("Softmax", &["logits"], "scores", vec![int_attribute("axis", 1)]),
        ],
        vec![floats("weights", &[3, 3, 1, 1], weights), floats("bias", &[3], vec![0.0; 3])],
    )
}

/// The same scores as [`colour_nchw`] for a channels-last `[N, 4, 6, 3]`
/// input, as `[N, 1, 1, 3]`: a mean over the rows and columns, doubled,
/// then a softmax over the last axis.
pub fn colour_nhwc() -> Vec<u8> {
    model(
        value_info("pixels", DataType::Float, vec![dynamic("batch_size"), fixed(4), fixed(6), fixed(3)]),
        vec![
            node("ReduceMean", &["pixels"], "pooled", vec![ints_attribute("axes", &[1, 2])]),
            node("Mul", &["pooled", "two"], "logits", vec![]),
            node("Softmax", &["logits"], "scores", vec![int_attribute("axis", -1)]),
        ],
        vec![floats("two", &[], vec![2.0])],
    )
}

/// One class per pixel of a `dims` input (`[N, 3, height, width]`): the
/// score of class `y * width + x` is the normalised first channel of pixel
/// (x, y), raw, as `[classes]` (a flatten, a product with a matrix that
/// picks the first plane, a reshape to one axis).
pub fn pixels(dims: Vec<Dimension>) -> Vec<u8> {
    // A dynamic or missing axis counts as 1, for the models that test them.
    let size = |axis: usize| match dims.get(axis).and_then(|d| d.value.as_ref()) {
        Some(dimension::Value::DimValue(v)) => *v,
        _ => 1,
    };
    let (height, width) = (size(2), size(3));
    let (inputs, classes) = (3 * height * width, height * width);
    let pick = (0..inputs).flat_map(|i| (0..classes).map(move |c| if i == c { 1.0 } else { 0.0 })).collect();
    model(
        value_info("pixels", DataType::Float, dims),
        vec![
            node("Flatten", &["pixels"], "flat", vec![int_attribute("axis", 1)]),
            node("MatMul", &["flat", "pick"], "picked", vec![]),
            node("Reshape", &["picked", "one_axis"], "scores", vec![]),
        ],
        vec![floats("pick", &[inputs, classes], pick), ints("one_axis", &[-1])],
    )
}

/// A `[N, 3, 2, 2]` model whose graph holds an operator no ONNX runtime
/// has heard of.
pub fn unknown_operator() -> Vec<u8> {
    model(
        value_info("pixels", DataType::Float, vec![dynamic("N"), fixed(3), fixed(2), fixed(2)]),
        vec![node("Frobnicate", &["pixels"], "scores", vec![])],
        vec![],
    )
}

/// A model taking `elem_type` pixels, `[1, 3, 2, 2]`, whose twelve scores
/// are its input, flattened and cast to float32.
pub fn input_of_type(elem_type: DataType) -> Vec<u8> {
    model(
        value_info("pixels", elem_type, vec![fixed(1), fixed(3), fixed(2), fixed(2)]),
        vec![
            node("Flatten", &["pixels"], "flat", vec![int_attribute("axis", 1)]),
            node("Cast", &["flat"], "scores", vec![int_attribute("to", DataType::Float as i64)]),
        ],
        vec![],
    )
}

/// The fixtures the binary's tests read, by file name.
pub fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    vec![("onnx_colour_nchw.onnx", colour_nchw()), ("onnx_colour_nhwc.onnx", colour_nhwc())]
}
