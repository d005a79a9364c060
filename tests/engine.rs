//! The engine as a library, in-process, against loopback servers the tests
//! start: what a front end (the command line, a server) can count on.

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use classifier::deadline::Deadline;
use classifier::engine::{Engine, EngineSettings, ErrorKind, Input, LoadError, Request, SourceError, WhenFull};
use classifier::input::{FetchSettings, Fetcher, Source, SourcePolicy};
use classifier::rank::Scores;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn png(rgb: [u8; 3]) -> Bytes {
    let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(48, 32, Rgb(rgb)));
    let mut out = Cursor::new(vec![]);
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner().into()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)).unwrap()
}

async fn serve_labels(server: &MockServer) {
    Mock::given(path("/labels.csv"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(fixture("mock_labels.csv")))
        .mount(server)
        .await;
}

/// A server with the mock model (answering after `model_delay`) and labels.
async fn server(model_delay: Duration) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(path("/model.tflite"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(fixture("mock_model.tflite")).set_delay(model_delay))
        .mount(&server)
        .await;
    serve_labels(&server).await;
    server
}

fn settings(server: &MockServer) -> EngineSettings {
    EngineSettings {
        arithmetic: classifier::model::Arithmetic::default(),
        model: vec![Source::parse(&format!("{}/model.tflite", server.uri())).unwrap()],
        model_input: None,
        labels: Some(Source::parse(&format!("{}/labels.csv", server.uri())).unwrap()),
        normalization: None,
        scores: Scores::Auto,
        threads: 2,
        batch_size: 4,
        queue: 8,
        max_image_bytes: 1 << 20,
        exif_orientation: true,
        decoding: classifier::image::Decoding::Exact,
        channels: Default::default(),
    }
}

fn fetcher(policy: SourcePolicy) -> Fetcher {
    Fetcher::new(FetchSettings { timeout: Duration::from_secs(5), policy, cache: None }).unwrap()
}

fn upload(rgb: [u8; 3]) -> Input {
    Input::Bytes { name: "upload".into(), bytes: png(rgb) }
}

const WAIT: Request = Request { top_k: 3, deadline: Deadline::NEVER, when_full: WhenFull::Wait };

#[tokio::test]
async fn one_engine_classifies_uploads_and_urls_and_counts_what_it_did() {
    let server = server(Duration::ZERO).await;
    Mock::given(path("/blue.png"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(png([10, 10, 250]).to_vec()))
        .mount(&server)
        .await;
    let engine = Engine::start(settings(&server), fetcher(SourcePolicy::ALLOW_ALL));
    let loaded = engine.ready().await.unwrap();
    assert_eq!((loaded.input.width, loaded.input.height, loaded.classes), (8, 8, 3));
    assert!(loaded.model_source.to_string().ends_with("/model.tflite"));

    let red = engine.classify(upload([250, 10, 10]), WAIT).await.unwrap();
    assert_eq!(red.len(), 3);
    assert_eq!((red[0].label.as_deref(), red[0].index), (Some("red"), 0));
    let blue = Source::parse(&format!("{}/blue.png", server.uri())).unwrap();
    assert_eq!(engine.classify(Input::Source(blue), WAIT).await.unwrap()[0].label.as_deref(), Some("blue"));
    let gone = Source::parse(&format!("{}/gone.png", server.uri())).unwrap();
    let err = engine.classify(Input::Source(gone), WAIT).await.unwrap_err();
    assert_eq!(err.to_string(), "HTTP 404 Not Found");
    assert_eq!(err.kind(), ErrorKind::Http(reqwest::StatusCode::NOT_FOUND));
    let err = engine.classify(Input::Bytes { name: "text".into(), bytes: "hello".into() }, WAIT).await.unwrap_err();
    assert_eq!((err.to_string().as_str(), err.kind()), ("not an image (the content is text)", ErrorKind::NotImage));

    let seen = engine.metrics().snapshot();
    assert_eq!((seen.images, seen.downloads), (2, 1), "{seen:?}");
    let failed = |kind: ErrorKind| seen.failures.iter().find(|(k, _)| k.index() == kind.index()).unwrap().1;
    assert_eq!((failed(ErrorKind::Http(reqwest::StatusCode::OK)), failed(ErrorKind::NotImage)), (1, 1));
    assert!(seen.inference_time > Duration::ZERO && seen.model_prepare > Duration::ZERO);
}

#[tokio::test]
async fn a_deadline_that_passes_while_the_model_loads_ends_the_wait() {
    let server = server(Duration::from_secs(3)).await;
    let engine = Engine::start(settings(&server), fetcher(SourcePolicy::ALLOW_ALL));
    let started = Instant::now();
    let request = Request { deadline: Deadline::after(Duration::from_millis(200)), ..WAIT };
    let err = engine.classify(upload([250, 10, 10]), request).await.unwrap_err();
    assert!(matches!(err, SourceError::Deadline), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(err.kind(), ErrorKind::Deadline);
}

#[tokio::test]
async fn a_full_queue_refuses_a_caller_that_will_not_wait() {
    // The model's size is known in advance, so images are prepared and queued
    // while it loads: the queue fills up.
    let server = server(Duration::from_millis(1500)).await;
    let settings = EngineSettings { model_input: Some((8, 8)), queue: 1, threads: 1, ..settings(&server) };
    let engine = Engine::start(settings, fetcher(SourcePolicy::ALLOW_ALL));
    let refuse = Request { when_full: WhenFull::Refuse, ..WAIT };
    let first = tokio::spawn({
        let engine = engine.clone();
        async move { engine.classify(upload([250, 10, 10]), refuse).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = engine.classify(upload([10, 250, 10]), refuse).await.unwrap_err();
    assert!(matches!(err, SourceError::Overloaded), "{err}");
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    // Nor is an image fetched for a queue that is full.
    let url = Source::parse(&format!("{}/green.png", server.uri())).unwrap();
    let err = engine.classify(Input::Source(url), refuse).await.unwrap_err();
    assert!(matches!(err, SourceError::Overloaded), "{err}");
    let requests = server.received_requests().await.unwrap();
    assert!(requests.iter().all(|r| r.url.path() != "/green.png"), "fetched for a full queue");
    // The one that found room is classified once the model is there.
    assert_eq!(first.await.unwrap().unwrap()[0].label.as_deref(), Some("red"));
}

#[tokio::test]
async fn callers_waiting_for_room_fail_when_the_model_cannot_load() {
    let server = MockServer::start().await;
    Mock::given(path("/model.tflite"))
        .respond_with(ResponseTemplate::new(404).set_delay(Duration::from_millis(600)))
        .mount(&server)
        .await;
    serve_labels(&server).await;
    let settings = EngineSettings { model_input: Some((8, 8)), queue: 1, threads: 1, ..settings(&server) };
    let engine = Engine::start(settings, fetcher(SourcePolicy::ALLOW_ALL));
    // One image fills the queue; the next waits for room, then the model fails.
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.classify(upload([250, 10, 10]), WAIT).await })
        })
        .collect();
    for caller in callers {
        let err = tokio::time::timeout(Duration::from_secs(5), caller).await.expect("a caller hung").unwrap();
        assert!(matches!(err, Err(SourceError::Unavailable)), "{err:?}");
    }
    // And a caller that comes later fails at once.
    let err = engine.classify(upload([250, 10, 10]), WAIT).await.unwrap_err();
    assert!(matches!(err, SourceError::Unavailable), "{err}");
}

#[tokio::test]
async fn a_model_that_cannot_load_fails_every_image_and_says_why() {
    let server = MockServer::start().await;
    serve_labels(&server).await;
    let engine = Engine::start(settings(&server), fetcher(SourcePolicy::ALLOW_ALL));
    let err = engine.classify(upload([250, 10, 10]), WAIT).await.unwrap_err();
    assert!(matches!(err, SourceError::Unavailable), "{err}");
    let err = engine.ready().await.unwrap_err();
    assert!(matches!(err, LoadError::FetchModel(_)), "{err}");
    assert!(err.to_string().ends_with("/model.tflite: HTTP 404 Not Found"), "{err}");
}

#[tokio::test]
async fn a_public_only_engine_refuses_local_files_and_loopback() {
    let server = server(Duration::ZERO).await;
    // The model and labels come from loopback, named by whoever runs the
    // engine; the images are what strangers send.
    let strangers = Engine::start(settings(&server), fetcher(SourcePolicy::PUBLIC_ONLY));
    strangers.ready().await.unwrap();
    for source in [format!("{}/red.png", server.uri()), "fixtures/mock_labels.csv".into()] {
        let err = strangers.classify(Input::Source(Source::parse(&source).unwrap()), WAIT).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Denied, "{source}: {err}");
    }
}
