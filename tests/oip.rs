//! The Open Inference Protocol v2 routes of `classifier serve`, in-process
//! on 127.0.0.1:0, over the mock model served by a loopback server: called
//! with reqwest as the protocol says, and by `tritonclient.http` itself
//! (tests/oip_client.py) when CLASSIFIER_TEST_PYTHON names a Python with it.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Server, answer, assets, client, mock_args, png, shared};

const RED: [u8; 3] = [250, 10, 10];
const BLUE: [u8; 3] = [10, 10, 250];

impl Server {
    async fn get(&self, route: &str) -> (StatusCode, Value) {
        answer(client().get(self.at(route)).send().await.unwrap()).await
    }

    async fn infer(&self, body: Value) -> (StatusCode, Value) {
        answer(client().post(self.at("/v2/models/mock/infer")).json(&body).send().await.unwrap()).await
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A BYTES tensor in binary: each element's length, 4 bytes little endian,
/// then the element.
fn bytes_tensor(elements: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![];
    for e in elements {
        out.extend((e.len() as u32).to_le_bytes());
        out.extend(*e);
    }
    out
}

/// A request of the binary data extension, as tritonclient sends it: the
/// JSON header, then the tensor.
fn binary_request(server: &Server, model: &str, header: &Value, tensor: &[u8]) -> reqwest::RequestBuilder {
    let header = header.to_string();
    let mut body = header.clone().into_bytes();
    body.extend(tensor);
    client()
        .post(server.at(&format!("/v2/models/{model}/infer")))
        .header("inference-header-content-length", header.len())
        .body(body)
}

/// A binary answer: its JSON header, and the binary tensor of each output
/// (none for those in JSON).
async fn binary_answer(response: reqwest::Response) -> (Value, Vec<Vec<u8>>) {
    assert_eq!(response.status(), StatusCode::OK);
    let length: usize = response.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    assert_eq!(response.headers()["content-type"], "application/octet-stream");
    let body = response.bytes().await.unwrap();
    let header: Value = serde_json::from_slice(&body[..length]).unwrap();
    let mut rest = &body[length..];
    let mut tensors = vec![];
    for output in header["outputs"].as_array().unwrap() {
        let size = output["parameters"]["binary_data_size"].as_u64().unwrap_or(0) as usize;
        tensors.push(rest[..size].to_vec());
        rest = &rest[size..];
    }
    assert!(rest.is_empty(), "{} bytes left over", rest.len());
    (header, tensors)
}

fn strings(tensor: &[u8]) -> Vec<String> {
    let mut out = vec![];
    let mut rest = tensor;
    while !rest.is_empty() {
        let length = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(String::from_utf8(rest[4..4 + length].to_vec()).unwrap());
        rest = &rest[4 + length..];
    }
    out
}

fn floats(tensor: &[u8]) -> Vec<f32> {
    tensor.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A row of scores: a probability per class, the highest for `index`.
fn assert_scores(row: &[f32], index: usize) {
    assert_eq!(row.len(), 3);
    let sum: f32 = row.iter().sum();
    // The mock model's softmax is quantized, in steps of 1/256.
    assert!((sum - 1.0).abs() <= 3.0 / 256.0, "{row:?} sums to {sum}");
    let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
    assert_eq!(best, index, "{row:?}");
}

fn json_floats(data: &Value) -> Vec<f32> {
    data.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[tokio::test]
async fn metadata_and_readiness() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let (status, body) = server.get("/v2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"name": "classifier", "version": env!("CARGO_PKG_VERSION"),
               "extensions": ["classification", "binary_tensor_data"]})
    );
    assert_eq!(server.get("/v2/health/live").await.0, StatusCode::OK);
    assert_eq!(server.get("/v2/health/ready").await.0, StatusCode::OK);
    let expected = json!({
        "name": "mock",
        "versions": ["1"],
        "platform": "tflite",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}],
    });
    assert_eq!(server.get("/v2/models/mock").await, (StatusCode::OK, expected.clone()));
    assert_eq!(server.get("/v2/models/mock/versions/1").await, (StatusCode::OK, expected));
    for route in ["/v2/models/mock/ready", "/v2/models/mock/versions/1/ready"] {
        assert_eq!(server.get(route).await, (StatusCode::OK, json!({"name": "mock", "ready": true})), "{route}");
    }
    let unknown = json!({"error": "unknown model \"cats\"; the models are mock"});
    assert_eq!(server.get("/v2/models/cats").await, (StatusCode::NOT_FOUND, unknown.clone()));
    assert_eq!(server.get("/v2/models/cats/ready").await, (StatusCode::NOT_FOUND, unknown));
    let no_version = json!({"error": "the model \"mock\" has no version \"2\": its only version is 1"});
    assert_eq!(server.get("/v2/models/mock/versions/2/ready").await, (StatusCode::NOT_FOUND, no_version.clone()));
    assert_eq!(server.get("/v2/models/mock/versions/2").await, (StatusCode::NOT_FOUND, no_version));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_still_loading_is_not_ready_and_takes_no_request() {
    let assets = assets(Duration::from_millis(2500)).await;
    let server = Server::start(mock_args(&assets, &[])).await;
    assert_eq!(server.get("/v2/health/live").await.0, StatusCode::OK);
    let response = client().get(server.at("/v2/health/ready")).send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(answer(response).await, (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "not ready: loading mock"})));
    let not_ready = (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "the model \"mock\" is not ready yet"}));
    assert_eq!(server.get("/v2/models/mock/ready").await, not_ready);
    assert_eq!(server.get("/v2/models/mock").await, not_ready);
    let body = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64(&png(RED))]}]});
    let response = client().post(server.at("/v2/models/mock/infer")).json(&body).send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(answer(response).await, not_ready);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn infer_in_json_with_base64_images() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let input = json!({"name": "image", "shape": [2], "datatype": "BYTES",
                       "data": [base64(&png(RED)), base64(&png(BLUE))]});
    // The classification extension: the top 2 of each image, best first.
    let (status, body) = server
        .infer(json!({"id": "req-7", "inputs": [input],
                      "outputs": [{"name": "scores", "parameters": {"classification": 2}}]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["model_name"], &body["model_version"], &body["id"]),
        (&json!("mock"), &json!("1"), &json!("req-7"))
    );
    let output = &body["outputs"][0];
    assert_eq!(
        (&output["name"], &output["datatype"], &output["shape"]),
        (&json!("scores"), &json!("BYTES"), &json!([2, 2]))
    );
    let classes: Vec<&str> = output["data"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(classes.len(), 4);
    let parsed: Vec<(f32, usize, &str)> = classes
        .iter()
        .map(|s| {
            let mut parts = s.splitn(3, ':');
            let score = parts.next().unwrap();
            // Six decimals, as C's %f writes them.
            assert_eq!(score.split('.').nth(1).map(str::len), Some(6), "{s}");
            (score.parse().unwrap(), parts.next().unwrap().parse().unwrap(), parts.next().unwrap())
        })
        .collect();
    assert_eq!((parsed[0].1, parsed[0].2), (0, "red"));
    assert_eq!((parsed[2].1, parsed[2].2), (2, "blue"));
    assert!(parsed[0].0 >= parsed[1].0 && parsed[2].0 >= parsed[3].0, "{classes:?}");

    // No output named: every score, in class order.
    let (status, body) = server.infer(json!({"inputs": [input]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("id").is_none(), "{body}");
    let output = &body["outputs"][0];
    assert_eq!((&output["datatype"], &output["shape"]), (&json!("FP32"), &json!([2, 3])));
    let scores = json_floats(&output["data"]);
    assert_eq!(scores.len(), 6);
    assert_scores(&scores[..3], 0);
    assert_scores(&scores[3..], 2);
    // The classification's scores are these.
    assert!((scores[0] - parsed[0].0).abs() < 1e-6 && (scores[5] - parsed[2].0).abs() < 1e-6, "{scores:?}");

    // Asked in binary_data=false style on a versioned path, and a nested shape.
    let nested = json!({"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data": false},
                        "data": [[base64(&png(BLUE))]]});
    let request = json!({"inputs": [nested], "outputs": [{"name": "scores", "parameters": {"binary_data": false}}]});
    let response = client().post(server.at("/v2/models/mock/versions/1/infer")).json(&request).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.headers().get("inference-header-content-length").is_none());
    let (status, body) = answer(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_scores(&json_floats(&body["outputs"][0]["data"]), 2);

    let metrics = client().get(server.at("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "classifier_http_requests_total{route=\"/v2/models/{name}/infer\",status=\"200\"} 2",
        "classifier_http_requests_total{route=\"/v2/models/{name}/versions/{version}/infer\",status=\"200\"} 1",
        // Through the result cache, by content: the two photos were
        // classified once each, then answered from the cache three times.
        "classifier_images_total{model=\"mock\"} 2",
        "classifier_result_cache_hits_total 3",
        "classifier_result_cache_misses_total 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");
    }
    // And counted in the usage report, by content.
    let (status, usage) = answer(client().get(server.at("/v1/usage")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let counts: Vec<(&str, u64)> = usage["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["source"].as_str().unwrap(), s["requests"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts.len(), 2, "{usage}");
    assert!(counts.iter().all(|(source, _)| source.starts_with("sha256:")), "{usage}");
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 5, "{usage}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn infer_with_the_binary_data_extension() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let (red, blue) = (png(RED), png(BLUE));
    let tensor = bytes_tensor(&[&blue, &red, &blue]);
    let input = json!({"name": "image", "shape": [3], "datatype": "BYTES",
                       "parameters": {"binary_data_size": tensor.len()}});
    // What tritonclient sends without outputs: every output, in binary.
    let header = json!({"inputs": [input], "parameters": {"binary_data_output": true}});
    let (answer_header, tensors) =
        binary_answer(binary_request(&server, "mock", &header, &tensor).send().await.unwrap()).await;
    let output = &answer_header["outputs"][0];
    assert_eq!((&output["datatype"], &output["shape"]), (&json!("FP32"), &json!([3, 3])));
    assert!(output.get("data").is_none(), "{output}");
    let scores = floats(&tensors[0]);
    assert_eq!(scores.len(), 9);
    for (row, best) in scores.chunks(3).zip([2, 0, 2]) {
        assert_scores(row, best);
    }

    // The classification in binary, asked for more classes than there are,
    // beside the scores in JSON.
    let header = json!({"id": "b", "inputs": [input], "outputs": [
        {"name": "scores", "parameters": {"classification": 5, "binary_data": true}},
    ]});
    let (answer_header, tensors) =
        binary_answer(binary_request(&server, "mock", &header, &tensor).send().await.unwrap()).await;
    assert_eq!(answer_header["id"], "b");
    assert_eq!(answer_header["outputs"][0]["shape"], json!([3, 3]));
    let classes = strings(&tensors[0]);
    assert_eq!(classes.len(), 9);
    assert!(classes[0].ends_with(":2:blue") && classes[3].ends_with(":0:red"), "{classes:?}");
    let first: Vec<&str> = classes.iter().map(|c| c.split(':').nth(1).unwrap()).collect();
    assert_eq!(first[..3].iter().collect::<std::collections::HashSet<_>>().len(), 3, "every class once: {classes:?}");
    for (c, score) in classes[..3].iter().zip([scores[2], scores[1].max(scores[0]), scores[1].min(scores[0])]) {
        assert_eq!(c.split(':').next().unwrap(), format!("{score:.6}"), "{classes:?} {scores:?}");
    }

    // gzip'd, as tritonclient sends with request_compression_algorithm.
    let header_text = header.to_string();
    let mut encoder = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
    encoder.write_all(header_text.as_bytes()).unwrap();
    encoder.write_all(&tensor).unwrap();
    let response = client()
        .post(server.at("/v2/models/mock/infer"))
        .header("inference-header-content-length", header_text.len())
        .header("content-encoding", "gzip")
        .body(encoder.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(strings(&binary_answer(response).await.1[0]), classes);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn every_bad_infer_request_has_its_status_and_an_error() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--max-sources", "2", "--max-body-bytes", "60000"])).await;
    let red = png(RED);
    let one = |data: Value| json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data}]});
    let good = one(json!([base64(&red)]));
    let post = |route: &str, body: Vec<u8>| client().post(server.at(route)).body(body).send();
    let infer = |body: Value| post("/v2/models/mock/infer", body.to_string().into_bytes());
    let binary = |tensor: Vec<u8>, size: usize, shape: i64| {
        let header = json!({"inputs": [{"name": "image", "shape": [shape], "datatype": "BYTES",
                                        "parameters": {"binary_data_size": size}}]});
        binary_request(&server, "mock", &header, &tensor).send()
    };
    let mut long_prefix = bytes_tensor(&[&red]);
    long_prefix[..4].copy_from_slice(&(red.len() as u32 + 1).to_le_bytes());
    let with_text = bytes_tensor(&[&red, b"hello"]);
    let cases: Vec<(reqwest::Response, StatusCode, &str)> = vec![
        (infer(json!({"inputs": 1})).await.unwrap(), StatusCode::BAD_REQUEST, "bad JSON: "),
        (post("/v2/models/mock/infer", b"{\"inputs\": [".to_vec()).await.unwrap(), StatusCode::BAD_REQUEST, "bad JSON"),
        (
            post("/v2/models/cats/infer", good.to_string().into_bytes()).await.unwrap(),
            StatusCode::NOT_FOUND,
            "unknown model \"cats\"; the models are mock",
        ),
        (
            post("/v2/models/mock/versions/3/infer", good.to_string().into_bytes()).await.unwrap(),
            StatusCode::NOT_FOUND,
            "the model \"mock\" has no version \"3\"",
        ),
        (infer(json!({"inputs": []})).await.unwrap(), StatusCode::BAD_REQUEST, "0 inputs: the model takes one, \"image\""),
        (
            infer(json!({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}))
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "unknown input \"INPUT0\": the model takes one, \"image\"",
        ),
        (
            infer(json!({"inputs": [{"name": "image", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}))
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "input \"image\" is FP32: it must be BYTES",
        ),
        (
            infer(json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [base64(&red)]}]}))
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "input \"image\" has shape [2], 2 elements, but holds 1",
        ),
        (
            infer(json!({"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["aGk="]}]}))
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad shape [-1]",
        ),
        (
            infer(json!({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]}]}))
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "too many images: 3, at most 2 in one request",
        ),
        (infer(one(json!(["%%%"]))).await.unwrap(), StatusCode::BAD_REQUEST, "input \"image\" element 0: not base64"),
        (infer(one(json!([7]))).await.unwrap(), StatusCode::BAD_REQUEST, "input \"image\" element 0: 7 is not a string"),
        (
            infer(json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                     "data": [base64(&red), base64(b"hello")]}]}))
            .await
            .unwrap(),
            StatusCode::BAD_REQUEST,
            "input \"image\" element 1: not an image (the content is text)",
        ),
        (
            infer(json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]})).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "input \"image\" has no data",
        ),
        (
            infer(json!({"inputs": good["inputs"], "outputs": [{"name": "OUTPUT0"}]})).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "unknown output \"OUTPUT0\": the model has one, \"scores\"",
        ),
        (
            infer(json!({"inputs": good["inputs"], "outputs": [{"name": "scores", "parameters": {"classification": -1}}]}))
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad classification -1",
        ),
        (
            infer(json!({"inputs": good["inputs"], "outputs": [{"name": "scores", "parameters": {"binary_data": "yes"}}]}))
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad binary_data \"yes\": expected true or false",
        ),
        (
            infer(json!({"inputs": good["inputs"], "outputs": [{"name": "scores",
                         "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 12}}]}))
            .await
            .unwrap(),
            StatusCode::BAD_REQUEST,
            "shared memory is not supported",
        ),
        (
            binary(long_prefix.clone(), long_prefix.len(), 1).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "input \"image\" element 0: its length is",
        ),
        (
            binary(bytes_tensor(&[&red]), red.len() + 10, 1).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "input \"image\" has binary_data_size",
        ),
        (
            binary(with_text.clone(), with_text.len(), 2).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "input \"image\" element 1: not an image (the content is text)",
        ),
        (
            client()
                .post(server.at("/v2/models/mock/infer"))
                .header("inference-header-content-length", "100000")
                .body(good.to_string())
                .send()
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "Inference-Header-Content-Length is 100000, but the body has",
        ),
        (
            client()
                .post(server.at("/v2/models/mock/infer"))
                .header("inference-header-content-length", "ten")
                .body(good.to_string())
                .send()
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad Inference-Header-Content-Length \"ten\"",
        ),
        (
            client()
                .post(server.at("/v2/models/mock/infer"))
                .header("content-encoding", "br")
                .body(good.to_string())
                .send()
                .await
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported Content-Encoding \"br\"",
        ),
        (
            client()
                .post(server.at("/v2/models/mock/infer"))
                .header("content-encoding", "gzip")
                .body(good.to_string())
                .send()
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "cannot decompress the body",
        ),
        (
            post("/v2/models/mock/infer", vec![b' '; 60001]).await.unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body larger than the limit of 60000 bytes",
        ),
        (
            client().get(server.at("/v2/models/mock/infer")).send().await.unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "/v2/models/mock/infer does not take GET",
        ),
        (
            client().post(server.at("/v2/models/mock")).send().await.unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "/v2/models/mock does not take POST",
        ),
    ];
    for (response, status, error) in cases {
        let (got, body) = answer(response).await;
        let message = body["error"].as_str().unwrap_or_else(|| panic!("no error: {body}"));
        assert_eq!((got, message.starts_with(error)), (status, true), "{message:?} is not {status} {error:?}");
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    }
    // A gzip'd body over the limit once decompressed.
    let mut encoder = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
    encoder.write_all(&vec![b' '; 200_000]).unwrap();
    let response = client()
        .post(server.at("/v2/models/mock/infer"))
        .header("content-encoding", "gzip")
        .body(encoder.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer(response).await,
        (StatusCode::PAYLOAD_TOO_LARGE, json!({"error": "decompressed body larger than the limit of 60000 bytes"}))
    );
    // Still serving.
    assert_eq!(server.infer(good).await.0, StatusCode::OK);
    server.stop().await.unwrap();
}

/// One limit of requests in flight over /v1/classify and infer.
#[tokio::test]
async fn infer_shares_the_in_flight_limit_with_classify() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--max-in-flight", "1"])).await;
    let slow = json!({"sources": [format!("{}/slow.png", assets.uri())]});
    let first = client().post(server.at("/v1/classify")).json(&slow).send();
    let second = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let body =
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64(&png(RED))]}]});
        let response = client().post(server.at("/v2/models/mock/infer")).json(&body).send().await.unwrap();
        assert_eq!(response.headers()["retry-after"], "1");
        answer(response).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap().status(), StatusCode::OK);
    assert_eq!(second, (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "overloaded: too many requests in flight"})));
    server.stop().await.unwrap();
}

/// tritonclient.http against the server: the birds model and its photos
/// when ../shared has them (a real label to check), else the mock model.
#[tokio::test]
async fn tritonclient_classifies_through_the_server() {
    let Ok(python) = std::env::var("CLASSIFIER_TEST_PYTHON") else {
        eprintln!("skipped: CLASSIFIER_TEST_PYTHON is unset (a Python with tritonclient[http] and numpy)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("classifier-oip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let birds = match (shared("birds/model.tflite"), shared("birds/labels.csv"), shared("birds/reference.jsonl")) {
        (Some(model), Some(labels), Some(reference)) => Some((model, labels, reference)),
        _ => None,
    };
    let _assets;
    let (args, model, classes, images) = match birds {
        Some((model, labels, reference)) => {
            let args = ["serve", "--model", &format!("birds={}", model.display())]
                .into_iter()
                .map(String::from)
                .chain(["--labels".into(), format!("birds={}", labels.display()), "--no-cache".into()])
                .collect();
            let text = std::fs::read_to_string(&reference).unwrap();
            let images: Vec<(PathBuf, String)> = text
                .lines()
                .take(3)
                .map(|line| {
                    let record: Value = serde_json::from_str(line).unwrap();
                    let file = reference.parent().unwrap().join("images").join(record["image"].as_str().unwrap());
                    (file, record["top"][0]["label"].as_str().unwrap().to_string())
                })
                .collect();
            (args, "birds", 965, images)
        }
        None => {
            let assets = assets(Duration::ZERO).await;
            let args = mock_args(&assets, &[]);
            _assets = assets;
            let mut images = vec![];
            for (name, rgb) in [("red", RED), ("blue", BLUE)] {
                let file = dir.join(format!("{name}.png"));
                std::fs::write(&file, png(rgb)).unwrap();
                images.push((file, name.to_string()));
            }
            (args, "mock", 3, images)
        }
    };
    let server = Server::ready(args).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oip_client.py");
    // std's Command on a blocking thread: tokio's process feature would
    // rebuild tokio and everything over it for this one test.
    let mut command = std::process::Command::new(&python);
    command.arg(&script).arg(server.url.trim_start_matches("http://")).arg(model).arg(classes.to_string());
    for (file, label) in &images {
        command.arg(file).arg(label);
    }
    let run = tokio::task::spawn_blocking(move || command.output());
    let out = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the script hung").unwrap().unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "tests/oip_client.py failed");
    let _ = std::fs::remove_dir_all(&dir);
    server.stop().await.unwrap();
}
