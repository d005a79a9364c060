//! Writes `fixtures/mock_model.tflite` and `fixtures/mock_labels.csv`: a tiny
//! fully uint8-quantized classifier of an image's dominant colour (red,
//! green, blue), built with the traps of the real birds model:
//!
//! - CONV_2D `centre` has no fused activation; its output range [0, 6]
//!   implies ReLU6, and the clamp shows in the answer: a pure red image
//!   scores 0.7175 with it, 0.807 without the top clamp, 0.919 with none.
//! - ADD sums inputs of different scales (6/255 and 0.5/255).
//! - FULLY_CONNECTED reads a rank-4 tensor.
//!
//! The network, in real values, for an 8x8 RGB input `x` in [0, 1]:
//!   centre = relu6(4 * (3 x_c - sum(x)))     (1x1 conv)
//!   half   = 0.5 x                           (1x1 conv)
//!   mix    = centre + half                   (ADD)
//!   pooled = average over the 8x8 pixels     (AVERAGE_POOL_2D)
//!   logits = 0.25 pooled                     (FULLY_CONNECTED)
//!   scores = softmax(logits)
//!
//! Run: `cargo run --example make_mock_model`

use flatbuffers::FlatBufferBuilder;
use tract_tflite::tflite::*;

struct Quant {
    scale: f32,
    zero_point: i64,
}

struct T {
    name: &'static str,
    shape: Vec<i32>,
    ty: TensorType,
    quant: Quant,
    data: Option<Vec<u8>>,
}

fn q(scale: f32, zero_point: i64) -> Quant {
    Quant { scale, zero_point }
}

fn quantize_u8(values: &[f32], quant: &Quant) -> Vec<u8> {
    values.iter().map(|v| ((v / quant.scale).round() as i64 + quant.zero_point).clamp(0, 255) as u8).collect()
}

fn main() -> std::io::Result<()> {
    let side = 8;
    let gain = 4.0;
    let centre: Vec<f32> = (0..3).flat_map(|o| (0..3).map(move |i| if o == i { 2.0 * gain } else { -gain })).collect();
    let half: Vec<f32> = (0..3).flat_map(|o| (0..3).map(move |i| if o == i { 0.5 } else { 0.0 })).collect();
    let head: Vec<f32> = (0..3).flat_map(|o| (0..3).map(move |i| if o == i { 0.25 } else { 0.0 })).collect();

    let input_q = q(1.0 / 255.0, 0);
    let centre_w = q(1.0 / 8.0, 128);
    let half_w = q(1.0 / 128.0, 128);
    let pooled_q = q(8.0 / 255.0, 0);
    let head_w = q(1.0 / 256.0, 128);
    let zeros = |n: usize| Some(vec![0u8; n * 4]);
    let tensors = vec![
        T { name: "image", shape: vec![1, side, side, 3], ty: TensorType::UINT8, quant: q(1.0 / 255.0, 0), data: None },
        T {
            name: "centre/weights",
            shape: vec![3, 1, 1, 3],
            ty: TensorType::UINT8,
            data: Some(quantize_u8(&centre, &centre_w)),
            quant: centre_w,
        },
        T {
            name: "centre/bias",
            shape: vec![3],
            ty: TensorType::INT32,
            quant: q(input_q.scale / 8.0, 0),
            data: zeros(3),
        },
        // Zero point 0 and a top of 6: the implied ReLU6.
        T {
            name: "centre",
            shape: vec![1, side, side, 3],
            ty: TensorType::UINT8,
            quant: q(6.0 / 255.0, 0),
            data: None,
        },
        T {
            name: "half/weights",
            shape: vec![3, 1, 1, 3],
            ty: TensorType::UINT8,
            data: Some(quantize_u8(&half, &half_w)),
            quant: half_w,
        },
        T {
            name: "half/bias",
            shape: vec![3],
            ty: TensorType::INT32,
            quant: q(input_q.scale / 128.0, 0),
            data: zeros(3),
        },
        T { name: "half", shape: vec![1, side, side, 3], ty: TensorType::UINT8, quant: q(0.5 / 255.0, 0), data: None },
        T { name: "mix", shape: vec![1, side, side, 3], ty: TensorType::UINT8, quant: q(8.0 / 255.0, 0), data: None },
        T { name: "pooled", shape: vec![1, 1, 1, 3], ty: TensorType::UINT8, quant: q(8.0 / 255.0, 0), data: None },
        T {
            name: "head/weights",
            shape: vec![3, 3],
            ty: TensorType::UINT8,
            data: Some(quantize_u8(&head, &head_w)),
            quant: head_w,
        },
        T {
            name: "head/bias",
            shape: vec![3],
            ty: TensorType::INT32,
            quant: q(pooled_q.scale / 256.0, 0),
            data: zeros(3),
        },
        T { name: "logits", shape: vec![1, 3], ty: TensorType::UINT8, quant: q(1.0 / 64.0, 128), data: None },
        T { name: "scores", shape: vec![1, 3], ty: TensorType::UINT8, quant: q(1.0 / 256.0, 0), data: None },
    ];
    let _ = (input_q, pooled_q);
    let ix = |name: &str| tensors.iter().position(|t| t.name == name).unwrap() as i32;

    let mut fb = FlatBufferBuilder::new();
    let mut buffers = vec![Buffer::create(&mut fb, &BufferArgs { data: None })];
    let mut flat_tensors = vec![];
    for t in &tensors {
        let buffer = match &t.data {
            Some(data) => {
                let data = fb.create_vector(data);
                buffers.push(Buffer::create(&mut fb, &BufferArgs { data: Some(data) }));
                buffers.len() as u32 - 1
            }
            None => 0,
        };
        let scale = fb.create_vector(&[t.quant.scale]);
        let zero_point = fb.create_vector(&[t.quant.zero_point]);
        let quantization = QuantizationParameters::create(
            &mut fb,
            &QuantizationParametersArgs { scale: Some(scale), zero_point: Some(zero_point), ..Default::default() },
        );
        let shape = fb.create_vector(&t.shape);
        let name = fb.create_string(t.name);
        flat_tensors.push(Tensor::create(
            &mut fb,
            &TensorArgs {
                shape: Some(shape),
                type_: t.ty,
                buffer,
                name: Some(name),
                quantization: Some(quantization),
                ..Default::default()
            },
        ));
    }

    let codes = [
        BuiltinOperator::CONV_2D,
        BuiltinOperator::ADD,
        BuiltinOperator::AVERAGE_POOL_2D,
        BuiltinOperator::FULLY_CONNECTED,
        BuiltinOperator::SOFTMAX,
    ];
    let code = |c: BuiltinOperator| codes.iter().position(|x| *x == c).unwrap() as u32;
    let conv = |fb: &mut FlatBufferBuilder<'_>| {
        Conv2DOptions::create(
            fb,
            &Conv2DOptionsArgs {
                padding: Padding::VALID,
                stride_w: 1,
                stride_h: 1,
                dilation_w_factor: 1,
                dilation_h_factor: 1,
                fused_activation_function: ActivationFunctionType::NONE,
            },
        )
        .as_union_value()
    };
    let ops_spec = vec![
        (
            BuiltinOperator::CONV_2D,
            vec!["image", "centre/weights", "centre/bias"],
            "centre",
            BuiltinOptions::Conv2DOptions,
            conv(&mut fb),
        ),
        (
            BuiltinOperator::CONV_2D,
            vec!["image", "half/weights", "half/bias"],
            "half",
            BuiltinOptions::Conv2DOptions,
            conv(&mut fb),
        ),
        (
            BuiltinOperator::ADD,
            vec!["centre", "half"],
            "mix",
            BuiltinOptions::AddOptions,
            AddOptions::create(&mut fb, &AddOptionsArgs::default()).as_union_value(),
        ),
        (
            BuiltinOperator::AVERAGE_POOL_2D,
            vec!["mix"],
            "pooled",
            BuiltinOptions::Pool2DOptions,
            Pool2DOptions::create(
                &mut fb,
                &Pool2DOptionsArgs {
                    padding: Padding::VALID,
                    stride_w: 1,
                    stride_h: 1,
                    filter_width: side,
                    filter_height: side,
                    fused_activation_function: ActivationFunctionType::NONE,
                },
            )
            .as_union_value(),
        ),
        (
            BuiltinOperator::FULLY_CONNECTED,
            vec!["pooled", "head/weights", "head/bias"],
            "logits",
            BuiltinOptions::FullyConnectedOptions,
            FullyConnectedOptions::create(&mut fb, &FullyConnectedOptionsArgs::default()).as_union_value(),
        ),
        (
            BuiltinOperator::SOFTMAX,
            vec!["logits"],
            "scores",
            BuiltinOptions::SoftmaxOptions,
            SoftmaxOptions::create(&mut fb, &SoftmaxOptionsArgs { beta: 1.0 }).as_union_value(),
        ),
    ];
    let mut ops = vec![];
    for (op, inputs, output, options_type, options) in ops_spec {
        let inputs: Vec<i32> = inputs.iter().map(|n| ix(n)).collect();
        let inputs = fb.create_vector(&inputs);
        let outputs = fb.create_vector(&[ix(output)]);
        ops.push(Operator::create(
            &mut fb,
            &OperatorArgs {
                opcode_index: code(op),
                inputs: Some(inputs),
                outputs: Some(outputs),
                builtin_options_type: options_type,
                builtin_options: Some(options),
                ..Default::default()
            },
        ));
    }
    let flat_tensors = fb.create_vector(&flat_tensors);
    let inputs = fb.create_vector(&[ix("image")]);
    let outputs = fb.create_vector(&[ix("scores")]);
    let ops = fb.create_vector(&ops);
    let subgraph = SubGraph::create(
        &mut fb,
        &SubGraphArgs {
            tensors: Some(flat_tensors),
            inputs: Some(inputs),
            outputs: Some(outputs),
            operators: Some(ops),
            ..Default::default()
        },
    );
    let codes: Vec<_> = codes
        .iter()
        .map(|&c| {
            OperatorCode::create(
                &mut fb,
                &OperatorCodeArgs {
                    deprecated_builtin_code: c.0 as i8,
                    builtin_code: c,
                    version: 1,
                    ..Default::default()
                },
            )
        })
        .collect();
    let codes = fb.create_vector(&codes);
    let subgraphs = fb.create_vector(&[subgraph]);
    let buffers = fb.create_vector(&buffers);
    let description = fb.create_string("classifier's mock dominant-colour model");
    let model = Model::create(
        &mut fb,
        &ModelArgs {
            version: 3,
            operator_codes: Some(codes),
            subgraphs: Some(subgraphs),
            description: Some(description),
            buffers: Some(buffers),
            ..Default::default()
        },
    );
    finish_model_buffer(&mut fb, model);

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("mock_model.tflite"), fb.finished_data())?;
    // Not in id order, as the real label map is not.
    std::fs::write(dir.join("mock_labels.csv"), "id,name\n2,blue\n0,red\n1,green\n")?;
    println!("wrote {} bytes to {}", fb.finished_data().len(), dir.join("mock_model.tflite").display());
    Ok(())
}
