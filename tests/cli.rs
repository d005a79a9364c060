//! End-to-end tests: the real binary against a loopback HTTP server, with the
//! project's mock model (the dominant colour of an image: red, green, blue).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

mod support;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(vec![]);
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn solid(rgb: [u8; 3]) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_pixel(48, 32, Rgb(rgb)))
}

fn png(rgb: [u8; 3]) -> Vec<u8> {
    encode(&solid(rgb), ImageFormat::Png)
}

const RED: [u8; 3] = [250, 10, 10];
const GREEN: [u8; 3] = [10, 250, 10];
const BLUE: [u8; 3] = [10, 10, 250];

/// A loopback server with the mock model and labels mounted.
async fn server() -> MockServer {
    let server = MockServer::start().await;
    serve(&server, "/model.tflite", std::fs::read(fixture("mock_model.tflite")).unwrap()).await;
    serve(&server, "/labels.csv", std::fs::read(fixture("mock_labels.csv")).unwrap()).await;
    server
}

async fn serve(server: &MockServer, at: &str, body: Vec<u8>) {
    Mock::given(method("GET"))
        .and(path(at))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(body))
        .mount(server)
        .await;
}

async fn run(args: Vec<String>) -> Output {
    run_with_env(args, &[]).await
}

/// `run` with these environment variables set as well.
async fn run_with_env(args: Vec<String>, env: &[(&str, &str)]) -> Output {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_classifier"))
            .args(&args)
            .env_remove("RUST_LOG")
            // Never the user's own cache; a test that wants one names it.
            .env("CLASSIFIER_CACHE_DIR", Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-cache"))
            .env_remove("CLASSIFIER_NO_CACHE")
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The arguments that point the binary at `server`'s mock model and labels.
fn mock_args(server: &MockServer, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        format!("{}/model.tflite", server.uri()),
        "--labels".to_string(),
        format!("{}/labels.csv", server.uri()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs against `server`'s mock model with `--format json` and `extra` args.
async fn classify(server: &MockServer, extra: &[&str]) -> (i32, Vec<Value>, String) {
    let mut args = mock_args(server, &["--format", "json"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run(args).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    let records = stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    (out.status.code().unwrap(), records, String::from_utf8(out.stderr).unwrap())
}

fn top1(record: &Value) -> (&str, f64) {
    let best = &record["predictions"][0];
    (best["label"].as_str().unwrap(), best["score"].as_f64().unwrap())
}

#[tokio::test]
async fn classifies_each_image_in_the_order_given() {
    let server = server().await;
    serve(&server, "/red.png", png(RED)).await;
    serve(&server, "/green.jpg", encode(&solid(GREEN), ImageFormat::Jpeg)).await;
    serve(&server, "/blue.bmp", encode(&solid(BLUE), ImageFormat::Bmp)).await;
    let urls: Vec<String> =
        ["blue.bmp", "red.png", "green.jpg"].iter().map(|f| format!("{}/{f}", server.uri())).collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (code, records, stderr) = classify(&server, &args).await;
    assert_eq!(code, 0, "{stderr}");
    let sources: Vec<&str> = records.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert_eq!(sources, args);
    let labels: Vec<&str> = records.iter().map(|r| top1(r).0).collect();
    assert_eq!(labels, ["blue", "red", "green"]);
    // The implied ReLU6 of the mock model shows in the score: 0.807 without
    // its top clamp, 0.919 without any.
    let (_, score) = top1(&records[1]);
    assert!((score - 0.7175).abs() < 0.02, "{score}");
    // Three predictions by default, best first, with their class index.
    let predictions = records[1]["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 3);
    assert_eq!(predictions[0]["index"], 0);
    assert!(predictions[0]["score"].as_f64() >= predictions[1]["score"].as_f64());
    // Logs and timings on stderr, results only on stdout.
    assert!(stderr.contains("done: 3 of 3 sources classified"), "{stderr}");
    assert!(stderr.contains("model_prepare"), "{stderr}");
}

#[tokio::test]
async fn arithmetic_float_turns_the_rounding_off() {
    let server = server().await;
    serve(&server, "/red.png", png(RED)).await;
    let red = format!("{}/red.png", server.uri());
    // The mock's softmax output is uint8 with a scale of 1/256: by default
    // its scores move in those steps, as the quantized runtime's do.
    let on_steps = |records: &[Value]| {
        let scores = records[0]["predictions"].as_array().unwrap().iter().map(|p| p["score"].as_f64().unwrap());
        scores.into_iter().all(|s| (s * 256.0 - (s * 256.0).round()).abs() < 1e-3)
    };
    let (code, quantized, stderr) = classify(&server, &[red.as_str()]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(on_steps(&quantized), "{quantized:?}");
    let (code, float, stderr) = classify(&server, &["--arithmetic", "float", red.as_str()]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(!on_steps(&float), "{float:?}");
    assert_eq!(top1(&quantized[0]).0, top1(&float[0]).0);
    let (code, _, stderr) = classify(&server, &["--arithmetic", "int4", red.as_str()]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--arithmetic"), "{stderr}");
}

#[tokio::test]
async fn arithmetic_rounded_rounds_in_float_as_quantized_does_in_integers() {
    let server = server().await;
    serve(&server, "/red.png", png(RED)).await;
    let red = format!("{}/red.png", server.uri());
    let (code, integers, stderr) = classify(&server, &[red.as_str()]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, rounded, stderr) = classify(&server, &["--arithmetic", "rounded", red.as_str()]).await;
    assert_eq!(code, 0, "{stderr}");
    let scores = |records: &[Value]| -> Vec<f64> {
        records[0]["predictions"].as_array().unwrap().iter().map(|p| p["score"].as_f64().unwrap()).collect()
    };
    assert_eq!(top1(&integers[0]).0, top1(&rounded[0]).0);
    for (a, b) in scores(&integers).iter().zip(scores(&rounded)) {
        assert!((a - b).abs() <= 2.0 / 256.0 + 1e-6, "{integers:?} vs {rounded:?}");
        assert!((b * 256.0 - (b * 256.0).round()).abs() < 1e-3, "{rounded:?} off the 1/256 steps");
    }
}

#[tokio::test]
async fn decode_fast_reduces_jpegs_and_exact_is_the_default() {
    let server = server().await;
    // A gradient: decoded at an eighth of its size, it low-passes otherwise.
    let gradient = RgbImage::from_fn(96, 64, |x, y| Rgb([(x * 2) as u8, (y * 3) as u8, ((x * y) % 251) as u8]));
    serve(&server, "/gradient.jpg", encode(&DynamicImage::ImageRgb8(gradient), ImageFormat::Jpeg)).await;
    let jpeg = format!("{}/gradient.jpg", server.uri());
    // In float, so that any difference in the pixels shows in the scores.
    let float = ["--arithmetic", "float"];
    let run = |extra: &'static [&'static str]| {
        let args: Vec<&str> = float.iter().chain(extra).copied().chain([jpeg.as_str()]).collect();
        let server = &server;
        async move { classify(server, &args).await }
    };
    let (code, default, stderr) = run(&[]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, exact, _) = run(&["--decode", "exact"]).await;
    assert_eq!(code, 0);
    let (code, fast, stderr) = run(&["--decode", "fast"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(default, exact);
    assert!(fast[0]["predictions"].is_array(), "{fast:?}");
    assert_ne!(fast, exact, "a reduced decode gave the whole decode's scores");
    let (code, _, stderr) = run(&["--decode", "quick"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--decode"), "{stderr}");
}

#[tokio::test]
async fn text_output_and_top_k() {
    let server = server().await;
    serve(&server, "/red.png", png(RED)).await;
    let red = format!("{}/red.png", server.uri());
    let out = run(mock_args(&server, &["--top-k", "2", "-q", &red])).await;
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0], format!("{}/red.png", server.uri()));
    assert!(lines[1].trim_start().ends_with("red (0)"), "{stdout}");
    assert!(out.stderr.is_empty(), "-q prints nothing on success: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn every_kind_of_bad_image_is_reported_and_the_good_ones_still_classified() {
    let server = server().await;
    serve(&server, "/good.png", png(GREEN)).await;
    Mock::given(path("/missing.jpg")).respond_with(ResponseTemplate::new(404)).mount(&server).await;
    Mock::given(path("/broken.jpg")).respond_with(ResponseTemplate::new(500)).mount(&server).await;
    Mock::given(path("/slow.jpg"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(png(RED)).set_delay(Duration::from_secs(10)))
        .mount(&server)
        .await;
    Mock::given(path("/page.jpg"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "text/html")
                .set_body_string("<!DOCTYPE html><html><body>Moved</body></html>"),
        )
        .mount(&server)
        .await;
    let jpeg = encode(&solid(RED), ImageFormat::Jpeg);
    serve(&server, "/truncated.jpg", jpeg[..jpeg.len() / 2].to_vec()).await;
    serve(&server, "/empty.jpg", vec![]).await;
    serve(&server, "/huge.png", huge_png_header()).await;
    serve(&server, "/big.png", encode(&DynamicImage::ImageRgb8(noise(300, 300)), ImageFormat::Png)).await;
    // A port that refuses connections: bound, then closed.
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/a.jpg", listener.local_addr().unwrap())
    };

    let uri = server.uri();
    let sources = vec![
        format!("{uri}/missing.jpg"),
        format!("{uri}/broken.jpg"),
        refused,
        format!("{uri}/slow.jpg"),
        format!("{uri}/page.jpg"),
        format!("{uri}/truncated.jpg"),
        format!("{uri}/empty.jpg"),
        format!("{uri}/huge.png"),
        format!("{uri}/big.png"),
        "ftp://example.org/bird.jpg".to_string(),
        "/nonexistent/bird.jpg".to_string(),
        format!("{uri}/good.png"),
    ];
    let mut args: Vec<&str> = vec!["--timeout", "1", "--max-image-bytes", "100000"];
    args.extend(sources.iter().map(String::as_str));
    let (code, records, stderr) = classify(&server, &args).await;
    assert_eq!(code, 1, "some sources failed: {stderr}");
    assert_eq!(records.len(), sources.len());
    let error = |i: usize| records[i]["error"].as_str().unwrap_or_else(|| panic!("no error in {}", records[i]));
    assert_eq!(error(0), "HTTP 404 Not Found");
    assert_eq!(error(1), "HTTP 500 Internal Server Error");
    assert!(error(2).starts_with("cannot connect"), "{}", error(2));
    assert_eq!(error(3), "timed out after 1 s");
    assert_eq!(error(4), "not an image (the content is an HTML page)");
    assert!(error(5).starts_with("cannot decode JPEG image"), "{}", error(5));
    assert_eq!(error(6), "empty body");
    assert_eq!(error(7), "image of 50000x50000 pixels is larger than the limit of 16384x16384");
    assert_eq!(error(8), "body larger than the limit of 100000 bytes");
    assert!(error(9).contains("unsupported scheme \"ftp\""), "{}", error(9));
    assert!(error(10).starts_with("cannot read file"), "{}", error(10));
    assert_eq!(top1(&records[11]).0, "green");
    // Each failure is logged with its source.
    assert!(stderr.contains("missing.jpg"), "{stderr}");
}

#[tokio::test]
async fn deep_gray_and_cmyk_images_are_converted() {
    let server = server().await;
    let deep = DynamicImage::ImageRgb16(solid(RED).to_rgb16());
    serve(&server, "/deep.png", encode(&deep, ImageFormat::Png)).await;
    let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(20, 20, image::Luma([128])));
    serve(&server, "/gray.jpg", encode(&gray, ImageFormat::Jpeg)).await;
    serve(&server, "/cmyk.jpg", std::fs::read(fixture("cmyk_red.jpg")).unwrap()).await;
    let uri = server.uri();
    let urls = [format!("{uri}/deep.png"), format!("{uri}/gray.jpg"), format!("{uri}/cmyk.jpg")];
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (code, records, stderr) = classify(&server, &args).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(top1(&records[0]).0, "red");
    assert_eq!(top1(&records[2]).0, "red");
    // Gray has no dominant colour: all three classes score alike.
    let scores: Vec<f64> =
        records[1]["predictions"].as_array().unwrap().iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(scores.iter().all(|s| (s - 1.0 / 3.0).abs() < 0.02), "{scores:?}");
}

#[tokio::test]
async fn the_same_url_twice_is_fetched_once_and_reported_twice() {
    let server = server().await;
    Mock::given(path("/red.png"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(png(RED)))
        .expect(1)
        .mount(&server)
        .await;
    serve(&server, "/blue.png", png(BLUE)).await;
    let (red, blue) = (format!("{}/red.png", server.uri()), format!("{}/blue.png", server.uri()));
    let (code, records, stderr) = classify(&server, &[&red, &blue, &red]).await;
    assert_eq!(code, 0, "{stderr}");
    let labels: Vec<&str> = records.iter().map(|r| top1(r).0).collect();
    assert_eq!(labels, ["red", "blue", "red"]);
    server.verify().await;
}

#[tokio::test]
async fn a_model_in_a_tar_gz_is_found_by_content() {
    let server = server().await;
    let model = std::fs::read(fixture("mock_model.tflite")).unwrap();
    let mut tar = tar::Builder::new(vec![]);
    let mut header = tar::Header::new_gnu();
    header.set_size(model.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "1.tflite", &model[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    // Served under a name that says nothing of its content, as Kaggle does.
    serve(&server, "/download", gz.finish().unwrap()).await;
    serve(&server, "/red.png", png(RED)).await;
    let out = run(vec![
        "--model".into(),
        format!("{}/download", server.uri()),
        "--labels".into(),
        fixture("mock_labels.csv").display().to_string(),
        "--format".into(),
        "json".into(),
        format!("{}/red.png", server.uri()),
    ])
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8(out.stdout).unwrap().contains("\"label\":\"red\""));
}

/// The top-1 labels of `--model model` with `extra` args over red, green
/// and blue images, served by `server`.
async fn colours(server: &MockServer, model: String, extra: &[&str]) -> Vec<String> {
    serve(server, "/red.png", png(RED)).await;
    serve(server, "/green.png", png(GREEN)).await;
    serve(server, "/blue.png", png(BLUE)).await;
    let mut args: Vec<String> = vec!["--model".into(), model, "--labels".into()];
    args.push(fixture("mock_labels.csv").display().to_string());
    args.extend(["--format", "json"].iter().chain(extra).map(|s| s.to_string()));
    args.extend(["red", "green", "blue"].iter().map(|c| format!("{}/{c}.png", server.uri())));
    let out = run(args).await;
    assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.lines().map(|l| top1(&serde_json::from_str(l).unwrap()).0.to_string()).collect()
}

#[tokio::test]
async fn onnx_models_channels_first_or_last_and_bgr() {
    let server = MockServer::start().await;
    // The scores of red, green and blue from each channel's mean.
    for model in ["onnx_colour_nchw.onnx", "onnx_colour_nhwc.onnx"] {
        let model = fixture(model).display().to_string();
        assert_eq!(colours(&server, model.clone(), &[]).await, ["red", "green", "blue"], "{model}");
        let bgr = colours(&server, model.clone(), &["--channels", "bgr"]).await;
        assert_eq!(bgr, ["blue", "green", "red"], "{model}");
    }
    // The TFLite model too, for the option is the model's, not a format's.
    let tflite = fixture("mock_model.tflite").display().to_string();
    assert_eq!(colours(&server, tflite, &["--channels", "bgr"]).await, ["blue", "green", "red"]);
    let out = run(vec!["--channels".into(), "rgba".into(), "a.jpg".into()]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn an_onnx_model_in_a_tar_gz_is_found_by_content() {
    let server = MockServer::start().await;
    let model = std::fs::read(fixture("onnx_colour_nchw.onnx")).unwrap();
    let mut tar = tar::Builder::new(vec![]);
    let mut header = tar::Header::new_gnu();
    header.set_size(model.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "model/weights", &model[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    serve(&server, "/download", gz.finish().unwrap()).await;
    let labels = colours(&server, format!("{}/download", server.uri()), &[]).await;
    assert_eq!(labels, ["red", "green", "blue"]);
}

/// A file with an ETag, answering 304 Not Modified to a request naming it.
fn versioned(body: Vec<u8>) -> impl wiremock::Respond {
    move |request: &wiremock::Request| {
        if request.headers.get("if-none-match").is_some_and(|v| v == "\"1\"") {
            ResponseTemplate::new(304).insert_header("etag", "\"1\"")
        } else {
            ResponseTemplate::new(200).insert_header("etag", "\"1\"").set_body_bytes(body.clone())
        }
    }
}

#[tokio::test]
async fn the_model_and_labels_are_kept_between_runs() {
    let server = MockServer::start().await;
    for (at, file) in [("/model.tflite", "mock_model.tflite"), ("/labels.csv", "mock_labels.csv")] {
        Mock::given(path(at)).respond_with(versioned(std::fs::read(fixture(file)).unwrap())).mount(&server).await;
    }
    serve(&server, "/red.png", png(RED)).await;
    let red = format!("{}/red.png", server.uri());
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kept-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let cache_dir = cache.display().to_string();

    // --no-cache neither reads nor writes, whatever the folder.
    let (code, _, stderr) = classify(&server, &["--no-cache", "--cache-dir", &cache_dir, &red]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(!cache.exists());
    // As does CLASSIFIER_NO_CACHE, for a job whose arguments are fixed.
    let out =
        run_with_env(mock_args(&server, &["--cache-dir", &cache_dir, &red]), &[("CLASSIFIER_NO_CACHE", "1")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cache.exists());

    let (code, records, stderr) = classify(&server, &["--cache-dir", &cache_dir, &red]).await;
    assert_eq!((code, top1(&records[0]).0), (0, "red"), "{stderr}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2, "the model and the labels are kept");

    // The next run downloads neither: it only asks whether they changed.
    server.reset().await;
    for (at, file) in [("/model.tflite", "mock_model.tflite"), ("/labels.csv", "mock_labels.csv")] {
        Mock::given(path(at)).respond_with(versioned(std::fs::read(fixture(file)).unwrap())).mount(&server).await;
    }
    serve(&server, "/red.png", png(RED)).await;
    let (code, records, stderr) = classify(&server, &["--cache-dir", &cache_dir, &red]).await;
    assert_eq!((code, top1(&records[0]).0), (0, "red"), "{stderr}");
    assert_eq!(stderr.matches("unchanged since it was cached").count(), 2, "{stderr}");
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert_eq!(requests.iter().filter(|r| r.headers.contains_key("if-none-match")).count(), 2);
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Runs with a broken model or labels: exit 2, nothing on stdout, and the
/// reason on stderr.
async fn setup_failure(model: Vec<u8>, labels: &str) -> String {
    let server = MockServer::start().await;
    serve(&server, "/model.tflite", model).await;
    serve(&server, "/labels.csv", labels.as_bytes().to_vec()).await;
    serve(&server, "/red.png", png(RED)).await;
    let (code, records, stderr) = classify(&server, &[&format!("{}/red.png", server.uri())]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(records.is_empty());
    stderr
}

#[tokio::test]
async fn a_bad_model_or_labels_stop_the_run_with_exit_2() {
    let model = std::fs::read(fixture("mock_model.tflite")).unwrap();
    let labels = std::fs::read_to_string(fixture("mock_labels.csv")).unwrap();

    let stderr = setup_failure(b"<html>not a model</html>".to_vec(), &labels).await;
    assert!(stderr.contains("not a TensorFlow Lite or ONNX model, nor a gzip'd tar holding one"), "{stderr}");
    // The error names the model it came from.
    assert!(stderr.contains("cannot load the model http://127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("/model.tflite: "), "{stderr}");

    let stderr = setup_failure(model[..model.len() * 2 / 3].to_vec(), &labels).await;
    assert!(stderr.contains("malformed TensorFlow Lite flatbuffer"), "{stderr}");

    let stderr = setup_failure(model.clone(), "id,name\n0,red\n1,green\n").await;
    assert!(stderr.contains("the label map names 2 classes but the model scores 3"), "{stderr}");
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let out = run(vec![]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = run(vec!["--top-k".into(), "0".into(), "a.jpg".into()]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = run(vec!["--model".into(), "gopher://x/m.tflite".into(), "a.jpg".into()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported scheme"));
}

/// A PNG whose header claims 50000x50000 pixels, with a valid CRC.
fn huge_png_header() -> Vec<u8> {
    let mut png = png(RED);
    png[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    png
}

/// Incompressible pixels, so that the PNG is large.
fn noise(width: u32, height: u32) -> RgbImage {
    let mut state = 0x2545_f491_u32;
    RgbImage::from_fn(width, height, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let [a, b, c, _] = state.to_le_bytes();
        Rgb([a, b, c])
    })
}

#[tokio::test]
async fn shards_together_print_exactly_the_unsharded_results() {
    let server = server().await;
    let colours = [RED, GREEN, BLUE, GREEN, RED, BLUE, BLUE];
    let mut urls = vec![];
    for (i, colour) in colours.iter().enumerate() {
        serve(&server, &format!("/{i}.png"), png(*colour)).await;
        urls.push(format!("{}/{i}.png", server.uri()));
    }
    urls.push(format!("{}/missing.png", server.uri()));
    urls.push(urls[0].clone());
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (_, whole, _) = classify(&server, &args).await;
    assert_eq!(whole.len(), urls.len());

    let mut pieces = vec![];
    for i in 0..3 {
        let shard = format!("{i}/3");
        let mut sharded = vec!["--shard", &shard];
        sharded.extend(&args);
        let (code, records, stderr) = classify(&server, &sharded).await;
        // Only shard 1 holds the missing image, at position 7.
        assert_eq!(code, if i == 1 { 1 } else { 0 }, "{stderr}");
        assert_eq!(records.len(), 3);
        pieces.extend(records);
    }
    let key = |r: &Value| r.to_string();
    let mut whole: Vec<String> = whole.iter().map(key).collect();
    let mut pieces: Vec<String> = pieces.iter().map(key).collect();
    whole.sort();
    pieces.sort();
    assert_eq!(pieces, whole);
}

#[tokio::test]
async fn sources_from_a_file_or_stdin() {
    let server = server().await;
    serve(&server, "/red.png", png(RED)).await;
    serve(&server, "/blue.png", png(BLUE)).await;
    let list = format!("# colours\n{0}/red.png\n\n{0}/blue.png\n", server.uri());
    let out = tokio::task::spawn_blocking({
        let uri = server.uri();
        move || {
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_classifier"))
                .args(["--model", &format!("{uri}/model.tflite"), "--labels", &format!("{uri}/labels.csv")])
                .args(["--format", "json", "--sources-file", "-", fixture("cmyk_red.jpg").to_str().unwrap()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), list.as_bytes()).unwrap();
            child.wait_with_output().unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let labels: Vec<&str> = records.iter().map(|r| top1(r).0).collect();
    // Arguments first, then the file's sources in order.
    assert_eq!(labels, ["red", "red", "blue"]);
}

#[tokio::test]
async fn records_that_complete_out_of_order_are_printed_in_order() {
    let server = server().await;
    Mock::given(path("/slow.png"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(png(BLUE)).set_delay(Duration::from_millis(800)))
        .mount(&server)
        .await;
    serve(&server, "/red.png", png(RED)).await;
    serve(&server, "/green.png", png(GREEN)).await;
    let uri = server.uri();
    let urls =
        [format!("{uri}/slow.png"), format!("{uri}/red.png"), format!("{uri}/missing.png"), format!("{uri}/green.png")];
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (code, records, stderr) = classify(&server, &args).await;
    assert_eq!(code, 1, "{stderr}");
    // The first image is done last, 800 ms after the others: printed as
    // they complete, it would come last.
    let sources: Vec<&str> = records.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert_eq!(sources, args);
    assert_eq!(top1(&records[0]).0, "blue");
    assert_eq!(records[2]["error"], "HTTP 404 Not Found");
}

#[tokio::test]
async fn a_closed_stdout_ends_the_run_quietly() {
    let server = server().await;
    serve(&server, "/red.png", png(RED)).await;
    // Records after the first come once the reader has gone.
    Mock::given(path("/slow.png"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(png(BLUE)).set_delay(Duration::from_millis(500)))
        .mount(&server)
        .await;
    let red = format!("{}/red.png", server.uri());
    let mut args = mock_args(&server, &["--format", "json", &red]);
    args.extend((0..20).map(|i| format!("{}/slow.png?{i}", server.uri())));
    let output = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_classifier"))
            .args(&args)
            .env_remove("RUST_LOG")
            .env("CLASSIFIER_NO_CACHE", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // As `| head -1` does: one line, then the pipe is closed.
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let output = child.wait_with_output().unwrap();
        (first, output)
    })
    .await
    .unwrap();
    let (first, output) = output;
    assert!(first.contains("red.png"), "{first}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("ERROR") && !stderr.to_lowercase().contains("broken pipe"), "{stderr}");
}

#[tokio::test]
async fn folders_and_patterns_expand_to_their_images_in_path_order() {
    let server = server().await;
    let dir = std::env::temp_dir().join(format!("classifier-cli-tree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write("b.png", &png(BLUE));
    write("a.PNG", &png(RED));
    write("notes.txt", b"not an image");
    write(".hidden.png", &png(GREEN));
    write(".thumbs/t.png", &png(GREEN));
    write("sub/c.JPG", &encode(&solid(GREEN), ImageFormat::Jpeg));
    write("sub/deeper/d.bmp", &encode(&solid(RED), ImageFormat::Bmp));
    write("empty/readme.md", b"# nothing");
    let root = dir.to_str().unwrap().to_string();
    let at = |name: &str| format!("{root}/{name}");
    let (pattern, nothing, empty) = (at("**/*.png"), at("*/*.gif"), at("empty"));
    let (code, records, stderr) = classify(&server, &[&root, &pattern, &nothing, &empty, "--max-depth", "2"]).await;
    let got: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            let outcome = match r["error"].as_str() {
                Some(error) => error.to_string(),
                None => top1(r).0.to_string(),
            };
            (r["source"].as_str().unwrap().to_string(), outcome)
        })
        .collect();
    let want = [
        (at("a.PNG"), "red"),
        (at("b.png"), "blue"),
        (at("sub/c.JPG"), "green"),
        (at("b.png"), "blue"),
        (nothing.clone(), "no file matches the pattern"),
        (empty.clone(), "no images in this folder"),
    ];
    let want: Vec<(String, String)> = want.iter().map(|(s, o)| (s.clone(), o.to_string())).collect();
    assert_eq!(got, want, "{stderr}");
    assert_eq!(code, 1);
    // The shards split the expanded list by position.
    let (_, first, _) = classify(&server, &[&root, "--shard", "0/2"]).await;
    let sources: Vec<&str> = first.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert_eq!(sources, [at("a.PNG"), at("sub/c.JPG")]);
    // A turned photo and --no-exif-orientation: same colour either way.
    let (code, records, stderr) = classify(&server, &["--no-exif-orientation", &at("sub/c.JPG")]).await;
    assert_eq!((code, top1(&records[0]).0), (0, "green"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn at_most_concurrency_downloads_are_in_flight() {
    use std::sync::atomic::Ordering;
    let (host, peak) = support::counting_host(png(RED), Duration::from_millis(150)).await;
    let server = server().await;
    let images: Vec<String> = (0..12).map(|n| format!("{host}/{n}.png")).collect();
    let mut extra = vec!["--concurrency", "3"];
    extra.extend(images.iter().map(String::as_str));
    let (code, records, stderr) = classify(&server, &extra).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(records.len(), 12);
    assert!(records.iter().all(|r| top1(r).0 == "red"), "{records:?}");
    // At most the bound; and the downloads did overlap (each holds its
    // request 150 ms, and twelve were waiting).
    let peak = peak.load(Ordering::SeqCst);
    assert!((2..=3).contains(&peak), "{peak} downloads held at once");
}

#[tokio::test]
async fn downloads_go_on_while_downloaded_images_wait() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // The model comes after a second; until then no image can be resized
    // and queued. Each download's slot is free once its body is in, so the
    // downloads go on until twice --concurrency images wait, and stop there.
    let (served, before_model) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(usize::MAX)));
    let image = png(RED);
    let model = std::fs::read(fixture("mock_model.tflite")).unwrap();
    let images = {
        let served = served.clone();
        move || async move {
            served.fetch_add(1, Ordering::SeqCst);
            image
        }
    };
    let late_model = {
        let (served, before_model) = (served.clone(), before_model.clone());
        move || async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            before_model.store(served.load(Ordering::SeqCst), Ordering::SeqCst);
            model
        }
    };
    let app = axum::Router::new()
        .route("/model.tflite", axum::routing::get(late_model))
        .route("/images/{n}", axum::routing::get(images));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let labels = server().await;
    let mut args = vec![
        "--model".to_string(),
        format!("{host}/model.tflite"),
        "--labels".to_string(),
        format!("{}/labels.csv", labels.uri()),
        "--no-cache".to_string(),
        "--format".to_string(),
        "json".to_string(),
        "--concurrency".to_string(),
        "2".to_string(),
    ];
    args.extend((0..10).map(|n| format!("{host}/images/{n}.png")));
    let out = run(args).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 10);
    assert_eq!(before_model.load(Ordering::SeqCst), 4, "images downloaded while the model was on its way");
}
