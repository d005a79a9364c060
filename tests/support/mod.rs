//! The harness the server tests share (tests/serve.rs, tests/oip.rs,
//! tests/page.rs, and tests/cli.rs for its counting host): one copy, so that a change to how a test server starts,
//! waits or stops is made once. Under a folder, so that Cargo does not build
//! it as a test crate of its own.

// Each test crate that declares `mod support;` uses a different subset of
// it, and an item one crate leaves unused would otherwise warn there.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use classifier::serve::{ServeArgs, ServeSettings};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// How long a server may take to be ready: long enough for the real birds
/// model from ../shared to load on a busy machine, not the mock model alone.
const READY_WITHIN: Duration = Duration::from_secs(30);

pub fn png(rgb: [u8; 3]) -> Vec<u8> {
    let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(48, 32, Rgb(rgb)));
    let mut out = Cursor::new(vec![]);
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap()
}

/// A file of ../shared, which only a checkout with the shared fixtures has:
/// `None` (and a line saying the test is skipped) elsewhere.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures").join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipped: {} is absent", path.display());
        None
    }
}

/// A loopback host that answers every GET with `body` after `hold`, counting
/// the requests it holds at once: its URL, and the most it has held.
pub async fn counting_host(body: Vec<u8>, hold: Duration) -> (String, Arc<AtomicUsize>) {
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (now, peak) = (now, peak.clone());
        move || async move {
            let holding = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(holding, Ordering::SeqCst);
            tokio::time::sleep(hold).await;
            now.fetch_sub(1, Ordering::SeqCst);
            body
        }
    };
    let app = axum::Router::new().route("/{n}", axum::routing::get(handler));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (host, peak)
}

pub async fn mount(server: &MockServer, at: &str, response: ResponseTemplate) {
    Mock::given(path(at)).respond_with(response).mount(server).await;
}

/// The mock model (answering after `delay`, so that a test can see the
/// server before it is ready), its labels, and red, blue and slow images
/// (the slow one holds a request in flight).
pub async fn assets(delay: Duration) -> MockServer {
    let server = MockServer::start().await;
    mount(
        &server,
        "/model.tflite",
        ResponseTemplate::new(200).set_body_bytes(fixture("mock_model.tflite")).set_delay(delay),
    )
    .await;
    mount(&server, "/labels.csv", ResponseTemplate::new(200).set_body_bytes(fixture("mock_labels.csv"))).await;
    mount(&server, "/red.png", ResponseTemplate::new(200).set_body_bytes(png([250, 10, 10]))).await;
    mount(&server, "/blue.png", ResponseTemplate::new(200).set_body_bytes(png([10, 10, 250]))).await;
    mount(
        &server,
        "/slow.png",
        ResponseTemplate::new(200).set_body_bytes(png([10, 250, 10])).set_delay(Duration::from_millis(1500)),
    )
    .await;
    server
}

/// The options of a server of the mock model named `mock` (classes red,
/// green, blue), fetched from `assets`: 127.0.0.1 is allowed, since that is
/// where the model and the images are served.
pub fn mock_args(assets: &MockServer, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--model".into(),
        format!("mock={}/model.tflite", assets.uri()),
        "--labels".into(),
        format!("mock={}/labels.csv", assets.uri()),
        "--allow-address".into(),
        "127.0.0.1/32".into(),
        "--no-cache".into(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `classifier serve` in-process, on a port of its own, so that tests run
/// at once and see the router as a client does.
pub struct Server {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    /// Public for a test of a server that ends by itself, unasked.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Started, not waited on: for the tests of a server before it is
    /// ready, or of one that never is.
    pub async fn start(args: Vec<String>) -> Server {
        let settings = ServeSettings::resolve(&ServeArgs::try_parse_from(args).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            classifier::serve::serve(listener, &settings, async {
                let _ = stopped.await;
            })
            .await
        });
        Server { url, stop: Some(stop), task }
    }

    /// Started, and ready: the models load in the background, and until then
    /// a classification is refused with 503.
    pub async fn ready(args: Vec<String>) -> Server {
        let server = Server::start(args).await;
        let started = Instant::now();
        while client().get(server.at("/readyz")).send().await.unwrap().status() != StatusCode::OK {
            assert!(started.elapsed() < READY_WITHIN, "not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    pub fn at(&self, route: &str) -> String {
        format!("{}{route}", self.url)
    }

    /// Shut down as on a signal, and the server's own result: a test sees
    /// a failure to drain as an error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap()
    }
}

/// A client of the test servers: with the crypto provider rustls needs
/// installed, and no proxy, since one named by the environment would not
/// reach 127.0.0.1.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The status and the JSON body; a body not JSON fails the test with the
/// body itself, to say what came instead.
pub async fn answer(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}")))
}
