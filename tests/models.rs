//! The binary on the project's small models (`fixtures/float_logits.tflite`,
//! `float_nchw.tflite`, `int8_logits.tflite` and `float_metadata.tflite`,
//! written by `cargo run --example make_float_models`, which says what they
//! compute): where the input's
//! normalization, the scores and the labels come from, in their order of
//! precedence, and the errors of a broken metadata.

use std::path::{Path, PathBuf};
use std::process::Output;

use image::{Rgb, RgbImage};
use serde_json::Value;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name).display().to_string()
}

/// A file in this test binary's own temporary folder.
fn temp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("models");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A PNG of one colour. Written aside and moved into place: the tests run
/// at once, and one must never read the file while another rewrites it (a
/// run once read it empty).
fn image(name: &str, rgb: [u8; 3]) -> String {
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = temp(&format!("{name}.png"));
    let aside = temp(&format!("{name}.{}.png", WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    RgbImage::from_pixel(6, 4, Rgb(rgb)).save(&aside).unwrap();
    std::fs::rename(&aside, &path).unwrap();
    path.display().to_string()
}

fn red() -> String {
    image("red", [255, 0, 0])
}

fn run(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_classifier"))
        .args(["--no-cache", "--top-k", "3"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// The JSON records of a run that must succeed, and its stderr.
fn records(args: &[&str]) -> (Vec<Value>, String) {
    let out = run(&[&["--format", "json"], args].concat());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{args:?}: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    (stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect(), stderr)
}

/// The best prediction of the only record: (index, label, score).
fn top1(args: &[&str]) -> (u64, Value, f64) {
    let (records, _) = records(args);
    assert_eq!(records.len(), 1);
    let best = &records[0]["predictions"][0];
    (best["index"].as_u64().unwrap(), best["label"].clone(), best["score"].as_f64().unwrap())
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() < 1e-3
}

#[test]
fn logits_become_probabilities_unless_raw_is_asked() {
    let (model, red) = (fixture("float_logits.tflite"), red());
    let raw_pixels = ["--model", &model, "--mean", "0", "--std", "1", &red];
    // logits [2.55, 0, 0]
    let (index, label, score) = top1(&raw_pixels);
    assert_eq!((index, &label), (0, &Value::Null), "no labels given and none in the model");
    assert!(close(score, 0.8649), "softmax of the logits: {score}");
    let (_, _, score) = top1(&[&raw_pixels[..], &["--scores", "raw"]].concat());
    assert!(close(score, 2.55), "the logit itself: {score}");
    let (_, _, score) = top1(&[&raw_pixels[..], &["--scores", "softmax"]].concat());
    assert!(close(score, 0.8649), "{score}");
}

/// `float_nchw.tflite` takes `[1, 3, 2, 2]`: fed in NHWC order, a pure
/// colour would spread over the three channels and every class would tie.
#[test]
fn a_channels_first_tflite_model_is_fed_channels_first() {
    let model = fixture("float_nchw.tflite");
    let logits = fixture("float_logits.tflite");
    for (index, rgb) in [[255, 0, 0], [0, 255, 0], [0, 0, 255], [40, 200, 90]].into_iter().enumerate() {
        let picture = image(&format!("colour{index}"), rgb);
        let (nchw, _) = records(&["--model", &model, "--mean", "0", "--std", "1", "--scores", "raw", &picture]);
        let (nhwc, _) = records(&["--model", &logits, "--mean", "0", "--std", "1", "--scores", "raw", &picture]);
        assert_eq!(nchw[0]["predictions"], nhwc[0]["predictions"], "{rgb:?}");
    }
    let (index, _, score) = top1(&["--model", &model, "--mean", "0", "--std", "1", &image("blue", [0, 0, 255])]);
    assert!(index == 2 && close(score, 0.8649), "{index} {score}");
}

/// `int8_logits.tflite` takes int8 raw pixels (scale 1, zero point -128):
/// its quantization is its normalization, no option needed, no guess
/// warned of; its int8 logits are dequantized, then their softmax taken.
#[test]
fn an_int8_input_is_normalized_by_its_quantization() {
    let model = fixture("int8_logits.tflite");
    let out = run(&["--model", &model, "--format", "json", &red()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("127.5"), "{stderr}");
    let (index, label, score) = top1(&["--model", &model, &red()]);
    assert_eq!((index, label), (0, Value::Null));
    assert!(close(score, 0.8649), "softmax of the logits [2.55, 0, 0]: {score}");
    let (index, _, score) = top1(&["--model", &model, "--scores", "raw", &image("green", [0, 255, 0])]);
    assert!(index == 1 && close(score, 2.55), "{index} {score}");
    // Both arithmetics agree where every value is on its grid.
    let (_, _, float) = top1(&["--model", &model, "--arithmetic", "float", "--scores", "raw", &red()]);
    assert!(close(float, 2.55), "{float}");
}

#[test]
fn a_float_input_with_no_normalization_is_guessed_with_a_warning() {
    let (model, red) = (fixture("float_logits.tflite"), red());
    let out = run(&["--model", &model, &red]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("127.5") && stderr.contains("--mean") && stderr.contains("--std"), "{stderr}");
    // (255 - 127.5) / 127.5 = 1: logits [0.01, -0.01, -0.01].
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, format!("{red}\n  0.3378  class 0\n  0.3311  class 1\n  0.3311  class 2\n"));
    let out = run(&["--model", &model, "--mean", "0", "--std", "1", &red]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("127.5"), "no guess, no warning");
}

#[test]
fn labels_given_name_the_classes_and_must_fit() {
    let (model, red) = (fixture("float_logits.tflite"), red());
    let labels = fixture("mock_labels.csv");
    let (_, label, _) = top1(&["--model", &model, "--labels", &labels, "--mean", "0", "--std", "1", &red]);
    assert_eq!(label, "red");
    let two = temp("two-labels.txt");
    std::fs::write(&two, "red\ngreen\n").unwrap();
    let out = run(&["--model", &model, "--labels", two.to_str().unwrap(), "--mean", "0", "--std", "1", &red]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("names 2 classes but the model scores 3"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn the_metadata_gives_normalization_per_channel_and_english_labels() {
    let model = fixture("float_metadata.tflite");
    let colours = [image("red", [255, 0, 0]), image("green", [0, 255, 0]), image("blue", [0, 0, 255])];
    let (records, stderr) =
        records(&[&["--model", model.as_str()], &colours.each_ref().map(String::as_str)[..]].concat());
    assert!(!stderr.contains("WARN"), "{stderr}");
    // Std 25.5, 51 and 102: the full channel is 10, 5 and 2.5.
    let expected = [("red", 0.99991), ("green", 0.9867), ("blue", 0.8592)];
    for (record, (name, score)) in records.iter().zip(expected) {
        let best = &record["predictions"][0];
        assert_eq!(best["label"], name, "{record}");
        assert!(close(best["score"].as_f64().unwrap(), score), "{record}");
    }
}

#[test]
fn options_come_before_the_metadata() {
    let (model, red) = (fixture("float_metadata.tflite"), red());
    // (255 - 0) / 127.5 = 2: softmax 0.7870.
    let (_, label, score) = top1(&["--model", &model, "--mean", "0", "--std", "127.5", &red]);
    assert_eq!(label, "red");
    assert!(close(score, 0.7870), "{score}");
    let own = temp("own-labels.txt");
    std::fs::write(&own, "rouge\nvert\nbleu\n").unwrap();
    let (_, label, score) = top1(&["--model", &model, "--labels", own.to_str().unwrap(), &red]);
    assert_eq!(label, "rouge");
    // It ends in SOFTMAX: auto leaves its outputs alone, softmax does not.
    assert!(close(score, 0.99991), "{score}");
    let (_, _, score) = top1(&["--model", &model, "--scores", "softmax", &red]);
    assert!(close(score, 0.5761), "{score}");
}

/// `float_metadata.tflite` with `edit` applied, written to a file.
fn broken(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut bytes = std::fs::read(fixture("float_metadata.tflite")).unwrap();
    edit(&mut bytes);
    let path = temp(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn fails_to_load(model: &str) -> String {
    let out = run(&["--model", model, &red()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_broken_metadata_is_an_error_that_names_the_model() {
    let find = |bytes: &[u8], what: &[u8]| bytes.windows(what.len()).position(|w| w == what).unwrap();
    let model = broken("no-identifier.tflite", |b| {
        let at = find(b, b"M001");
        b[at + 3] = b'9';
    });
    let stderr = fails_to_load(&model);
    assert!(stderr.contains(&model) && stderr.contains("malformed TFLite metadata"), "{stderr}");

    // The std vector's first value set to 0: (pixel - mean) / 0.
    let model = broken("zero-std.tflite", |b| {
        let at = find(b, &25.5f32.to_le_bytes());
        b[at..at + 4].copy_from_slice(&0f32.to_le_bytes());
    });
    let stderr = fails_to_load(&model);
    assert!(stderr.contains(&model) && stderr.contains("std of 0"), "{stderr}");

    // The zip cut off: the label file the metadata names is not there.
    let model = broken("no-zip.tflite", |b| {
        let at = find(b, b"PK\x03\x04");
        b.truncate(at);
    });
    let stderr = fails_to_load(&model);
    assert!(stderr.contains(&model) && stderr.contains("colours-en.txt"), "{stderr}");
}
