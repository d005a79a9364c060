//! `classifier serve` in-process: the router on 127.0.0.1:0, called with
//! reqwest, over the mock model and images served by loopback servers the
//! tests start (the real birds model from ../shared where top-1 matters).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use support::{Server, answer, assets, client, mock_args, mount, png, shared};
use wiremock::{MockServer, ResponseTemplate};

impl Server {
    async fn classify(&self, body: Value) -> (StatusCode, Value) {
        answer(client().post(self.at("/v1/classify")).json(&body).send().await.unwrap()).await
    }
}

fn top1(record: &Value) -> &str {
    record["predictions"][0]["label"].as_str().unwrap_or_else(|| panic!("no predictions: {record}"))
}

#[tokio::test]
async fn urls_are_answered_in_request_order_each_as_the_cli_record() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let url = |p: &str| format!("{}{p}", assets.uri());
    let sources =
        [url("/blue.png"), url("/missing.png"), url("/red.png"), "ftp://h/a.jpg".into(), "/etc/hostname".into()];
    let (status, body) = server.classify(json!({ "sources": sources, "top_k": 2 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model"], "mock");
    // Each record as the command line prints it, byte for byte.
    let text = client().post(server.at("/v1/classify")).json(&json!({"sources": [&sources[1]]})).send().await.unwrap();
    let text = text.text().await.unwrap();
    assert_eq!(
        text,
        format!(
            "{{\"model\":\"mock\",\"results\":[{{\"source\":\"{}\",\"error\":\"HTTP 404 Not Found\"}}]}}",
            sources[1]
        )
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for (record, source) in results.iter().zip(&sources) {
        assert_eq!(record["source"], source.as_str());
    }
    assert_eq!(top1(&results[0]), "blue");
    assert_eq!(results[0]["predictions"].as_array().unwrap().len(), 2);
    // The CLI's record: source and predictions, nothing else; or source and error.
    let keys: Vec<&String> = results[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["predictions", "source"]);
    assert_eq!(results[0]["predictions"][0].as_object().unwrap().len(), 3);
    assert_eq!(results[1], json!({"source": url("/missing.png"), "error": "HTTP 404 Not Found"}));
    assert_eq!(top1(&results[2]), "red");
    assert!(results[3]["error"].as_str().unwrap().starts_with("unsupported scheme \"ftp\""), "{}", results[3]);
    assert_eq!(results[4]["error"], "local files are not allowed");
    // The default top_k is the server's.
    let (_, body) = server.classify(json!({ "sources": [url("/red.png")], "model": "mock" })).await;
    assert_eq!(body["results"][0]["predictions"].as_array().unwrap().len(), 3);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn uploads_by_multipart_and_as_a_raw_body() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let form = Form::new()
        .part("image", Part::bytes(png([10, 10, 250])).file_name("sky.png"))
        .text("top_k", "1")
        .part("image", Part::bytes(png([250, 10, 10])).file_name("cardinal.png"))
        .part("image", Part::bytes(b"hello".to_vec()).file_name("notes.txt"))
        .text("model", "mock");
    let response = client().post(server.at("/v1/classify")).multipart(form).send().await.unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!((results[0]["source"].as_str(), top1(&results[0])), (Some("sky.png"), "blue"));
    assert_eq!((results[1]["source"].as_str(), top1(&results[1])), (Some("cardinal.png"), "red"));
    assert_eq!(results[0]["predictions"].as_array().unwrap().len(), 1);
    assert_eq!(results[2], json!({"source": "notes.txt", "error": "not an image (the content is text)"}));

    let response = client()
        .post(server.at("/v1/classify?top_k=2&model=mock"))
        .header("content-type", "image/png")
        .body(png([250, 10, 10]))
        .send()
        .await
        .unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["source"], "upload");
    assert_eq!(top1(&body["results"][0]), "red");
    assert_eq!(body["results"][0]["predictions"].as_array().unwrap().len(), 2);
    let response = client()
        .post(server.at("/v1/classify"))
        .header("content-type", "application/octet-stream")
        .body(png([10, 10, 250]))
        .send()
        .await
        .unwrap();
    assert_eq!(top1(&answer(response).await.1["results"][0]), "blue");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn every_bad_request_has_its_status_and_an_error() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--max-sources", "2", "--max-body-bytes", "4000"])).await;
    let red = format!("{}/red.png", assets.uri());
    let post = |content_type: &'static str, body: Vec<u8>| {
        client().post(server.at("/v1/classify")).header("content-type", content_type).body(body).send()
    };
    let cases: Vec<(reqwest::Response, StatusCode, &str)> = vec![
        (post("application/json", b"{\"sources\": [".to_vec()).await.unwrap(), StatusCode::BAD_REQUEST, "bad JSON: "),
        (
            post("application/json", b"{\"source\": []}".to_vec()).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "bad JSON: unknown field `source`",
        ),
        (post("application/json", b"{\"sources\": []}".to_vec()).await.unwrap(), StatusCode::BAD_REQUEST, "no sources"),
        (post("application/json", b"{}".to_vec()).await.unwrap(), StatusCode::BAD_REQUEST, "no sources"),
        (post("image/png", vec![]).await.unwrap(), StatusCode::BAD_REQUEST, "no sources"),
        (
            post("application/json", json!({"sources": [&red, &red, &red]}).to_string().into_bytes()).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "too many sources: 3, at most 2 in one request",
        ),
        (
            post("application/json", json!({"sources": [&red], "top_k": 0}).to_string().into_bytes()).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "bad top_k 0: expected a whole number, 1 or more",
        ),
        (
            post("application/json", json!({"sources": [&red], "top_k": 1.5}).to_string().into_bytes()).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "bad top_k 1.5",
        ),
        (
            post("application/json", json!({"sources": [&red], "top_k": "3"}).to_string().into_bytes()).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "bad top_k \"3\"",
        ),
        (
            client()
                .post(server.at("/v1/classify?top_k=-1"))
                .header("content-type", "image/png")
                .body(png([1, 2, 3]))
                .send()
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad top_k -1",
        ),
        (
            post("application/json", json!({"sources": [&red], "model": "cats"}).to_string().into_bytes())
                .await
                .unwrap(),
            StatusCode::NOT_FOUND,
            "unknown model \"cats\"; the models are mock",
        ),
        (
            post("image/png", vec![0; 4001]).await.unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body larger than the limit of 4000 bytes",
        ),
        (
            post("text/plain", b"hello".to_vec()).await.unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content type (text/plain)",
        ),
        (
            client().post(server.at("/v1/classify")).body("x").send().await.unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content type (none)",
        ),
        (
            client().post(server.at("/v1/classify")).multipart(Form::new().text("colour", "red")).send().await.unwrap(),
            StatusCode::BAD_REQUEST,
            "unexpected field \"colour\"",
        ),
        (
            post("multipart/form-data; boundary=x", b"garbage".to_vec()).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "bad multipart body",
        ),
        (
            client().get(server.at("/v1/classify")).send().await.unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "/v1/classify does not take GET",
        ),
        (
            client().get(server.at("/v2/nothing")).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "no route GET /v2/nothing",
        ),
    ];
    for (response, status, error) in cases {
        let (got, body) = answer(response).await;
        let message = body["error"].as_str().unwrap_or_else(|| panic!("no error: {body}"));
        assert_eq!((got, message.starts_with(error)), (status, true), "{message:?} is not {status} {error:?}");
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_still_loading_is_not_ready_and_says_so() {
    let assets = assets(Duration::from_millis(2500)).await;
    let server = Server::start(mock_args(&assets, &[])).await;
    let response = client().get(server.at("/readyz")).send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(answer(response).await, (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "not ready: loading mock"})));
    let (status, body) = server.classify(json!({"sources": [format!("{}/red.png", assets.uri())]})).await;
    assert_eq!(
        (status, body),
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "the model \"mock\" is not ready yet"}))
    );
    let (status, models) = answer(client().get(server.at("/v1/models")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models, json!({"models": [{"name": "mock", "classes": null, "input": null, "ready": false}]}));
    // Alive all along.
    assert_eq!(answer(client().get(server.at("/healthz")).send().await.unwrap()).await.0, StatusCode::OK);
    let server = {
        let started = Instant::now();
        while client().get(server.at("/readyz")).send().await.unwrap().status() != StatusCode::OK {
            assert!(started.elapsed() < Duration::from_secs(20), "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    };
    let (_, models) = answer(client().get(server.at("/v1/models")).send().await.unwrap()).await;
    assert_eq!(
        models,
        json!({"models": [{"name": "mock", "classes": 3, "input": {"width": 8, "height": 8}, "ready": true}]})
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_that_cannot_load_stops_the_server_with_its_name() {
    let assets = assets(Duration::ZERO).await;
    let mut args = mock_args(&assets, &[]);
    args[2] = format!("mock={}/gone.tflite", assets.uri());
    let server = Server::start(args).await;
    let err = tokio::time::timeout(Duration::from_secs(20), server.task).await.unwrap().unwrap().unwrap_err();
    assert!(format!("{err:#}").starts_with("model \"mock\": cannot fetch the model: "), "{err:#}");
}

#[tokio::test]
async fn past_the_in_flight_limit_requests_are_refused_at_once() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--max-in-flight", "1"])).await;
    let slow = json!({"sources": [format!("{}/slow.png", assets.uri())]});
    let first = server.classify(slow.clone());
    let second = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let started = Instant::now();
        let response = client().post(server.at("/v1/classify")).json(&slow).send().await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(800), "{:?}", started.elapsed());
        assert_eq!(response.headers()["retry-after"], "1");
        answer(response).await
    };
    // A client still sending a large body reads the 503 too, rather than a
    // connection reset by a server that answered before reading it.
    // A client that sends its whole body before it reads (as aiohttp and
    // many simple clients do) must not meet a reset connection.
    let large = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tokio::time::sleep(Duration::from_millis(400)).await;
        let body = vec![0u8; 8 << 20];
        let mut stream = tokio::net::TcpStream::connect(server.url.trim_start_matches("http://")).await.unwrap();
        let head = format!(
            "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&body).await
        };
        sent.await.expect("the body is read, not refused by a reset");
        let mut answer = vec![0; 4096];
        let read = stream.read(&mut answer).await.expect("the answer is read");
        String::from_utf8_lossy(&answer[..read]).into_owned()
    };
    let (first, second, large) = tokio::join!(first, second, large);
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(second, (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "overloaded: too many requests in flight"})));
    assert!(large.starts_with("HTTP/1.1 503"), "{large}");
    assert!(large.ends_with(r#"{"error":"overloaded: too many requests in flight"}"#), "{large}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_request_deadline_makes_late_sources_error_records() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--request-timeout", "0.5"])).await;
    let started = Instant::now();
    let (status, body) = server
        .classify(json!({"sources": [format!("{}/slow.png", assets.uri()), format!("{}/red.png", assets.uri())]}))
        .await;
    assert!(started.elapsed() < Duration::from_millis(1400), "{:?}", started.elapsed());
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["results"][0]["error"], "deadline passed before the image was classified");
    assert_eq!(top1(&body["results"][1]), "red");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_client_cannot_hold_a_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--header-timeout", "0.3", "--body-timeout", "0.3"])).await;
    let address = server.url.trim_start_matches("http://").to_string();
    // Headers never finished: the connection is closed.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.write_all(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut out = vec![];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the connection stayed open");
    // A body that never comes: 408.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\nab")
        .await
        .unwrap();
    let mut out = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("{\"error\":\"the body was not received within 0.3 s\"}"), "{text}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_refuses_new_ones() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let url = server.url.clone();
    let slow = json!({"sources": [format!("{}/slow.png", assets.uri())]});
    let in_flight = tokio::spawn(async move {
        answer(client().post(format!("{url}/v1/classify")).json(&slow).send().await.unwrap()).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at = server.at("/healthz");
    server.stop().await.unwrap();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(top1(&body["results"][0]), "green");
    assert!(client().get(at).send().await.is_err(), "still accepting connections");
}

#[tokio::test]
async fn the_drain_timeout_cuts_requests_that_take_longer() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--drain-timeout", "0.2"])).await;
    let url = server.url.clone();
    let slow = json!({"sources": [format!("{}/slow.png", assets.uri())]});
    let in_flight = tokio::spawn(async move { client().post(format!("{url}/v1/classify")).json(&slow).send().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.stop().await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(1000), "{:?}", started.elapsed());
    drop(in_flight);
}

/// Addresses: 127.0.0.1 is allowed, 127.0.0.2 is not (Linux routes all of
/// 127/8 to the loopback interface).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn only_allowed_addresses_are_reached_directly_or_through_redirects() {
    let assets = assets(Duration::ZERO).await;
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let other = MockServer::builder().listener(listener).start().await;
    mount(&other, "/red.png", ResponseTemplate::new(200).set_body_bytes(png([250, 10, 10]))).await;
    let redirect = |to: String| ResponseTemplate::new(302).insert_header("location", to.as_str());
    mount(&assets, "/to-other", redirect(format!("{}/red.png", other.uri()))).await;
    mount(&assets, "/to-named-other", redirect(format!("http://localhost:{}/red.png", other.address().port()))).await;
    // A chain of redirects on the allowed server: /hop/N goes to /hop/N-1.
    for n in 1..=6 {
        let to = if n == 1 { format!("{}/red.png", assets.uri()) } else { format!("{}/hop/{}", assets.uri(), n - 1) };
        mount(&assets, &format!("/hop/{n}"), redirect(to)).await;
    }
    let server = Server::ready(mock_args(&assets, &[])).await;
    let sources = [
        format!("{}/red.png", assets.uri()),
        format!("{}/red.png", other.uri()),
        format!("{}/to-other", assets.uri()),
        format!("{}/hop/5", assets.uri()),
        format!("{}/hop/6", assets.uri()),
        format!("http://[::ffff:127.0.0.2]:{}/red.png", other.address().port()),
    ];
    let (status, body) = server.classify(json!({ "sources": sources })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(top1(&results[0]), "red");
    assert_eq!(results[1]["error"], "address 127.0.0.2 is not allowed (loopback)");
    assert_eq!(results[2]["error"], "address 127.0.0.2 is not allowed (loopback)");
    assert_eq!(top1(&results[3]), "red", "five redirects are followed");
    assert!(results[4]["error"].as_str().unwrap().contains("too many redirects"), "{}", results[4]);
    assert_eq!(results[5]["error"], "address ::ffff:127.0.0.2 is not allowed (loopback)");
    assert!(other.received_requests().await.unwrap().is_empty(), "127.0.0.2 was reached");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_count_requests_images_and_the_model() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let sources = [format!("{}/red.png", assets.uri()), format!("{}/missing.png", assets.uri())];
    assert_eq!(server.classify(json!({ "sources": sources })).await.0, StatusCode::OK);
    assert_eq!(server.classify(json!({ "sources": [] })).await.0, StatusCode::BAD_REQUEST);
    let response = client().get(server.at("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    for line in [
        "classifier_http_requests_total{route=\"/v1/classify\",status=\"200\"} 1",
        "classifier_http_requests_total{route=\"/v1/classify\",status=\"400\"} 1",
        "classifier_http_request_duration_seconds_count{route=\"/v1/classify\"} 2",
        "classifier_http_requests_in_flight 1",
        "classifier_images_total{model=\"mock\"} 1",
        "classifier_fetch_total{model=\"mock\"} 1",
        "classifier_failures_total{model=\"mock\",kind=\"http_status\"} 1",
        "classifier_model_ready{model=\"mock\"} 1",
        "classifier_queue_depth{model=\"mock\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    server.stop().await.unwrap();
}

/// With the real birds model, a queue of one and one worker, a crowd of
/// requests: every answer is 200 or 503 (with Retry-After), never another.
#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let (Some(model), Some(labels)) = (shared("birds/model.tflite"), shared("birds/labels.csv")) else {
        return;
    };
    // A small image decodes in a fraction of the real model's inference, so
    // that the queue, not the one decoder, is what fills: with a photo, how
    // many requests found the queue full turned on the machine's load.
    let photo = png([200, 120, 40]);
    let args = [
        "serve",
        "--model",
        &format!("birds={}", model.display()),
        "--labels",
        &format!("birds={}", labels.display()),
        "--threads",
        "1",
        "--batch-size",
        "1",
        "--queue",
        "1",
        "--no-cache",
        // One photo sent 24 times: each must reach the queue.
        "--cache-entries",
        "0",
    ];
    let server = Server::ready(args.iter().map(|s| s.to_string()).collect()).await;
    let requests = (0..24).map(|_| {
        let (url, photo) = (server.at("/v1/classify"), photo.clone());
        async move {
            let response = client().post(url).header("content-type", "image/png").body(photo).send().await.unwrap();
            let retry = response.headers().get("retry-after").cloned();
            let (status, body) = answer(response).await;
            (status, retry, body)
        }
    });
    let answers = futures::future::join_all(requests).await;
    let mut counts = (0, 0);
    for (status, retry, body) in &answers {
        match *status {
            StatusCode::OK => counts.0 += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                counts.1 += 1;
                assert_eq!(retry.as_ref().unwrap(), "1");
                assert_eq!(body["error"], "overloaded: too many images are waiting for inference");
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(counts.0 >= 1 && counts.1 >= 1, "{counts:?}");
    server.stop().await.unwrap();
}

/// Top-1 through the server is the reference runtime's, on the real model.
#[tokio::test]
async fn the_birds_model_names_the_bird() {
    let (Some(model), Some(labels), Some(reference)) =
        (shared("birds/model.tflite"), shared("birds/labels.csv"), shared("birds/reference.jsonl"))
    else {
        return;
    };
    let first: Value =
        serde_json::from_str(std::fs::read_to_string(&reference).unwrap().lines().next().unwrap()).unwrap();
    let file = first["image"].as_str().unwrap().to_string();
    let photo = std::fs::read(reference.parent().unwrap().join("images").join(&file)).unwrap();
    let args = [
        "serve",
        "--model",
        &format!("birds={}", model.display()),
        "--labels",
        &format!("birds={}", labels.display()),
        "--no-cache",
    ];
    let server = Server::ready(args.iter().map(|s| s.to_string()).collect()).await;
    let form = Form::new().part("image", Part::bytes(photo).file_name(file.clone()));
    let (status, body) = answer(client().post(server.at("/v1/classify")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expected = first["top"][0]["label"].as_str().unwrap();
    assert_eq!(top1(&body["results"][0]), expected);
    server.stop().await.unwrap();
}

fn binary() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_classifier"))
}

#[test]
fn serve_is_a_subcommand_only_as_the_first_argument() {
    let dir = std::env::temp_dir().join(format!("classifier-serve-source-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("serve"), png([250, 10, 10])).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let model = fixtures.join("mock_model.tflite");
    let labels = fixtures.join("mock_labels.csv");
    for source in ["./serve", "serve"] {
        let out = binary()
            .current_dir(&dir)
            .args(["--model".as_ref(), model.as_os_str(), "--labels".as_ref(), labels.as_os_str()])
            .args(["--format", "json", "-q", source])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let record: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((record["source"].as_str(), top1(&record)), (Some(source), "red"));
    }
    let out = binary().args(["serve", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--listen <ADDR:PORT>") && help.contains("CLASSIFIER_LISTEN"), "{help}");
    let out = binary().args(["serve", "--listen", "nowhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_drains_and_exits_0() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = binary()
        .args(["serve", "--no-cache", "-q"])
        .env("CLASSIFIER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CLASSIFIER_MODEL", format!("mock={}", fixtures.join("mock_model.tflite").display()))
        .env("CLASSIFIER_LABELS", format!("mock={}", fixtures.join("mock_labels.csv").display()))
        .spawn()
        .unwrap();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let started = Instant::now();
    loop {
        if let Ok(response) = client().get(&ready).send().await
            && response.status() == StatusCode::OK
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, models) = answer(client().get(format!("http://127.0.0.1:{port}/v1/models")).send().await.unwrap()).await;
    assert_eq!(models["models"][0]["name"], "mock");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}

/// The command line's model options apply to every model served: the float
/// logits model fed raw pixels answers its logit with `--scores raw`, and
/// its softmax without.
#[tokio::test]
async fn the_command_lines_model_options_apply_to_the_models_served() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/float_logits.tflite");
    let model = format!("logits={}", model.display());
    let red = png([255, 0, 0]);
    let top_score = |server: &Server| {
        let request = client().post(server.at("/v1/classify")).header("content-type", "image/png").body(red.clone());
        async move {
            let (status, body) = answer(request.send().await.unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["results"][0]["predictions"][0]["score"].as_f64().unwrap()
        }
    };
    let raw_pixels = ["serve", "--model", &model, "--mean", "0", "--std", "1", "--threads", "1"];
    let args = |extra: &[&str]| [&raw_pixels[..], extra].concat().into_iter().map(String::from).collect();
    let server = Server::ready(args(&["--scores", "raw"])).await;
    // logits [2.55, 0, 0] for a pure red image in [0, 255]
    let score = top_score(&server).await;
    assert!((score - 2.55).abs() < 0.01, "the logit itself: {score}");
    server.stop().await.unwrap();
    let server = Server::ready(args(&[])).await;
    let score = top_score(&server).await;
    assert!((score - 0.8649).abs() < 0.01, "the softmax of the logits: {score}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn with_an_api_key_classify_needs_it_and_health_does_not() {
    let assets = assets(Duration::ZERO).await;
    let dir = std::env::temp_dir().join(format!("classifier-serve-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    let server = Server::ready(mock_args(&assets, &["--api-key-file", key_file.to_str().unwrap()])).await;
    let body = json!({"sources": [format!("{}/red.png", assets.uri())]});
    let classify = |key: Option<&str>| {
        let request = client().post(server.at("/v1/classify")).json(&body);
        match key {
            Some(key) => request.header("authorization", key),
            None => request,
        }
        .send()
    };

    let response = classify(None).await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], r#"Bearer realm="classifier""#);
    let (status, answer_body) = answer(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer_body["error"].as_str().unwrap().contains("Authorization: Bearer"), "{answer_body}");
    for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
        let response = classify(Some(wrong)).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let response = classify(Some("Bearer wrong")).await.unwrap();
    assert!(response.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));
    assert_eq!(answer(response).await.1, json!({"error": "wrong API key"}));
    let (status, answer_body) = answer(classify(Some("Bearer s3cret")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer_body}");
    assert_eq!(top1(&answer_body["results"][0]), "red");
    // Every route that spends the server's work, or tells what others
    // asked, holds the key, in both protocols.
    for keyed in ["/v2/models/mock/infer", "/v2/models/mock/versions/1/infer", "/v2/models/nope/infer"] {
        let response = client().post(server.at(keyed)).json(&json!({"inputs": []})).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{keyed}");
    }
    let usage = client().get(server.at("/v1/usage")).send().await.unwrap();
    assert_eq!(usage.status(), StatusCode::UNAUTHORIZED);
    let usage = client().get(server.at("/v1/usage")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(usage.status(), StatusCode::OK);
    // A wrong method does no work: 405, key or not.
    let wrong_method = client().get(server.at("/v1/classify")).send().await.unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    // What orchestrators and scrapers call holds no key.
    for open in [
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/models",
        "/v2",
        "/v2/health/ready",
        "/v2/models/mock",
        "/openapi.json",
    ] {
        assert_eq!(client().get(server.at(open)).send().await.unwrap().status(), StatusCode::OK, "{open}");
    }
    server.stop().await.unwrap();

    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn cors_is_off_unless_origins_are_named() {
    let assets = assets(Duration::ZERO).await;
    let preflight = |server: &Server| {
        client()
            .request(reqwest::Method::OPTIONS, server.at("/v1/classify"))
            .header("origin", "https://photos.example.org")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    let server = Server::ready(mock_args(&assets, &[])).await;
    let response = preflight(&server).await.unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());
    server.stop().await.unwrap();

    let server = Server::ready(mock_args(&assets, &["--cors-origin", "https://photos.example.org"])).await;
    let response = preflight(&server).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["access-control-allow-origin"], "https://photos.example.org");
    let allowed = response.headers()["access-control-allow-headers"].to_str().unwrap().to_string();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    // Another origin is not told it may.
    let response =
        client().get(server.at("/v1/models")).header("origin", "https://evil.example.net").send().await.unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());
    let response =
        client().get(server.at("/v1/models")).header("origin", "https://photos.example.org").send().await.unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], "https://photos.example.org");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn results_are_cached_by_url_and_by_content_and_a_url_is_fetched_once() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let red = format!("{}/red.png", assets.uri());
    let (_, first) = server.classify(json!({"sources": [&red]})).await;
    assert!(first["results"][0].get("cached").is_none(), "{first}");
    let (_, again) = server.classify(json!({"sources": [&red]})).await;
    assert_eq!(again["results"][0]["cached"], true, "{again}");
    assert_eq!(again["results"][0]["predictions"], first["results"][0]["predictions"]);
    // Another top_k is another result.
    let (_, other_k) = server.classify(json!({"sources": [&red], "top_k": 1})).await;
    assert!(other_k["results"][0].get("cached").is_none(), "{other_k}");

    // Eight requests at once for a slow URL: one download, one classification.
    let slow = format!("{}/slow.png", assets.uri());
    let answers = futures::future::join_all((0..8).map(|_| server.classify(json!({"sources": [&slow]})))).await;
    let fetched = assets.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/slow.png").count();
    assert_eq!(fetched, 1);
    assert!(answers.iter().all(|(status, body)| *status == StatusCode::OK && top1(&body["results"][0]) == "green"));
    assert_eq!(answers.iter().filter(|(_, body)| body["results"][0].get("cached").is_none()).count(), 1);

    // An upload is known by its content, whatever its name.
    let upload = |name: &'static str| {
        let form = Form::new().part("image", Part::bytes(png([10, 10, 250])).file_name(name));
        client().post(server.at("/v1/classify")).multipart(form).send()
    };
    let first = answer(upload("a.png").await.unwrap()).await.1;
    let second = answer(upload("b.png").await.unwrap()).await.1;
    assert!(first["results"][0].get("cached").is_none());
    assert_eq!((&second["results"][0]["source"], &second["results"][0]["cached"]), (&json!("b.png"), &json!(true)));

    // Failures are not kept: a URL that was missing is fetched again.
    let missing = format!("{}/later.png", assets.uri());
    let (_, gone) = server.classify(json!({"sources": [&missing]})).await;
    assert_eq!(gone["results"][0]["error"], "HTTP 404 Not Found");
    mount(&assets, "/later.png", ResponseTemplate::new(200).set_body_bytes(png([250, 10, 10]))).await;
    let (_, found) = server.classify(json!({"sources": [&missing]})).await;
    assert_eq!(top1(&found["results"][0]), "red");

    let text = client().get(server.at("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in ["classifier_result_cache_hits_total 9", "classifier_result_cache_misses_total 6"] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    server.stop().await.unwrap();

    let server = Server::ready(mock_args(&assets, &["--cache-entries", "0"])).await;
    for _ in 0..2 {
        let (_, body) = server.classify(json!({"sources": [&red]})).await;
        assert!(body["results"][0].get("cached").is_none(), "{body}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn usage_reports_the_most_asked_sources_with_their_times() {
    let assets = assets(Duration::ZERO).await;
    let dir = std::env::temp_dir().join(format!("classifier-serve-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), "k").unwrap();
    let key_file = dir.join("key").display().to_string();
    let server = Server::ready(mock_args(&assets, &["--api-key-file", &key_file, "--usage-top", "2"])).await;
    let (red, blue) = (format!("{}/red.png", assets.uri()), format!("{}/blue.png", assets.uri()));
    let classify = |body: Value| client().post(server.at("/v1/classify")).bearer_auth("k").json(&body).send();
    for sources in [json!([&red, &blue]), json!([&red]), json!([&red, "ftp://h/x.png"])] {
        assert_eq!(classify(json!({ "sources": sources })).await.unwrap().status(), StatusCode::OK);
    }
    let upload = || {
        client()
            .post(server.at("/v1/classify"))
            .bearer_auth("k")
            .header("content-type", "image/png")
            .body(png([250, 10, 10]))
            .send()
    };
    upload().await.unwrap();
    upload().await.unwrap();
    let usage = |query: &str| client().get(server.at(&format!("/v1/usage{query}"))).bearer_auth("k").send();
    let (status, report) = answer(usage("").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["window_seconds"], 259200.0);
    assert_eq!(report["exact"], true);
    let sources = report["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "--usage-top: {report}");
    assert_eq!(
        (&sources[0]["source"], &sources[0]["requests"], &sources[0]["failures"]),
        (&json!(red), &json!(3), &json!(0))
    );
    let digest = sources[1]["source"].as_str().unwrap();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(sources[1]["requests"], 2);
    let (min, mean, max) = (
        sources[0]["min_ms"].as_f64().unwrap(),
        sources[0]["mean_ms"].as_f64().unwrap(),
        sources[0]["max_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= mean && mean <= max && max < 30_000.0, "{}", sources[0]);

    let (_, all) = answer(usage("?top=10").await.unwrap()).await;
    let all: Vec<(&str, u64)> = all["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["source"].as_str().unwrap(), s["requests"].as_u64().unwrap()))
        .collect();
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.contains(&(blue.as_str(), 1)) && all.contains(&("ftp://h/x.png", 1)), "{all:?}");
    for bad in ["?top=0", "?top=x", "?top=100000", "?other=1"] {
        let (status, body) = answer(usage(bad).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    // The report tells what others asked: it takes the key.
    let response = client().get(server.at("/v1/usage")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every route of the OpenAPI document is served, and the routes a client
/// looks for first are in it.
#[tokio::test]
async fn the_openapi_document_describes_the_routes_served() {
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &[])).await;
    let (status, doc) = answer(client().get(server.at("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = vec![];
    for (path, methods) in paths {
        // A path item holds its methods and the parameters they share.
        for method in methods.as_object().unwrap().keys().filter(|k| *k != "parameters") {
            documented.push(format!("{} {path}", method.to_uppercase()));
            let url = server.at(&path.replace("{name}", "mock").replace("{version}", "1"));
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = client().request(method, url).send().await.unwrap();
            let status = response.status();
            let text = response.text().await.unwrap();
            assert!(status != StatusCode::METHOD_NOT_ALLOWED && !text.contains("no route"), "{path}: {status} {text}");
        }
    }
    // What a client of the API would look for first.
    for route in [
        "GET /",
        "POST /v1/classify",
        "GET /v1/models",
        "GET /v1/usage",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /v2",
        "GET /v2/models/{name}",
        "POST /v2/models/{name}/infer",
    ] {
        assert!(documented.iter().any(|d| d == route), "{route} is not documented: {documented:?}");
    }
    // Every $ref resolves.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/").skip(1) {
        let pointer = format!("/{}", &reference[..reference.find('"').unwrap()]);
        assert!(doc.pointer(&pointer).is_some(), "{pointer} does not resolve");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn at_most_concurrency_downloads_are_in_flight_over_all_requests() {
    use std::sync::atomic::Ordering;
    let (host, peak) = support::counting_host(png([250, 10, 10]), Duration::from_millis(150)).await;
    let assets = assets(Duration::ZERO).await;
    let server = Server::ready(mock_args(&assets, &["--concurrency", "2"])).await;
    let request = |first: usize| {
        let sources: Vec<String> = (first..first + 4).map(|n| format!("{host}/{n}.png")).collect();
        server.classify(json!({ "sources": sources }))
    };
    let (a, b) = tokio::join!(request(0), request(4));
    for (status, body) in [a, b] {
        assert_eq!(status, StatusCode::OK, "{body}");
        let results = body["results"].as_array().unwrap();
        assert!(results.len() == 4 && results.iter().all(|r| top1(r) == "red"), "{body}");
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!((1..=2).contains(&peak), "{peak} downloads held at once");
    server.stop().await.unwrap();
}
