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
        Source::Url(url) => read_whole(send(client.get(url.clone()), timeout).await?, limit, timeout).await,
    }
}

/// Bytes one range carries. The first ranges are asked for at once, before
/// the file's size is known: a model up to `connections` times this size
/// arrives in one round trip plus its share of the transfer.
const PART_BYTES: u64 = 1 << 20;

/// Fetches a large `source` over up to `connections` parallel connections,
/// each carrying byte ranges, when the server honours Range requests.
///
/// A single connection is often held to a fraction of the path's bandwidth
/// (per-connection throttling, slow TCP windows on long paths), so a large
/// model arrives sooner in parts. The first `connections` parts of
/// `PART_BYTES` are asked for at once; a server without Range support answers
/// the first request with the whole file, and the others are dropped. Once
/// the first answer gives the size, what lies past those parts is split among
/// new ranges pinned with `If-Range` to that version, and every part must
/// carry the same ETag or modification date as the first. Should anything
/// not fit, the file is fetched again in one plain request.
pub async fn fetch_parallel(
    client: &Client,
    timeout: Duration,
    source: &Source,
    limit: u64,
    connections: usize,
) -> Result<Bytes, FetchError> {
    let Source::Url(url) = source else { return fetch(client, timeout, source, limit).await };
    let connections = connections.max(1) as u64;
    let wave: Vec<(u64, u64)> = (1..connections).map(|i| (i * PART_BYTES, (i + 1) * PART_BYTES)).collect();
    let first_wave = futures::future::join_all(
        wave.iter().map(|&(start, end)| fetch_range(client, url.clone(), start, end, None, timeout)),
    );
    let head = async {
        let request = client
            .get(url.clone())
            .header(RANGE, format!("bytes=0-{}", PART_BYTES - 1))
            .header(ACCEPT_ENCODING, "identity");
        let first = match send(request, timeout).await {
            // An empty file has no first byte to give.
            Err(FetchError::Status(StatusCode::RANGE_NOT_SATISFIABLE)) => return Ok(Head::Plain),
            first => first?,
        };
        if first.status() != StatusCode::PARTIAL_CONTENT {
            // No Range support: this is the whole file.
            return Ok(Head::Whole(read_whole(first, limit, timeout).await?));
        }
        let total = match content_range(&first) {
            Some((0, last, total)) if last + 1 == PART_BYTES.min(total) => total,
            _ => return Ok(Head::Plain),
        };
        if total > limit {
            return Err(FetchError::TooLarge { limit });
        }
        // Past the first wave: split now that the size is known, straight
        // to where any redirect led.
        let covered = connections * PART_BYTES;
        let validator = validator(&first);
        let tail: Vec<(u64, u64)> = if total > covered {
            let parts = ((total - covered) / PART_BYTES).clamp(1, connections);
            let part = (total - covered).div_ceil(parts);
            (0..parts).map(|i| (covered + i * part, (covered + (i + 1) * part).min(total))).collect()
        } else {
            vec![]
        };
        let tail = futures::future::join_all(
            tail.iter()
                .map(|&(start, end)| fetch_range(client, first.url().clone(), start, end, validator.clone(), timeout)),
        );
        let mut body = BytesMut::with_capacity(total as usize);
        let first_part = PART_BYTES.min(total);
        let (read, tail) = futures::join!(read_body(first, &mut body, first_part, timeout), tail);
        match read {
            // More than its Content-Range said.
            Err(FetchError::TooLarge { .. }) => return Ok(Head::Plain),
            read => read?,
        }
        if body.len() as u64 != first_part {
            return Ok(Head::Plain);
        }
        Ok(Head::Ranged { body, total, validator, tail })
    };
    let (wave_parts, head) = futures::join!(first_wave, head);
    let (mut body, total, validator, tail) = match head? {
        Head::Whole(body) => return Ok(body),
        Head::Plain => return fetch(client, timeout, source, limit).await,
        Head::Ranged { body, total, validator, tail } => (body, total, validator, tail),
    };
    // The first wave's parts that fall inside the file, then the tail.
    let needed = wave.iter().zip(wave_parts).filter(|((start, _), _)| *start < total).map(|(_, part)| part);
    let parts: Result<Vec<Part>, FetchError> = needed
        .chain(tail)
        .map(|part| match part? {
            Some(part) if part.total == total && part.validator == validator => Ok(part),
            _ => Err(FetchError::Http("a range came from another version of the file".into())),
        })
        .collect();
    match parts {
        Ok(parts) => {
            tracing::debug!(%source, ranges = parts.len() + 1, "fetched in byte ranges");
            parts.iter().for_each(|part| body.extend_from_slice(&part.body));
            Ok(body.freeze())
        }
        Err(e) => {
            tracing::debug!(%source, "fetching in byte ranges failed ({e}), fetching it whole");
            fetch(client, timeout, source, limit).await
        }
    }
}

/// The answer to the first request of `fetch_parallel`.
enum Head {
    /// The server ignored the range and sent the whole file.
    Whole(Bytes),
    /// The first part is in `body`; the others are in `tail` or on their way.
    Ranged { body: BytesMut, total: u64, validator: Option<HeaderValue>, tail: Vec<Result<Option<Part>, FetchError>> },
    /// The answer does not fit a ranged fetch: fetch the file whole.
    Plain,
}

/// One byte range of a file.
struct Part {
    body: BytesMut,
    /// The file's size, and what identifies its version, as this answer gave them.
    total: u64,
    validator: Option<HeaderValue>,
}

/// Fetches bytes `start..end` of `url`, cut at the end of the file; `None` if
/// the file ends before `start`.
async fn fetch_range(
    client: &Client,
    url: reqwest::Url,
    start: u64,
    end: u64,
    if_range: Option<HeaderValue>,
    timeout: Duration,
) -> Result<Option<Part>, FetchError> {
    let mut request =
        client.get(url).header(RANGE, format!("bytes={start}-{}", end - 1)).header(ACCEPT_ENCODING, "identity");
    if let Some(validator) = if_range {
        request = request.header(IF_RANGE, validator);
    }
    let response = match send(request, timeout).await {
        Err(FetchError::Status(StatusCode::RANGE_NOT_SATISFIABLE)) => return Ok(None),
        response => response?,
    };
    let unexpected = || FetchError::Http(format!("the server did not answer the range {start}-{}", end - 1));
    if response.status() != StatusCode::PARTIAL_CONTENT {
        return Err(unexpected());
    }
    let (first, last, total) = content_range(&response).ok_or_else(unexpected)?;
    if first != start || last + 1 != end.min(total) {
        return Err(unexpected());
    }
    let validator = validator(&response);
    let mut body = BytesMut::with_capacity((last + 1 - first) as usize);
    read_body(response, &mut body, last + 1 - first, timeout).await?;
    if body.len() as u64 != last + 1 - first {
        return Err(FetchError::Http(format!("the range {start}-{} came short", end - 1)));
    }
    Ok(Some(Part { body, total, validator }))
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

/// The whole body of `response`, refused past `limit` bytes.
async fn read_whole(response: Response, limit: u64, timeout: Duration) -> Result<Bytes, FetchError> {
    let declared = response.content_length();
    if declared.is_some_and(|len| len > limit) {
        return Err(FetchError::TooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    read_body(response, &mut body, limit, timeout).await?;
    Ok(body.freeze())
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
            if first >= body.len() as u64 {
                return ResponseTemplate::new(416).insert_header("content-range", format!("bytes */{}", body.len()));
            }
            let last = last.min(body.len() as u64 - 1);
            ResponseTemplate::new(206)
                .insert_header("etag", "\"v1\"")
                .insert_header("content-range", format!("bytes {first}-{last}/{}", body.len()))
                .set_body_bytes(body[first as usize..=last as usize].to_vec())
        }
    }

    fn model_bytes(len: u32) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn large_files_come_in_byte_ranges_when_the_server_allows() {
        let server = MockServer::start().await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        // 3 MB fits the first wave of ranges, asked for before the size is
        // known (the last one starts past the end); 6 MB needs one more range.
        for (len, expected) in [
            (
                3_000_000,
                vec!["bytes=0-1048575", "bytes=1048576-2097151", "bytes=2097152-3145727", "bytes=3145728-4194303"],
            ),
            (
                6_000_000,
                vec![
                    "bytes=0-1048575",
                    "bytes=1048576-2097151",
                    "bytes=2097152-3145727",
                    "bytes=3145728-4194303",
                    "bytes=4194304-5999999",
                ],
            ),
        ] {
            server.reset().await;
            let body = model_bytes(len);
            Mock::given(path("/model")).respond_with(file_server(body.clone(), |_| true)).mount(&server).await;
            let model = Source::parse(&format!("{}/model", server.uri())).unwrap();
            let fetched = fetch_parallel(&client, timeout, &model, 1 << 30, 4).await.unwrap();
            assert!(fetched == body, "{len} bytes: the ranges were put together wrong");
            let requests = server.received_requests().await.unwrap();
            let mut ranges: Vec<&str> = requests.iter().map(|r| r.headers["range"].to_str().unwrap()).collect();
            ranges.sort();
            assert_eq!(ranges, expected);
            // Ranges asked for once the version is known are pinned to it.
            let pinned = requests.iter().filter(|r| r.headers.get("if-range").is_some_and(|v| v == "\"v1\"")).count();
            assert_eq!(pinned, expected.len() - 4);
            let err = fetch_parallel(&client, timeout, &model, len as u64 - 1, 4).await.unwrap_err();
            assert!(matches!(err, FetchError::TooLarge { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn without_ranges_the_file_comes_whole() {
        let server = MockServer::start().await;
        let body = model_bytes(3_000_000);
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
        // An empty file cannot answer a range: it is fetched plainly.
        Mock::given(path("/empty")).respond_with(file_server(vec![], |_| true)).mount(&server).await;
        let empty = Source::parse(&format!("{}/empty", server.uri())).unwrap();
        assert!(fetch_parallel(&client, timeout, &empty, 1 << 30, 4).await.unwrap().is_empty());
        let small = Source::parse(&format!("{}/plain", server.uri())).unwrap();
        assert!(matches!(fetch_parallel(&client, timeout, &small, 100, 4).await, Err(FetchError::TooLarge { .. })));
    }
}
