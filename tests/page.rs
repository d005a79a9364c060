//! The page at `GET /` of `classifier serve`: its headers and content, and
//! the page itself in a real browser (tests/page_browser.py: headless
//! Chromium under Selenium, run by `$CLASSIFIER_TEST_PYTHON`) against a
//! server started in-process on 127.0.0.1, over the real birds model from
//! ../shared when it is there, else the mock model and generated photos.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use support::{Server, client, fixture_path, png, shared};
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The whole browser run, Chromium's start included; the script stops
/// itself sooner (its own deadline closes the browser).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(240);

/// The mock model, from the project's own files, named `name`.
fn mock_model(name: &str) -> [String; 4] {
    [
        "--model".into(),
        format!("{name}={}", fixture_path("mock_model.tflite").display()),
        "--labels".into(),
        format!("{name}={}", fixture_path("mock_labels.csv").display()),
    ]
}

fn serve_args(models: &[[String; 4]], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["serve".to_string(), "--no-cache".into(), "--threads".into(), "1".into()];
    args.extend(models.iter().flatten().cloned());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A folder of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("classifier-page-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Python interpreter with Selenium, when CI or the developer names one
/// and Chromium and its driver are installed.
fn browser_python() -> Option<String> {
    let Ok(python) = std::env::var("CLASSIFIER_TEST_PYTHON") else {
        eprintln!("skipped: CLASSIFIER_TEST_PYTHON is unset (a Python with selenium)");
        return None;
    };
    for (variable, default) in
        [("CLASSIFIER_TEST_CHROMIUM", "/usr/bin/chromium"), ("CLASSIFIER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")]
    {
        let path = std::env::var(variable).unwrap_or_else(|_| default.to_string());
        if !Path::new(&path).exists() {
            eprintln!("skipped: {path} is absent (set {variable})");
            return None;
        }
    }
    Some(python)
}

/// Runs tests/page_browser.py on the page at `url`; its output is the
/// test's, and its failure says what the page showed. Its output goes to
/// files (a full pipe cannot stall it), and a run past the timeout is
/// killed. std's process rather than tokio's: tokio's `process` feature
/// would rebuild every crate over tokio for the tests alone.
async fn in_the_browser(python: &str, url: &str, args: &[String], dir: &TempDir) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/page_browser.py");
    let (out, err) = (dir.0.join("browser.out"), dir.0.join("browser.err"));
    let mut child = std::process::Command::new(python)
        .arg(&script)
        .arg(url)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (stdout, stderr) = (std::fs::read_to_string(&out).unwrap(), std::fs::read_to_string(&err).unwrap());
    eprintln!("{stdout}");
    let Some(status) = status else {
        panic!("the browser test ran longer than {} s:\n{stdout}\n{stderr}", BROWSER_TIMEOUT.as_secs())
    };
    assert!(status.success(), "the browser test failed ({status}):\n{stdout}\n{stderr}");
}

/// Two photos and their expected top-1 labels, and the models served: the
/// birds model and its photos when ../shared has them, else the mock model
/// and red and blue PNG files.
struct Photos {
    models: Vec<[String; 4]>,
    photos: Vec<(String, String)>,
}

fn photos(dir: &TempDir) -> Photos {
    let birds = (shared("birds/model.tflite"), shared("birds/labels.csv"), shared("birds/images"));
    if let (Some(model), Some(labels), Some(images)) = birds {
        let model = [
            "--model".into(),
            format!("birds={}", model.display()),
            "--labels".into(),
            format!("birds={}", labels.display()),
        ];
        let photo = |name: &str| images.join(name).display().to_string();
        return Photos {
            models: vec![model],
            photos: vec![
                (photo("american_robin.jpg"), "Turdus migratorius".into()),
                (photo("northern_cardinal.jpg"), "Cardinalis cardinalis".into()),
            ],
        };
    }
    Photos {
        models: vec![mock_model("mock")],
        photos: vec![
            (dir.write("red.png", &png([250, 10, 10])), "red".into()),
            (dir.write("blue.png", &png([10, 10, 250])), "blue".into()),
        ],
    }
}

#[tokio::test]
async fn the_page_is_one_html_file_under_a_strict_policy_calling_the_api() {
    let server = Server::ready(serve_args(&[mock_model("mock")], &[])).await;
    let response = client().get(server.at("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let policy = headers["content-security-policy"].to_str().unwrap().to_string();
    let page = response.text().await.unwrap();
    assert!(page.starts_with("<!doctype html>"), "{}", &page[..100]);
    // The inline script and style run by their hashes, and nothing else.
    let hash = |tag: &str| {
        let inner = page.split_once(&format!("<{tag}>")).unwrap().1.split_once(&format!("</{tag}>")).unwrap().0;
        let digest = ring::digest::digest(&ring::digest::SHA256, inner.as_bytes());
        format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest))
    };
    let directives: Vec<&str> = policy.split("; ").collect();
    for directive in [
        "default-src 'none'".to_string(),
        format!("script-src {}", hash("script")),
        format!("style-src {}", hash("style")),
        "connect-src 'self'".into(),
        "frame-ancestors 'none'".into(),
    ] {
        assert!(directives.contains(&directive.as_str()), "no {directive:?} in {policy:?}");
    }
    // Self-contained: no asset of any other file or origin.
    assert!(!page.contains(" src=") && !page.contains(" href="), "the page loads something else");
    for route in ["\"/v1/classify\"", "\"/v1/models\"", "Authorization", "Bearer "] {
        assert!(page.contains(route), "the page does not name {route}");
    }
    let response = client().post(server.at("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.text().await.unwrap(), r#"{"error":"/ does not take POST"}"#);
    server.stop().await.unwrap();
}

/// Two photos uploaded through the file input, two URLs pasted (one gone),
/// and the second model picked in the picker.
#[tokio::test]
async fn photos_and_urls_are_classified_in_a_browser() {
    let Some(python) = browser_python() else { return };
    let dir = TempDir::new("browser");
    let Photos { mut models, photos } = photos(&dir);
    // A second model, so that the picker shows; the mock model tells red.
    let other = if models[0][1].starts_with("birds=") { "mock" } else { "mock2" };
    models.push(mock_model(other));
    let red = dir.write("red-for-the-other-model.png", &png([250, 10, 10]));
    let links = MockServer::start().await;
    let first = std::fs::read(&photos[0].0).unwrap();
    Mock::given(path("/photo")).respond_with(ResponseTemplate::new(200).set_body_bytes(first)).mount(&links).await;
    let server = Server::ready(serve_args(&models, &["--allow-address", "127.0.0.1/32"])).await;
    let default = models[0][1].split_once('=').unwrap().0.to_string();
    let mut args: Vec<String> = vec![];
    for (photo, label) in &photos {
        args.extend(["--photo".into(), photo.clone(), label.clone()]);
    }
    args.extend([
        "--link".into(),
        format!("{}/photo", links.uri()),
        photos[0].1.clone(),
        "--broken-link".into(),
        format!("{}/gone.jpg", links.uri()),
        "HTTP 404 Not Found".into(),
        "--models".into(),
        default,
        other.into(),
        "--other-model".into(),
        other.into(),
        red,
        "red".into(),
    ]);
    in_the_browser(&python, &server.at("/"), &args, &dir).await;
    server.stop().await.unwrap();
}

/// A server with a key: the page says the key is missing, then sends the
/// same photos again with the key typed in, and remembers it.
#[tokio::test]
async fn the_page_asks_for_the_api_key_and_then_sends_it() {
    let Some(python) = browser_python() else { return };
    let dir = TempDir::new("key");
    let Photos { models, photos } = photos(&dir);
    let key = "photographer-7f3a9c";
    let key_file = dir.write("key", format!("{key}\n").as_bytes());
    let server = Server::ready(serve_args(&models, &["--api-key-file", &key_file])).await;
    let mut args: Vec<String> = vec!["--api-key".into(), key.into()];
    for (photo, label) in &photos {
        args.extend(["--photo".into(), photo.clone(), label.clone()]);
    }
    in_the_browser(&python, &server.at("/"), &args, &dir).await;
    server.stop().await.unwrap();
}
