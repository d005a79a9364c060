//! The fetch stage: the bytes behind a source, over one shared HTTP client or
//! from the local file system, with a size limit and a timeout.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{
    ACCEPT_ENCODING, CONTENT_RANGE, ETAG, HeaderMap, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    LAST_MODIFIED, RANGE,
};
use reqwest::{Client, Response, StatusCode};

use crate::input::Source;
use crate::input::cache::{Cache, Version};

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
    #[error("body interrupted: {0}")]
    Interrupted(String),
    #[error("{0}")]
    Http(String),
    #[error("cannot read file: {0}")]
    File(std::io::Error),
}

impl FetchError {
    /// Whether the host could not be reached or could not answer, rather
    /// than refusing the request.
    fn is_unreachable(&self) -> bool {
        match self {
            FetchError::Timeout(_) | FetchError::Connect(_) | FetchError::Interrupted(_) => true,
            FetchError::Status(status) => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// A file as downloaded, with what identifies its version.
#[derive(Debug)]
struct Download {
    bytes: Bytes,
    version: Version,
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
        Source::Url(url) => Ok(get(client.get(url.clone()), timeout, limit).await?.bytes),
    }
}

/// Fetches `source`, a large one over up to `connections` connections in
/// byte ranges (see `fetch_parallel`), through `cache` when there is one.
/// A URL kept from an earlier run is asked for only if it changed since
/// (`If-None-Match`, `If-Modified-Since`): unchanged, the kept copy is used;
/// changed, the new one comes in one plain request and is kept in its place. When the host cannot be reached, or fails to answer, the kept copy
/// is used, with a warning (it is unreachable, times out, breaks off, is
/// overloaded or fails with a 5xx); any other answer is final. A download
/// whose server gives no ETag nor modification date is not kept, and
/// replaces nothing: it could never be revalidated.
pub async fn fetch_kept(
    client: &Client,
    timeout: Duration,
    source: &Source,
    limit: u64,
    connections: usize,
    cache: Option<&Cache>,
) -> Result<Bytes, FetchError> {
    let (Source::Url(url), Some(cache)) = (source, cache) else {
        return fetch_parallel(client, timeout, source, limit, connections).await.map(|d| d.bytes);
    };
    let kept = {
        let (cache, url) = (cache.clone(), url.to_string());
        tokio::task::spawn_blocking(move || cache.load(&url)).await.ok().flatten()
    };
    let kept = kept.filter(|kept| kept.version.is_known() && kept.bytes.len() as u64 <= limit);
    let download = match kept {
        None => fetch_parallel(client, timeout, source, limit, connections).await?,
        Some(kept) => {
            let mut request = client.get(url.clone());
            if let Some(etag) = &kept.version.etag {
                request = request.header(IF_NONE_MATCH, etag);
            }
            if let Some(date) = &kept.version.last_modified {
                request = request.header(IF_MODIFIED_SINCE, date);
            }
            match get(request, timeout, limit).await {
                Err(FetchError::Status(StatusCode::NOT_MODIFIED)) => {
                    tracing::info!(%source, "unchanged since it was cached");
                    return Ok(kept.bytes);
                }
                Err(e) if e.is_unreachable() => {
                    tracing::warn!(%source, "{e}; using the copy cached in {}", cache.dir().display());
                    return Ok(kept.bytes);
                }
                download => download?,
            }
        }
    };
    let (store, url, bytes, version) = (cache.clone(), url.to_string(), download.bytes.clone(), download.version);
    let known = version.is_known();
    // Awaited, not left running: the process may exit as soon as the
    // results are out. A few milliseconds for a model.
    let kept = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if known { store.store(&url, &bytes, &version) } else { store.remove(&url) }
    });
    let kept = kept.await.map_err(std::io::Error::other).and_then(|kept| kept);
    match kept {
        Ok(()) if known => tracing::debug!(%source, "cached in {}", cache.dir().display()),
        Ok(()) => {}
        // A folder the user named should work; the default one is a
        // convenience that a read-only or home-less container lacks.
        Err(e) if cache.is_named() => tracing::warn!(%source, "cannot cache it in {}: {e}", cache.dir().display()),
        Err(e) => tracing::debug!(%source, "cannot cache it in {}: {e}", cache.dir().display()),
    }
    Ok(download.bytes)
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
async fn fetch_parallel(
    client: &Client,
    timeout: Duration,
    source: &Source,
    limit: u64,
    connections: usize,
) -> Result<Download, FetchError> {
    let url = match source {
        Source::Url(url) if connections > 1 => url,
        Source::Url(url) => return get(client.get(url.clone()), timeout, limit).await,
        Source::Path(path) => {
            return Ok(Download { bytes: read_file(path, limit).await?, version: Version::default() });
        }
    };
    let connections = connections as u64;
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
        let version = version(first.headers());
        if first.status() != StatusCode::PARTIAL_CONTENT {
            // No Range support: this is the whole file.
            return Ok(Head::Whole(Download { bytes: read_whole(first, limit, timeout).await?, version }));
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
        Ok(Head::Ranged { body, total, validator, version, tail })
    };
    let (wave_parts, head) = futures::join!(first_wave, head);
    let plain = || get(client.get(url.clone()), timeout, limit);
    let (mut body, total, validator, version, tail) = match head? {
        Head::Whole(download) => return Ok(download),
        Head::Plain => return plain().await,
        Head::Ranged { body, total, validator, version, tail } => (body, total, validator, version, tail),
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
            Ok(Download { bytes: body.freeze(), version })
        }
        Err(e) => {
            tracing::debug!(%source, "fetching in byte ranges failed ({e}), fetching it whole");
            plain().await
        }
    }
}

/// The answer to the first request of `fetch_parallel`.
enum Head {
    /// The server ignored the range and sent the whole file.
    Whole(Download),
    /// The first part is in `body`; the others are in `tail` or on their way.
    Ranged {
        body: BytesMut,
        total: u64,
        validator: Option<HeaderValue>,
        version: Version,
        tail: Vec<Result<Option<Part>, FetchError>>,
    },
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

/// Sends `request` and reads the whole answer, refused past `limit` bytes.
async fn get(request: reqwest::RequestBuilder, timeout: Duration, limit: u64) -> Result<Download, FetchError> {
    let response = send(request, timeout).await?;
    let version = version(response.headers());
    Ok(Download { bytes: read_whole(response, limit, timeout).await?, version })
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

/// The ETag and the modification date a server gave a file.
fn version(headers: &HeaderMap) -> Version {
    let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
    Version { etag: text(ETAG), last_modified: text(LAST_MODIFIED) }
}

/// Fetches the first of `sources` that answers, as [`fetch_kept`] does,
/// logging each fallback.
pub async fn fetch_first(
    client: &Client,
    timeout: Duration,
    sources: &[Source],
    limit: u64,
    connections: usize,
    cache: Option<&Cache>,
) -> anyhow::Result<Bytes> {
    let mut errors = vec![];
    for (i, source) in sources.iter().enumerate() {
        match fetch_kept(client, timeout, source, limit, connections, cache).await {
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
        FetchError::Interrupted(cause)
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
        let bytes = fetch_first(&client, timeout, &[url("kaggle"), url("tfhub")], 100, 4, None).await.unwrap();
        assert_eq!(&bytes[..], b"model");
        let err = fetch_first(&client, timeout, &[url("kaggle"), url("missing")], 100, 4, None).await.unwrap_err();
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
        versioned_file_server(body, "\"v1\"", ranges)
    }

    /// `file_server` for the version named by `etag`, answering 304 Not
    /// Modified to a request that names it in If-None-Match.
    fn versioned_file_server(
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
            let fetched = fetch_parallel(&client, timeout, &model, 1 << 30, 4).await.unwrap().bytes;
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
            let fetched = fetch_parallel(&client, timeout, &model, 1 << 30, 4).await.unwrap().bytes;
            assert!(fetched == body, "{name}: wrong body");
        }
        // An empty file cannot answer a range: it is fetched plainly.
        Mock::given(path("/empty")).respond_with(file_server(vec![], |_| true)).mount(&server).await;
        let empty = Source::parse(&format!("{}/empty", server.uri())).unwrap();
        assert!(fetch_parallel(&client, timeout, &empty, 1 << 30, 4).await.unwrap().bytes.is_empty());
        let small = Source::parse(&format!("{}/plain", server.uri())).unwrap();
        assert!(matches!(fetch_parallel(&client, timeout, &small, 100, 4).await, Err(FetchError::TooLarge { .. })));
    }

    fn scratch_cache(name: &str) -> Cache {
        let dir = std::env::temp_dir().join(format!("classifier-fetch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Cache::new(dir)
    }

    #[tokio::test]
    async fn a_cached_file_is_revalidated_replaced_and_used_offline() {
        let server = MockServer::start().await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        let cache = scratch_cache("revalidate");
        let v1 = model_bytes(3_000_000);
        Mock::given(path("/model"))
            .respond_with(versioned_file_server(v1.clone(), "\"v1\"", |_| true))
            .mount(&server)
            .await;
        let model = Source::parse(&format!("{}/model", server.uri())).unwrap();
        let url = format!("{}/model", server.uri());
        let fetch = || fetch_kept(&client, timeout, &model, 1 << 30, 4, Some(&cache));

        // The first run downloads in ranges and keeps the file with its ETag.
        assert!(fetch().await.unwrap() == v1);
        let kept = cache.load(&url).expect("the download was not kept");
        assert!(kept.bytes == v1);
        assert_eq!(kept.version.etag.as_deref(), Some("\"v1\""));

        // The next asks only whether it changed: one request, no body.
        server.reset().await;
        Mock::given(path("/model"))
            .respond_with(versioned_file_server(v1.clone(), "\"v1\"", |_| true))
            .mount(&server)
            .await;
        assert!(fetch().await.unwrap() == v1);
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].headers["if-none-match"], "\"v1\"");
        assert!(requests[0].headers.get("range").is_none());

        // A new version replaces the kept one.
        server.reset().await;
        let v2 = model_bytes(1000);
        Mock::given(path("/model"))
            .respond_with(versioned_file_server(v2.clone(), "\"v2\"", |_| true))
            .mount(&server)
            .await;
        assert!(fetch().await.unwrap() == v2);
        assert_eq!(cache.load(&url).unwrap().version.etag.as_deref(), Some("\"v2\""));

        // A server that fails, or a host that is gone, leaves the kept copy;
        // one that says the file is gone does not.
        server.reset().await;
        Mock::given(path("/model")).respond_with(ResponseTemplate::new(503)).mount(&server).await;
        assert!(fetch().await.unwrap() == v2);
        server.reset().await;
        Mock::given(path("/model")).respond_with(ResponseTemplate::new(404)).mount(&server).await;
        assert!(matches!(fetch().await, Err(FetchError::Status(StatusCode::NOT_FOUND))));
        // A port where nothing listens.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let url = format!("http://{gone}/model");
        cache.store(&url, &v2, &Version { etag: Some("\"v2\"".into()), last_modified: None }).unwrap();
        let model = Source::parse(&url).unwrap();
        assert!(fetch_kept(&client, timeout, &model, 1 << 30, 4, Some(&cache)).await.unwrap() == v2);
        std::fs::remove_dir_all(cache.dir()).unwrap();
    }

    #[tokio::test]
    async fn a_modification_date_is_enough_to_revalidate() {
        let server = MockServer::start().await;
        let date = "Mon, 23 Nov 2026 10:00:00 GMT";
        Mock::given(path("/labels.csv"))
            .respond_with(move |request: &wiremock::Request| {
                if request.headers.get("if-modified-since").is_some_and(|v| v == date) {
                    return ResponseTemplate::new(304);
                }
                ResponseTemplate::new(200).insert_header("last-modified", date).set_body_string("id,name\n0,robin\n")
            })
            .mount(&server)
            .await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        let cache = scratch_cache("last-modified");
        let labels = Source::parse(&format!("{}/labels.csv", server.uri())).unwrap();
        for _ in 0..2 {
            let bytes = fetch_kept(&client, timeout, &labels, 1000, 1, Some(&cache)).await.unwrap();
            assert_eq!(&bytes[..], b"id,name\n0,robin\n");
        }
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 2);
        assert!(requests[0].headers.get("if-modified-since").is_none());
        assert_eq!(requests[1].headers["if-modified-since"], date);
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    /// An HTTP server that answers every request with a promise of
    /// `length` bytes, sends `sent`, and hangs up.
    async fn breaking_server(length: usize, sent: &'static [u8]) -> String {
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

    #[tokio::test]
    async fn a_kept_copy_stands_in_for_a_broken_or_throttled_answer() {
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        let cache = scratch_cache("broken");
        let kept = Version { etag: Some("\"v1\"".into()), last_modified: None };

        let url = breaking_server(1000, b"partial").await;
        let err = fetch(&client, timeout, &Source::parse(&url).unwrap(), 1 << 20).await.unwrap_err();
        assert!(err.to_string().starts_with("body interrupted: "), "{err}");
        cache.store(&url, b"kept", &kept).unwrap();
        let bytes = fetch_kept(&client, timeout, &Source::parse(&url).unwrap(), 1 << 20, 4, Some(&cache)).await;
        assert_eq!(&bytes.unwrap()[..], b"kept");

        let server = MockServer::start().await;
        Mock::given(path("/model")).respond_with(ResponseTemplate::new(429)).mount(&server).await;
        let url = format!("{}/model", server.uri());
        cache.store(&url, b"kept", &kept).unwrap();
        let bytes = fetch_kept(&client, timeout, &Source::parse(&url).unwrap(), 1 << 20, 4, Some(&cache)).await;
        assert_eq!(&bytes.unwrap()[..], b"kept");
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[tokio::test]
    async fn a_file_without_a_version_is_not_kept() {
        let server = MockServer::start().await;
        Mock::given(path("/labels.csv"))
            .respond_with(ResponseTemplate::new(200).set_body_string("id,name\n0,robin\n"))
            .mount(&server)
            .await;
        let timeout = Duration::from_secs(5);
        let client = client(timeout).unwrap();
        let cache = scratch_cache("unversioned");
        let labels = Source::parse(&format!("{}/labels.csv", server.uri())).unwrap();
        let bytes = fetch_kept(&client, timeout, &labels, 1000, 1, Some(&cache)).await.unwrap();
        assert_eq!(&bytes[..], b"id,name\n0,robin\n");
        let url = format!("{}/labels.csv", server.uri());
        assert!(cache.load(&url).is_none());
        // Nor does it leave an older, versioned copy to stand in for it later.
        cache.store(&url, b"id,name\n0,wren\n", &Version { etag: Some("\"v0\"".into()), last_modified: None }).unwrap();
        let bytes = fetch_kept(&client, timeout, &labels, 1000, 1, Some(&cache)).await.unwrap();
        assert_eq!(&bytes[..], b"id,name\n0,robin\n");
        assert!(cache.load(&url).is_none(), "the older copy was kept");
        let _ = std::fs::remove_dir_all(cache.dir());
    }
}
