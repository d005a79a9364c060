//! Fidelity against the reference runtime (LiteRT) on the real models and
//! photos in `../shared/fixtures`: for every image, the top-1 class must be
//! the reference's and its score within 0.1 of it. Skipped, with a message,
//! when the fixtures are absent.

use std::path::{Path, PathBuf};

use classifier::model::Model;
use classifier::{preprocess, rank};
use serde_json::Value;

fn shared() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipped: {} is absent", dir.display());
        None
    }
}

fn check(model: &Path, images: &Path, reference: &Path) {
    let model = Model::from_bytes(&std::fs::read(model).unwrap()).unwrap();
    let input = model.input();
    let reference = std::fs::read_to_string(reference).unwrap();
    let mut checked = 0;
    for line in reference.lines() {
        let expected: Value = serde_json::from_str(line).unwrap();
        let name = expected["image"].as_str().unwrap();
        let best = &expected["top"][0];
        let bytes = std::fs::read(images.join(name)).unwrap();
        let pixels = preprocess::prepare(&bytes, input.width, input.height).unwrap();
        let scores = model.classify(&[&pixels]).unwrap().remove(0);
        let top = rank::top_k(&scores, 1)[0];
        assert_eq!(top as u64, best["id"].as_u64().unwrap(), "{name}: top-1 differs from the reference");
        let (got, want) = (scores[top] as f64, best["score"].as_f64().unwrap());
        assert!((got - want).abs() <= 0.1, "{name}: score {got} vs reference {want}");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} reference images");
}

#[test]
fn birds_model_agrees_with_the_reference() {
    let Some(dir) = shared() else { return };
    let birds = dir.join("birds");
    check(&birds.join("model.tflite"), &birds.join("images"), &birds.join("reference.jsonl"));
}

#[test]
fn imagenet_model_agrees_with_the_reference() {
    let Some(dir) = shared() else { return };
    let imagenet = dir.join("imagenet");
    check(&imagenet.join("mobilenet_v2_quant.tflite"), &imagenet.join("images"), &imagenet.join("reference.jsonl"));
}

#[test]
fn tf2_int8_model_with_quantize_ops_agrees_with_the_reference() {
    let Some(dir) = shared() else { return };
    let imagenet = dir.join("imagenet");
    check(
        &imagenet.join("mobilenet_v2_tf2_ptq.tflite"),
        &imagenet.join("images"),
        &imagenet.join("reference_tf2_ptq.jsonl"),
    );
}

#[test]
fn imagenet_labels_txt_fits_its_model() {
    let Some(dir) = shared() else { return };
    let imagenet = dir.join("imagenet");
    let labels = classifier::labels::Labels::parse(&std::fs::read(imagenet.join("labels.txt")).unwrap()).unwrap();
    let model = Model::from_bytes(&std::fs::read(imagenet.join("mobilenet_v2_quant.tflite")).unwrap()).unwrap();
    labels.check_count(model.classes()).unwrap();
    assert_eq!(labels.get(0), Some("background"));
    let birds = classifier::labels::Labels::parse(&std::fs::read(dir.join("birds/labels.csv")).unwrap()).unwrap();
    assert_eq!(birds.len(), 965);
    assert_eq!(birds.get(964), Some("background"));
}
