//! What the input stage's tests share: loopback servers of files, and
//! fetchers and caches of their own.

use std::time::Duration;

use wiremock::ResponseTemplate;

use super::cache::Cache;
use super::fetch::{FetchSettings, Fetcher};
use super::policy::SourcePolicy;

/// A fetcher with the command line's policy and a generous time limit.
pub fn fetcher(cache: Option<&Cache>) -> Fetcher {
    let settings =
        FetchSettings { timeout: Duration::from_secs(5), policy: SourcePolicy::ALLOW_ALL, cache: cache.cloned() };
    Fetcher::new(settings).unwrap()
}

/// A file served the way static hosts do: byte ranges honoured (when
/// `ranges` says so) and pinned by ETag, or the whole file for a Range
/// request that does not fit.
pub fn file_server(body: Vec<u8>, ranges: impl Fn(u64) -> bool + Send + Sync + 'static) -> impl wiremock::Respond {
    versioned_file_server(body, "\"v1\"", ranges)
}

/// `file_server` for the version named by `etag`, answering 304 Not
/// Modified to a request that names it in If-None-Match.
pub fn versioned_file_server(
    body: Vec<u8>,
    etag: &'static str,
    ranges: impl Fn(u64) -> bool + Send + Sync + 'static,
) -> impl wiremock::Respond {
    move |request: &wiremock::Request| {
        if request.headers.get("if-none-match").is_some_and(|v| v == etag) {
            return ResponseTemplate::new(304).insert_header("etag", etag);
        }
        let whole = ResponseTemplate::new(200).insert_header("etag", etag).set_body_bytes(body.clone());
        let Some(range) = request.headers.get("range").and_then(|v| v.to_str().ok()) else { return whole };
        let (first, last) = range.strip_prefix("bytes=").unwrap().split_once('-').unwrap();
        let first: u64 = first.parse().unwrap();
        let last: u64 = if last.is_empty() { body.len() as u64 - 1 } else { last.parse().unwrap() };
        if !ranges(first) || request.headers.get("if-range").is_some_and(|v| v != etag) {
            return whole;
        }
        if first >= body.len() as u64 {
            return ResponseTemplate::new(416).insert_header("content-range", format!("bytes */{}", body.len()));
        }
        let last = last.min(body.len() as u64 - 1);
        ResponseTemplate::new(206)
            .insert_header("etag", etag)
            .insert_header("content-range", format!("bytes {first}-{last}/{}", body.len()))
            .set_body_bytes(body[first as usize..=last as usize].to_vec())
    }
}

pub fn model_bytes(len: u32) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

pub fn scratch_cache(name: &str) -> Cache {
    let dir = std::env::temp_dir().join(format!("classifier-fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Cache::new(dir)
}

/// An HTTP server that answers every request with a promise of
/// `length` bytes, sends `sent`, and hangs up.
pub async fn breaking_server(length: usize, sent: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = vec![0; 4096];
            let _ = socket.read(&mut request).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\netag: \"v2\"\r\n\r\n");
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(sent).await;
        }
    });
    format!("http://{address}/model")
}
