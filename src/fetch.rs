//! The fetch stage: the bytes behind a source, over one shared HTTP client or
//! from the local file system, with a size limit and a timeout.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{ACCEPT_ENCODING, CONTENT_RANGE, ETAG, HeaderValue, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::{Client, Response, StatusCode};

use crate::source::Source;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP {}", status_text(*.0))]
    Status(StatusCode),
    #[error("timed out after {} s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("body larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Http(String),
    #[error("cannot read file: {0}")]
    File(std::io::Error),
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The HTTP client every download shares: rustls, gzip, redirects, and a
/// user agent naming this tool. `timeout` bounds each whole request.
pub fn client(timeout: Duration) -> reqwest::Result<Client> {
    // Several providers may be compiled in; this process uses ring. An error
    // only means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .user_agent(concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()
}

/// Fetches `source`, refusing bodies larger than `limit` bytes.
pub async fn fetch(client: &Client, timeout: Duration, source: &Source, limit: u64) -> Result<Bytes, FetchError> {
    match source {
        Source::Path(path) => read_file(path, limit).await,
        Source::Url(url) => {
            let response = send(client.get(url.clone()), timeout).await?;
            let declared = response.content_length();
            if declared.is_some_and(|len| len > limit) {
                return Err(FetchError::TooLarge { limit });
            }
            let mut body = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
            read_body(response, &mut body, limit, timeout).await?;
            Ok(body.freeze())
        }
    }
}

/// The fewest bytes worth a connection of their own: below this, the extra
/// round trip costs more than the bandwidth a connection adds.
const MIN_PART_BYTES: u64 = 512 << 10;

/// Fetches a large `source` over up to `connections` parallel connections,
/// each carrying one byte range, when the server honours Range requests.
///
/// A single connection is often held to a fraction of the path's bandwidth
/// (per-connection throttling, slow TCP windows on long paths), so a large
/// model arrives sooner in parts. The first request asks for everything
/// (`Range: bytes=0-`): a server without Range support answers it in full and
/// nothing is lost. Once its headers give the size, the rest is split into
/// parts fetched at once, each pinned with `If-Range` to the same version of
/// the file. Should any part fail, the first response is read to its end.
pub async fn fetch_parallel(
    client: &Client,
    timeout: Duration,
    source: &Source,
    limit: u64,
    connections: usize,
) -> Result<Bytes, FetchError> {
    let Source::Url(url) = source else { return fetch(client, timeout, source, limit).await };
    let request = client.get(url.clone()).header(RANGE, "bytes=0-").header(ACCEPT_ENCODING, "identity");
    let response = send(request, timeout).await?;
    let total = match response.status() {
        StatusCode::PARTIAL_CONTENT => match content_range(&response) {
            Some((0, end, total)) if end + 1 == total => total,
            _ => return Err(FetchError::Http("the server answered with a range that was not asked for".into())),
        },
        // No Range support: this is the whole file.
        _ => {
            let declared = response.content_length();
            if declared.is_some_and(|len| len > limit) {
                return Err(FetchError::TooLarge { limit });
            }
            let mut body = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
            read_body(response, &mut body, limit, timeout).await?;
            return Ok(body.freeze());
        }
    };
    if total > limit {
        return Err(FetchError::TooLarge { limit });
    }
    let parts = (total / MIN_PART_BYTES).clamp(1, connections.max(1) as u64);
    let part = total.div_ceil(parts);
    // Later parts go straight to where any redirect led, for the same version.
    let (url, validator) = (response.url().clone(), validator(&response));
    let ranges: Vec<(u64, u64)> = (1..parts).map(|i| (i * part, ((i + 1) * part).min(total))).collect();
    let fetch_part = |(start, end): (u64, u64)| {
        let mut request = client
            .get(url.clone())
            .header(RANGE, format!("bytes={start}-{}", end - 1))
            .header(ACCEPT_ENCODING, "identity");
        if let Some(validator) = &validator {
            request = request.header(IF_RANGE, validator.clone());
        }
        async move {
            let response = send(request, timeout).await?;
            if response.status() != StatusCode::PARTIAL_CONTENT
                || content_range(&response) != Some((start, end - 1, total))
            {
                return Err(FetchError::Http(format!("the server did not answer the range {start}-{}", end - 1)));
            }
            let mut body = BytesMut::with_capacity((end - start) as usize);
            read_body(response, &mut body, end - start, timeout).await?;
            if body.len() as u64 != end - start {
                return Err(FetchError::Http(format!("the range {start}-{} came short", end - 1)));
            }
            Ok(body)
        }
    };

    let mut body = BytesMut::with_capacity(total as usize);
    let mut first = response;
    let head = read_prefix(&mut first, &mut body, part, timeout);
    let (spill, tail) = futures::join!(head, futures::future::join_all(ranges.into_iter().map(fetch_part)));
    let spill = spill?;
    match tail.into_iter().collect::<Result<Vec<BytesMut>, FetchError>>() {
        Ok(tail) => {
            tracing::debug!(%source, parts, "fetched in byte ranges");
            tail.iter().for_each(|t| body.extend_from_slice(t));
        }
        Err(e) => {
            tracing::debug!(%source, "fetching in byte ranges failed ({e}), reading one stream to its end");
            if body.len() as u64 + spill.len() as u64 > total {
                return Err(FetchError::Http("the body is longer than its Content-Range".into()));
            }
            body.extend_from_slice(&spill);
            read_body(first, &mut body, total, timeout).await?;
        }
    }
    if body.len() as u64 != total {
        return Err(FetchError::Http(format!("the body came short: {} of {total} bytes", body.len())));
    }
    Ok(body.freeze())
}

async fn read_file(path: &std::path::Path, limit: u64) -> Result<Bytes, FetchError> {
    let size = tokio::fs::metadata(path).await.map_err(FetchError::File)?.len();
    if size > limit {
        return Err(FetchError::TooLarge { limit });
    }
    tokio::fs::read(path).await.map(Bytes::from).map_err(FetchError::File)
}

/// Sends `request`, turning any answer but a success into an error.
async fn send(request: reqwest::RequestBuilder, timeout: Duration) -> Result<Response, FetchError> {
    let response = request.send().await.map_err(|e| classify(e, timeout))?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    Ok(response)
}

/// Appends the rest of `response` to `body`, which may hold `limit` bytes in all.
async fn read_body(
    mut response: Response,
    body: &mut BytesMut,
    limit: u64,
    timeout: Duration,
) -> Result<(), FetchError> {
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(e, timeout))? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(FetchError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(())
}

/// Reads `response` into `body` until it holds `want` bytes or the body ends,
/// and returns what arrived past `want`; the rest is left unread.
async fn read_prefix(
    response: &mut Response,
    body: &mut BytesMut,
    want: u64,
    timeout: Duration,
) -> Result<Bytes, FetchError> {
    while (body.len() as u64) < want {
        let Some(mut chunk) = response.chunk().await.map_err(|e| classify(e, timeout))? else { break };
        let room = (want - body.len() as u64) as usize;
        if chunk.len() > room {
            let spill = chunk.split_off(room);
            body.extend_from_slice(&chunk);
            return Ok(spill);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::new())
}

/// `(first, last, total)` of a `Content-Range: bytes first-last/total` header.
fn content_range(response: &Response) -> Option<(u64, u64, u64)> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total) = (first.parse().ok()?, last.parse().ok()?, total.parse().ok()?);
    (first <= last && last < total).then_some((first, last, total))
}

/// What pins later ranges to the version of the file the first one came
/// from: a strong ETag, else the modification date.
fn validator(response: &Response) -> Option<HeaderValue> {
    let headers = response.headers();
    headers.get(ETAG).filter(|etag| !etag.as_bytes().starts_with(b"W/")).or_else(|| headers.get(LAST_MODIFIED)).cloned()
}

/// Fetches the first of `sources` that answers, each over up to
/// `connections` connections, logging each fallback.
pub async fn fetch_first(
    client: &Client,
    timeout: Duration,
    sources: &[Source],
    limit: u64,
    connections: usize,
) -> anyhow::Result<Bytes> {
    let mut errors = vec![];
    for (i, source) in sources.iter().enumerate() {
        match fetch_parallel(client, timeout, source, limit, connections).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                if let Some(next) = sources.get(i + 1) {
                    tracing::warn!("cannot fetch {source}: {e}; falling back to {next}");
                }
                errors.push(format!("{source}: {e}"));
            }
        }
    }
    anyhow::bail!("cannot fetch the model: {}", errors.join("; "))
}

/// Turns reqwest's error into one that says what went wrong in a few words.
fn classify(e: reqwest::Error, timeout: Duration) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout(timeout);
    }
    // The innermost cause is the one a user can act on ("Connection refused").
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let cause = cause.to_string();
    if e.is_connect() {
        FetchError::Connect(cause)
    } else if e.is_body() || e.is_decode() {
        FetchError::Http(format!("body interrupted: {cause}"))
    } else {
        FetchError::Http(cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    #[tokio::test]
    async fn falls_back_to_the_next_source() {
        let server = MockServer::start().await;
        Mock::given(path("/kaggle")).respond_with(ResponseTemplate::new(403)).mount(&server).await;
        Mock::given(path("/tfhub"))
            .respond_with(ResponseTemplate::new(200).set_body_string("model"))
            .mount(&server)
            .await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        let url = |p: &str| Source::parse(&format!("{}/{p}", server.uri())).unwrap();
        let bytes = fetch_first(&client, timeout, &[url("kaggle"), url("tfhub")], 100, 4).await.unwrap();
        assert_eq!(&bytes[..], b"model");
        let err = fetch_first(&client, timeout, &[url("kaggle"), url("missing")], 100, 4).await.unwrap_err();
        assert!(err.to_string().ends_with("/missing: HTTP 404 Not Found"), "{err}");
        assert!(err.to_string().contains("/kaggle: HTTP 403 Forbidden"), "{err}");
    }

    #[tokio::test]
    async fn limits_are_checked_for_files_and_streams() {
        let server = MockServer::start().await;
        Mock::given(path("/big"))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![7u8; 5000]))
            .mount(&server)
            .await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        let big = Source::parse(&format!("{}/big", server.uri())).unwrap();
        assert!(matches!(fetch(&client, timeout, &big, 4999).await, Err(FetchError::TooLarge { limit: 4999 })));
        assert_eq!(fetch(&client, timeout, &big, 5000).await.unwrap().len(), 5000);
        let file = Source::Path(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mock_labels.csv").into());
        assert!(matches!(fetch(&client, timeout, &file, 3).await, Err(FetchError::TooLarge { limit: 3 })));
    }

    /// A file served the way static hosts do: byte ranges honoured (when
    /// `ranges` says so) and pinned by ETag, or the whole file for a Range
    /// request that does not fit.
    fn file_server(body: Vec<u8>, ranges: impl Fn(u64) -> bool + Send + Sync + 'static) -> impl wiremock::Respond {
        move |request: &wiremock::Request| {
            let whole = ResponseTemplate::new(200).insert_header("etag", "\"v1\"").set_body_bytes(body.clone());
            let Some(range) = request.headers.get("range").and_then(|v| v.to_str().ok()) else { return whole };
            let (first, last) = range.strip_prefix("bytes=").unwrap().split_once('-').unwrap();
            let first: u64 = first.parse().unwrap();
            let last: u64 = if last.is_empty() { body.len() as u64 - 1 } else { last.parse().unwrap() };
            if !ranges(first) || request.headers.get("if-range").is_some_and(|v| v != "\"v1\"") {
                return whole;
            }
            ResponseTemplate::new(206)
                .insert_header("etag", "\"v1\"")
                .insert_header("content-range", format!("bytes {first}-{last}/{}", body.len()))
                .set_body_bytes(body[first as usize..=last as usize].to_vec())
        }
    }

    fn model_bytes() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn large_files_come_in_byte_ranges_when_the_server_allows() {
        let server = MockServer::start().await;
        let body = model_bytes();
        Mock::given(path("/model")).respond_with(file_server(body.clone(), |_| true)).mount(&server).await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        let model = Source::parse(&format!("{}/model", server.uri())).unwrap();
        let fetched = fetch_parallel(&client, timeout, &model, 1 << 30, 4).await.unwrap();
        assert!(fetched == body, "the ranges were put together wrong");
        let requests = server.received_requests().await.unwrap();
        let mut ranges: Vec<String> =
            requests.iter().map(|r| r.headers["range"].to_str().unwrap().to_string()).collect();
        ranges.sort();
        assert_eq!(ranges, ["bytes=0-", "bytes=1500000-2249999", "bytes=2250000-2999999", "bytes=750000-1499999"]);
        assert!(requests.iter().skip(1).all(|r| r.headers["if-range"] == "\"v1\""));
        let err = fetch_parallel(&client, timeout, &model, 2_999_999, 4).await.unwrap_err();
        assert!(matches!(err, FetchError::TooLarge { limit: 2_999_999 }), "{err}");
    }

    #[tokio::test]
    async fn without_ranges_the_file_comes_whole() {
        let server = MockServer::start().await;
        let body = model_bytes();
        // One server ignores Range; the other honours only the first request,
        // as if the file changed in between.
        Mock::given(path("/plain")).respond_with(file_server(body.clone(), |_| false)).mount(&server).await;
        Mock::given(path("/changed")).respond_with(file_server(body.clone(), |first| first == 0)).mount(&server).await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        for name in ["plain", "changed"] {
            let model = Source::parse(&format!("{}/{name}", server.uri())).unwrap();
            let fetched = fetch_parallel(&client, timeout, &model, 1 << 30, 4).await.unwrap();
            assert!(fetched == body, "{name}: wrong body");
        }
        let small = Source::parse(&format!("{}/plain", server.uri())).unwrap();
        assert!(matches!(fetch_parallel(&client, timeout, &small, 100, 4).await, Err(FetchError::TooLarge { .. })));
    }
}
