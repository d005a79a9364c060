//! ONNX models, through tract-onnx: the same engine as the TFLite path, so
//! the graph ends as the same `TypedModel`, optimized by the same passes
//! (the tool's own convolutions where they match) into the same plan.
//!
//! An ONNX file is not rebuilt as a TFLite one is: tract-onnx runs float
//! graphs as they are. What it needs from the tool is a fixed input shape:
//! exporters mark the batch axis dynamic (`N`, `batch_size`, or no name),
//! and the plan is made for one image, so that axis is fixed to 1. Any
//! other dynamic axis (an image size left open) has no value the tool could
//! choose, and is an error naming it.
//!
//! The bytes are untrusted: the protobuf is decoded by prost, which checks
//! every length; a tensor stored in an external file is refused by tract,
//! which reads none without a model folder (and none is given); and tract's
//! loading runs under the model's panic guard.

use std::collections::HashSet;

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::pb::type_proto::Value as Type;
use tract_onnx::pb::{ModelProto, ValueInfoProto};
use tract_onnx::prelude::*;

use tract_onnx::tract_core::ops::cast::cast;

use super::{MeanStd, ModelError, Normalization, guarded};

#[cfg(test)]
pub(crate) mod synthetic;

/// The ONNX model in `bytes` as a typed tract graph, its input fixed to one
/// float32 image, and how pixels are to be normalised for it.
///
/// A model that takes uint8 pixels does its own normalisation: it gets the
/// pixel values as they are, cast to uint8 by the graph's first node, so
/// that every model reads float32 and one `Session` serves them all.
pub(super) fn load(bytes: &[u8], given: Option<MeanStd>) -> Result<(TypedModel, Normalization), ModelError> {
    let onnx = tract_onnx::onnx();
    let proto = guarded(|| onnx.proto_model_for_read(&mut &*bytes)).map_err(|e| match e {
        ModelError::Tract(e) => ModelError::Onnx(format!("malformed ONNX protobuf: {e:#}")),
        other => other,
    })?;
    let graph = proto.graph.as_ref().ok_or_else(no_graph)?;
    if let Some(node) = graph.node.iter().find(|node| !onnx.op_register.0.contains_key(&node.op_type)) {
        return Err(ModelError::Onnx(format!(
            "unsupported ONNX operator {} (node {:?}): tract-onnx does not implement it",
            node.op_type, node.name
        )));
    }
    let (element, shape) = input_shape(&proto)?;
    let model = guarded(|| {
        let mut model = onnx.model_for_proto_model(&proto)?;
        model.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), &shape))?;
        if element == DataType::Uint8 {
            let pixels = model.input_outlets()?[0];
            let readers = model.outlet_successors(pixels).to_vec();
            let cast = model.wire_node("pixels as uint8", cast(u8::datum_type()), &[pixels])?[0];
            for reader in readers {
                model.add_edge(cast, reader)?;
            }
        }
        model.into_typed()
    })?;
    let normalization = match (given, element) {
        (Some(given), _) => Normalization::from(given),
        (None, DataType::Uint8) => Normalization::uniform(1.0, 0.0),
        (None, _) => {
            tracing::warn!(
                "the model says nothing of how its float input is normalized: guessing mean 127.5 and std 127.5 \
                 (pixels in [-1, 1]); --mean and --std say otherwise"
            );
            Normalization::from(MeanStd::MOBILENET)
        }
    };
    Ok((model, normalization))
}

/// The image input's element type and shape, its batch axis fixed to 1,
/// after checking that the graph takes one float32 or uint8 tensor of rank
/// 4 with no other dynamic axis.
fn input_shape(proto: &ModelProto) -> Result<(DataType, Vec<usize>), ModelError> {
    let not_classifier = |m: String| ModelError::NotAClassifier(m);
    let graph = proto.graph.as_ref().ok_or_else(no_graph)?;
    // Older exporters list the weights among the inputs too.
    let weights: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&ValueInfoProto> = graph.input.iter().filter(|i| !weights.contains(i.name.as_str())).collect();
    let [input] = inputs[..] else {
        return Err(not_classifier(format!("{} inputs, expected one", inputs.len())));
    };
    let Some(Type::TensorType(tensor)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(not_classifier(format!("input {:?} is not a tensor", input.name)));
    };
    let element = DataType::try_from(tensor.elem_type).ok().filter(|t| [DataType::Float, DataType::Uint8].contains(t));
    let Some(element) = element else {
        let name = DataType::try_from(tensor.elem_type).map_or("of an unknown type", |t| t.as_str_name());
        return Err(not_classifier(format!("input {:?} is {name}, expected FLOAT or UINT8", input.name)));
    };
    let Some(dims) = tensor.shape.as_ref().map(|s| &s.dim) else {
        return Err(not_classifier(format!("input {:?} has no shape", input.name)));
    };
    if dims.len() != 4 {
        return Err(not_classifier(format!(
            "input {:?} has {} axes, expected [1, 3, height, width] or [1, height, width, 3]",
            input.name,
            dims.len()
        )));
    }
    let mut shape = Vec::with_capacity(4);
    let mut dynamic = vec![];
    for (axis, dim) in dims.iter().enumerate() {
        match &dim.value {
            Some(Dim::DimValue(v)) if *v > 0 => shape.push(usize::try_from(*v).unwrap_or(usize::MAX)),
            // The batch axis, whatever its name: one image at a time.
            _ if axis == 0 => shape.push(1),
            Some(Dim::DimParam(name)) if !name.is_empty() => dynamic.push(format!("axis {axis} ({name})")),
            _ => dynamic.push(format!("axis {axis}")),
        }
    }
    if !dynamic.is_empty() {
        return Err(not_classifier(format!(
            "input {:?} has a dynamic {}: only the batch axis (0) may be dynamic",
            input.name,
            dynamic.join(" and ")
        )));
    }
    Ok((element, shape))
}

/// Whether the model's outputs already are probabilities: its graph ends in
/// a softmax or a sigmoid, past any op that only reshapes.
pub(super) fn gives_probabilities(model: &TypedModel) -> bool {
    let Some(mut outlet) = model.outputs.first().copied() else { return false };
    loop {
        let node = model.node(outlet.node);
        let name = node.op().name();
        match &*name {
            "Softmax" | "Sigmoid" => return true,
            "AddAxis" | "RmAxis" | "MoveAxis" | "Reshape" | "IntoShape" | "Cast" => match node.inputs.first() {
                Some(&input) => outlet = input,
                None => return false,
            },
            _ => return name.contains("Sigmoid"),
        }
    }
}

fn no_graph() -> ModelError {
    ModelError::Onnx("the ONNX model has no graph".into())
}

#[cfg(test)]
mod tests {
    use super::synthetic::{self, dynamic, fixed};
    use super::*;
    use crate::model::{Channels, Layout, Model};

    /// An image of `width` x `height` pixels, each `pixel(x, y)`.
    fn picture(width: usize, height: usize, pixel: impl Fn(usize, usize) -> [u8; 3]) -> Vec<u8> {
        let pixel = &pixel;
        (0..height).flat_map(|y| (0..width).flat_map(move |x| pixel(x, y))).collect()
    }

    fn normalised(p: u8) -> f32 {
        p as f32 / 127.5 - 1.0
    }

    /// What the colour models answer: softmax(2 * mean of each channel).
    fn colour_scores(image: &[u8]) -> Vec<f32> {
        let pixels = (image.len() / 3) as f32;
        let logits: Vec<f32> = (0..3)
            .map(|c| 2.0 * image.iter().skip(c).step_by(3).map(|&p| normalised(p)).sum::<f32>() / pixels)
            .collect();
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        logits.iter().map(|l| l.exp() / total).collect()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5), "{got:?} vs {want:?}");
    }

    /// Red on the left, a blue-green gradient down the rows: a layout that
    /// read rows for columns or planes for pixels would score it otherwise.
    fn uneven(width: usize, height: usize) -> Vec<u8> {
        picture(width, height, |x, y| [if x < width / 2 { 250 } else { 20 }, (y * 60) as u8, 255 - (x * 40) as u8])
    }

    #[test]
    fn an_nchw_model_with_a_dynamic_batch_scores_as_predicted() {
        let model = Model::from_bytes(&synthetic::colour_nchw(), 1).unwrap();
        let input = model.input();
        assert_eq!((input.width, input.height, input.layout, model.classes()), (6, 4, Layout::Nchw, 3));
        let image = uneven(6, 4);
        assert_close(&model.classify(&[&image]).unwrap()[0], &colour_scores(&image));
        let red = picture(6, 4, |_, _| [255, 0, 0]);
        let scores = model.classify(&[&red]).unwrap().remove(0);
        assert!(scores[0] > 0.96, "{scores:?}");
    }

    #[test]
    fn an_nhwc_onnx_model_with_a_rank_4_output_scores_as_predicted() {
        let model = Model::from_bytes(&synthetic::colour_nhwc(), 1).unwrap();
        let input = model.input();
        assert_eq!((input.width, input.height, input.layout, model.classes()), (6, 4, Layout::Nhwc, 3));
        let image = uneven(6, 4);
        assert_close(&model.classify(&[&image]).unwrap()[0], &colour_scores(&image));
    }

    #[test]
    fn bgr_swaps_the_channels_the_model_reads() {
        let image = uneven(6, 4);
        let swapped: Vec<u8> = image.chunks(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
        for bytes in [synthetic::colour_nchw(), synthetic::colour_nhwc()] {
            let model = Model::from_bytes(&bytes, 1).unwrap().with_channels(Channels::Bgr);
            assert_eq!(model.input().channels, Channels::Bgr);
            assert_close(&model.classify(&[&image]).unwrap()[0], &colour_scores(&swapped));
        }
        // Pure red reads as blue.
        let model = Model::from_bytes(&synthetic::colour_nchw(), 1).unwrap().with_channels(Channels::Bgr);
        let red = picture(6, 4, |_, _| [255, 0, 0]);
        let scores = model.classify(&[&red]).unwrap().remove(0);
        assert!(scores[2] > 0.96, "{scores:?}");
    }

    #[test]
    fn each_pixel_lands_where_an_nchw_model_reads_it() {
        let model = Model::from_bytes(&synthetic::pixels(vec![dynamic(""), fixed(3), fixed(2), fixed(3)]), 1).unwrap();
        let input = model.input();
        assert_eq!((input.width, input.height, input.layout, model.classes()), (3, 2, Layout::Nchw, 6));
        let image = picture(3, 2, |x, y| [(x * 50 + y * 100) as u8, 7, 9]);
        let want: Vec<f32> = image.chunks(3).map(|p| normalised(p[0])).collect();
        assert_close(&model.classify(&[&image]).unwrap()[0], &want);
        // With BGR, the model's first plane is the image's blue.
        let bgr = model.with_channels(Channels::Bgr);
        assert_close(&bgr.classify(&[&image]).unwrap()[0], &[normalised(9); 6]);
    }

    #[test]
    fn a_uint8_input_gets_the_pixel_values_as_they_are() {
        let model = Model::from_bytes(&synthetic::input_of_type(DataType::Uint8), 1).unwrap();
        assert_eq!(model.input().normalization, Normalization::uniform(1.0, 0.0));
        let image = picture(2, 2, |x, y| [(x * 10 + y * 20) as u8, 255, 0]);
        let scores = model.classify(&[&image]).unwrap().remove(0);
        // The model's output is its input, flattened, channels first.
        assert_eq!(scores, [0., 10., 20., 30., 255., 255., 255., 255., 0., 0., 0., 0.]);
    }

    #[test]
    fn three_by_three_onnx_input_is_channels_first() {
        let model = Model::from_bytes(&synthetic::pixels(vec![dynamic("N"), fixed(3), fixed(5), fixed(3)]), 1).unwrap();
        let input = model.input();
        assert_eq!((input.width, input.height, input.layout), (3, 5, Layout::Nchw));
    }

    fn load_error(bytes: &[u8]) -> String {
        Model::from_bytes(bytes, 1).unwrap_err().to_string()
    }

    #[test]
    fn only_the_batch_axis_may_be_dynamic() {
        let error = load_error(&synthetic::pixels(vec![dynamic("N"), fixed(3), dynamic("height"), dynamic("")]));
        assert_eq!(
            error,
            "the model is not an image classifier: input \"pixels\" has a dynamic axis 2 (height) and axis 3: \
             only the batch axis (0) may be dynamic"
        );
        let error = load_error(&synthetic::pixels(vec![dynamic("N"), fixed(3), fixed(2)]));
        assert!(error.contains("has 3 axes, expected [1, 3, height, width] or [1, height, width, 3]"), "{error}");
        let error = load_error(&synthetic::pixels(vec![fixed(2), fixed(3), fixed(2), fixed(2)]));
        assert!(error.contains("input of shape [2, 3, 2, 2], expected"), "{error}");
    }

    #[test]
    fn unsupported_models_are_refused_with_the_reason() {
        assert_eq!(
            load_error(&synthetic::unknown_operator()),
            "unsupported ONNX operator Frobnicate (node \"scores\"): tract-onnx does not implement it"
        );
        assert_eq!(
            load_error(&synthetic::input_of_type(DataType::Double)),
            "the model is not an image classifier: input \"pixels\" is DOUBLE, expected FLOAT or UINT8"
        );
        let float = Model::from_bytes(&synthetic::input_of_type(DataType::Float), 1).unwrap();
        assert_eq!(float.classes(), 12);
    }

    #[test]
    fn garbage_and_truncated_onnx_is_an_error_not_a_panic() {
        let model = synthetic::colour_nchw();
        // A cut between two fields leaves a valid protobuf, which may even
        // load (without its opset, say): no panic is all that is asked.
        for len in 0..model.len() {
            let outcome = std::panic::catch_unwind(|| Model::from_bytes(&model[..len], 1).map(|_| ()));
            assert!(outcome.is_ok(), "a model cut at {len} bytes panicked");
        }
        let error = load_error(&model[..model.len() / 2]);
        assert!(error.starts_with("malformed ONNX protobuf: "), "{error}");
        for at in 0..model.len() {
            for flip in [0x01u8, 0x10, 0xff] {
                let mut corrupt = model.clone();
                corrupt[at] ^= flip;
                let outcome = std::panic::catch_unwind(|| Model::from_bytes(&corrupt, 1).map(|_| ()));
                assert!(outcome.is_ok(), "flipping {flip:#x} at byte {at} panicked");
            }
        }
    }

    #[test]
    fn an_onnx_model_in_a_tar_gz_loads() {
        let mut tar = tar::Builder::new(vec![]);
        let model = synthetic::colour_nchw();
        let mut header = tar::Header::new_gnu();
        header.set_size(model.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "model/colour.onnx", &model[..]).unwrap();
        let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
        let model = Model::from_bytes(&gz.finish().unwrap(), 1).unwrap();
        assert_eq!((model.input().layout, model.classes()), (Layout::Nchw, 3));
    }

    #[test]
    fn fixtures_are_what_the_generator_makes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for (name, bytes) in synthetic::fixtures() {
            let path = dir.join(name);
            if std::env::var_os("CLASSIFIER_WRITE_FIXTURES").is_some() {
                std::fs::write(&path, &bytes).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(committed == bytes, "{} differs from what the generator makes", path.display());
        }
    }
}
