//! Writes tiny classifiers of an image's dominant colour (red,
//! green, blue) to `fixtures/`, for the paths the birds model does not take:
//!
//! - `float_logits.tflite`: input `[1, 2, 2, 3]` float32 holding raw pixels
//!   (as the flowers tutorial's model does), no metadata, and raw logits out
//!   (no SOFTMAX): `logits = 0.01 * mean colour`. Fed `--mean 0 --std 1`, a
//!   pure red image has logits [2.55, 0, 0], softmax 0.8649; fed the
//!   MobileNet guess, [0.01, -0.01, -0.01], softmax 0.3378.
//! - `float_metadata.tflite`: the same network with a SOFTMAX, `scores =
//!   softmax(mean of the normalized colour)`, carrying TFLite metadata as
//!   tflite-support's populator writes it: the input's NormalizationOptions,
//!   mean 0 and std (25.5, 51, 102) per channel, so that pure red, green and
//!   blue become 10, 5 and 2.5 (softmax 0.99991, 0.9867, 0.8592), and two
//!   label files for the output in the zip appended to the flatbuffer: first
//!   `ids.txt` (no locale, ids) then `colours-en.txt` (locale `en`: red,
//!   green, blue), as the birds model has its `/m/` ids beside English names.
//!
//! - `float_nchw.tflite`: `float_logits.tflite` taking `[1, 3, 2, 2]`
//!   (channels first, as models converted from PyTorch do), turned to NHWC
//!   by a TRANSPOSE first.
//! - `int8_logits.tflite`: `float_logits.tflite` in int8, input included:
//!   the input's quantization (scale 1, zero point -128) says it takes raw
//!   pixels, so it needs no option; its logits come out int8 (scale 0.0125,
//!   zero point -128), [2.55, 0, 0] for pure red, exactly on the grid.
//!
//! Run: `cargo run --example make_float_models`

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use tract_tflite::tflite::*;

struct T {
    name: &'static str,
    shape: Vec<i32>,
    ty: TensorType,
    /// Little-endian values, for a constant.
    data: Option<Vec<u8>>,
    /// Scale and zero point, for a quantized tensor.
    quant: Option<(f32, i64)>,
}

impl T {
    fn float(name: &'static str, shape: Vec<i32>, data: Option<Vec<f32>>) -> T {
        let data = data.map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect());
        T { name, shape, ty: TensorType::FLOAT32, data, quant: None }
    }
}

/// How the network is written.
#[derive(Default)]
struct Spec<'a> {
    gain: f32,
    softmax: bool,
    metadata: Option<&'a [u8]>,
    /// `[1, 3, 2, 2]` in, and a TRANSPOSE to NHWC.
    channels_first: bool,
    /// Every tensor int8, the input taking raw pixels.
    int8: bool,
}

/// The network: AVERAGE_POOL_2D over the 2x2 image, FULLY_CONNECTED with
/// `gain` times the identity, then SOFTMAX if `softmax`; with `metadata` as
/// the model's TFLITE_METADATA.
fn model(spec: Spec) -> Vec<u8> {
    let Spec { gain, softmax, metadata, channels_first, int8 } = spec;
    let identity: Vec<f32> = (0..3).flat_map(|o| (0..3).map(move |i| if o == i { gain } else { 0.0 })).collect();
    let mut tensors = if int8 {
        // Raw pixels: q = pixel - 128 is the pixel itself at scale 1.
        let pixels = Some((1.0, -128));
        let weight_scale = gain / 127.0;
        let weights = identity.iter().map(|w| (w / weight_scale).round() as i8 as u8).collect();
        let int8 = |name, shape, quant| T { name, shape, ty: TensorType::INT8, data: None, quant };
        vec![
            int8("image", vec![1, 2, 2, 3], pixels),
            int8("pooled", vec![1, 1, 1, 3], pixels),
            T { data: Some(weights), ..int8("head/weights", vec![3, 3], Some((weight_scale, 0))) },
            T {
                name: "head/bias",
                shape: vec![3],
                ty: TensorType::INT32,
                data: Some(vec![0; 12]),
                quant: Some((weight_scale, 0)),
            },
            int8("logits", vec![1, 3], Some((0.0125, -128))),
        ]
    } else {
        vec![
            T::float("image", vec![1, 2, 2, 3], None),
            T::float("pooled", vec![1, 1, 1, 3], None),
            T::float("head/weights", vec![3, 3], Some(identity)),
            T::float("head/bias", vec![3], Some(vec![0.0; 3])),
            T::float("logits", vec![1, 3], None),
        ]
    };
    if softmax {
        tensors.push(T::float("scores", vec![1, 3], None));
    }
    if channels_first {
        tensors[0].name = "nhwc";
        tensors.push(T::float("image", vec![1, 3, 2, 2], None));
        let perm: Vec<u8> = [0i32, 2, 3, 1].iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push(T { name: "perm", shape: vec![4], ty: TensorType::INT32, data: Some(perm), quant: None });
    }
    let ix = |name: &str| tensors.iter().position(|t| t.name == name).unwrap() as i32;

    let mut fb = FlatBufferBuilder::new();
    let mut buffers = vec![Buffer::create(&mut fb, &BufferArgs { data: None })];
    let mut flat_tensors = vec![];
    for t in &tensors {
        let buffer = match &t.data {
            Some(bytes) => {
                let data = fb.create_vector(bytes);
                buffers.push(Buffer::create(&mut fb, &BufferArgs { data: Some(data) }));
                buffers.len() as u32 - 1
            }
            None => 0,
        };
        let (shape, name) = (fb.create_vector(&t.shape), fb.create_string(t.name));
        let quantization = t.quant.map(|(scale, zero_point)| {
            let (scale, zero_point) = (fb.create_vector(&[scale]), fb.create_vector(&[zero_point]));
            QuantizationParameters::create(
                &mut fb,
                &QuantizationParametersArgs { scale: Some(scale), zero_point: Some(zero_point), ..Default::default() },
            )
        });
        flat_tensors.push(Tensor::create(
            &mut fb,
            &TensorArgs {
                shape: Some(shape),
                type_: t.ty,
                buffer,
                name: Some(name),
                quantization,
                ..Default::default()
            },
        ));
    }
    let metadata = metadata.map(|bytes| {
        let data = fb.create_vector(bytes);
        buffers.push(Buffer::create(&mut fb, &BufferArgs { data: Some(data) }));
        let name = fb.create_string("TFLITE_METADATA");
        let entry = Metadata::create(&mut fb, &MetadataArgs { name: Some(name), buffer: buffers.len() as u32 - 1 });
        fb.create_vector(&[entry])
    });

    let mut codes = vec![BuiltinOperator::AVERAGE_POOL_2D, BuiltinOperator::FULLY_CONNECTED, BuiltinOperator::SOFTMAX];
    if channels_first {
        codes.push(BuiltinOperator::TRANSPOSE);
    }
    let code = |c: BuiltinOperator| codes.iter().position(|x| *x == c).unwrap() as u32;
    let pool = Pool2DOptions::create(
        &mut fb,
        &Pool2DOptionsArgs {
            padding: Padding::VALID,
            stride_w: 1,
            stride_h: 1,
            filter_width: 2,
            filter_height: 2,
            fused_activation_function: ActivationFunctionType::NONE,
        },
    )
    .as_union_value();
    let dense = FullyConnectedOptions::create(&mut fb, &FullyConnectedOptionsArgs::default()).as_union_value();
    let mut ops_spec = vec![];
    if channels_first {
        let options = TransposeOptions::create(&mut fb, &TransposeOptionsArgs {}).as_union_value();
        ops_spec.push((
            BuiltinOperator::TRANSPOSE,
            vec!["image", "perm"],
            "nhwc",
            BuiltinOptions::TransposeOptions,
            options,
        ));
    }
    let pooled = if channels_first { "nhwc" } else { "image" };
    ops_spec.extend([
        (BuiltinOperator::AVERAGE_POOL_2D, vec![pooled], "pooled", BuiltinOptions::Pool2DOptions, pool),
        (
            BuiltinOperator::FULLY_CONNECTED,
            vec!["pooled", "head/weights", "head/bias"],
            "logits",
            BuiltinOptions::FullyConnectedOptions,
            dense,
        ),
    ]);
    if softmax {
        let options = SoftmaxOptions::create(&mut fb, &SoftmaxOptionsArgs { beta: 1.0 }).as_union_value();
        ops_spec.push((BuiltinOperator::SOFTMAX, vec!["logits"], "scores", BuiltinOptions::SoftmaxOptions, options));
    }
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
    let outputs = fb.create_vector(&[ix(if softmax { "scores" } else { "logits" })]);
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
    let description = fb.create_string("classifier's float dominant-colour model");
    let model = Model::create(
        &mut fb,
        &ModelArgs {
            version: 3,
            operator_codes: Some(codes),
            subgraphs: Some(subgraphs),
            description: Some(description),
            buffers: Some(buffers),
            metadata,
            ..Default::default()
        },
    );
    finish_model_buffer(&mut fb, model);
    fb.finished_data().to_vec()
}

/// A `ModelMetadata` (tflite-support's metadata_schema.fbs; a field's slot
/// is `4 + 2 * its id`) whose input has NormalizationOptions `mean`, `std`
/// and whose output has the label files `(name, locale)`.
fn metadata(mean: &[f32], std: &[f32], labels: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut fb = FlatBufferBuilder::new();
    let (mean, std) = (fb.create_vector(mean), fb.create_vector(std));
    let start = fb.start_table();
    fb.push_slot_always(4, mean); // NormalizationOptions.mean
    fb.push_slot_always(6, std); // NormalizationOptions.std
    let options = fb.end_table(start);
    let start = fb.start_table();
    fb.push_slot_always::<u8>(4, 1); // ProcessUnit.options_type: NormalizationOptions
    fb.push_slot_always(6, options); // ProcessUnit.options
    let unit = fb.end_table(start);
    let units = fb.create_vector(&[unit]);
    let files: Vec<WIPOffset<_>> = labels
        .iter()
        .map(|(name, locale)| {
            let name = fb.create_string(name);
            let locale = locale.map(|l| fb.create_string(l));
            let start = fb.start_table();
            fb.push_slot_always(4, name); // AssociatedFile.name
            fb.push_slot_always::<i8>(8, 2); // AssociatedFile.type: TENSOR_AXIS_LABELS
            if let Some(locale) = locale {
                fb.push_slot_always(10, locale); // AssociatedFile.locale
            }
            fb.end_table(start)
        })
        .collect();
    let files = fb.create_vector(&files);
    let name = fb.create_string("image");
    let start = fb.start_table();
    fb.push_slot_always(4, name); // TensorMetadata.name
    fb.push_slot_always(12, units); // TensorMetadata.process_units
    let input = fb.end_table(start);
    let name = fb.create_string("probability");
    let start = fb.start_table();
    fb.push_slot_always(4, name);
    fb.push_slot_always(16, files); // TensorMetadata.associated_files
    let output = fb.end_table(start);
    let (inputs, outputs) = (fb.create_vector(&[input]), fb.create_vector(&[output]));
    let start = fb.start_table();
    fb.push_slot_always(8, inputs); // SubGraphMetadata.input_tensor_metadata
    fb.push_slot_always(10, outputs); // SubGraphMetadata.output_tensor_metadata
    let subgraph = fb.end_table(start);
    let subgraphs = fb.create_vector(&[subgraph]);
    let name = fb.create_string("dominant colour");
    let start = fb.start_table();
    fb.push_slot_always(4, name); // ModelMetadata.name
    fb.push_slot_always(10, subgraphs); // ModelMetadata.subgraph_metadata
    let root = fb.end_table(start);
    fb.finish(root, Some("M001"));
    fb.finished_data().to_vec()
}

/// A zip of stored files whose offsets count from its own start, as
/// Python's zipfile appends one to a model file.
fn stored_zip(files: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut zip, mut directory) = (vec![], vec![]);
    for (name, data) in files {
        let fixed = |zip: &mut Vec<u8>| {
            zip.extend(20u16.to_le_bytes()); // version needed
            zip.extend([0u8; 8]); // flags, method (stored), time, date
            zip.extend(crc32fast::hash(data).to_le_bytes());
            zip.extend((data.len() as u32).to_le_bytes()); // packed
            zip.extend((data.len() as u32).to_le_bytes()); // unpacked
            zip.extend((name.len() as u16).to_le_bytes());
            zip.extend(0u16.to_le_bytes()); // extra
        };
        directory.extend(0x0201_4b50u32.to_le_bytes());
        directory.extend(20u16.to_le_bytes()); // made by
        fixed(&mut directory);
        directory.extend([0u8; 10]); // comment, disk, internal and external attributes
        directory.extend((zip.len() as u32).to_le_bytes());
        directory.extend(name.as_bytes());
        zip.extend(0x0403_4b50u32.to_le_bytes());
        fixed(&mut zip);
        zip.extend(name.as_bytes());
        zip.extend(*data);
    }
    let offset = zip.len() as u32;
    zip.extend(&directory);
    zip.extend(0x0605_4b50u32.to_le_bytes());
    zip.extend([0u8; 4]); // disks
    zip.extend((files.len() as u16).to_le_bytes());
    zip.extend((files.len() as u16).to_le_bytes());
    zip.extend((directory.len() as u32).to_le_bytes());
    zip.extend(offset.to_le_bytes());
    zip.extend(0u16.to_le_bytes()); // comment
    zip
}

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    std::fs::create_dir_all(&dir)?;
    let logits = model(Spec { gain: 0.01, ..Spec::default() });
    std::fs::write(dir.join("float_logits.tflite"), &logits)?;
    let nchw = model(Spec { gain: 0.01, channels_first: true, ..Spec::default() });
    std::fs::write(dir.join("float_nchw.tflite"), &nchw)?;
    let int8 = model(Spec { gain: 0.01, int8: true, ..Spec::default() });
    std::fs::write(dir.join("int8_logits.tflite"), &int8)?;

    let labels = [("ids.txt", None), ("colours-en.txt", Some("en"))];
    let described = metadata(&[0.0], &[25.5, 51.0, 102.0], &labels);
    let mut with_metadata = model(Spec { gain: 1.0, softmax: true, metadata: Some(&described), ..Spec::default() });
    with_metadata.extend(stored_zip(&[("ids.txt", b"/c/r\n/c/g\n/c/b\n"), ("colours-en.txt", b"red\ngreen\nblue\n")]));
    std::fs::write(dir.join("float_metadata.tflite"), &with_metadata)?;
    for (name, bytes) in
        [("float_logits", &logits), ("float_nchw", &nchw), ("int8_logits", &int8), ("float_metadata", &with_metadata)]
    {
        println!("wrote {name}.tflite ({} bytes)", bytes.len());
    }
    Ok(())
}
