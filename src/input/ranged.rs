//! The model, the one large file, fetched in byte ranges over parallel
//! connections when its server honours `Range` (static hosts and CDNs do).

use std::time::Instant;

use bytes::BytesMut;
use reqwest::header::{ACCEPT_ENCODING, CONTENT_RANGE, ETAG, HeaderValue, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::{Response, StatusCode};

use super::Source;
use super::cache::Version;
use super::error::FetchError;
use super::fetch::{Download, Fetcher, read_file, version};
use crate::deadline::Deadline;

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
pub(super) async fn fetch_parallel(
    fetcher: &Fetcher,
    source: &Source,
    limit: u64,
    connections: usize,
) -> Result<Download, FetchError> {
    // One time limit for the whole file, however many requests it takes.
    let until = fetcher.until(Deadline::NEVER);
    let client = &fetcher.trusted;
    let url = match source {
        Source::Url(url) if connections > 1 => url,
        Source::Url(url) => return fetcher.get(client.get(url.clone()), until, limit).await,
        Source::Path(path) => {
            return Ok(Download { bytes: read_file(path, limit).await?, version: Version::default() });
        }
    };
    let connections = connections as u64;
    let wave: Vec<(u64, u64)> = (1..connections).map(|i| (i * PART_BYTES, (i + 1) * PART_BYTES)).collect();
    let first_wave = futures::future::join_all(
        wave.iter().map(|&(start, end)| fetch_range(fetcher, url.clone(), start, end, None, until)),
    );
    let head = async {
        let request = client
            .get(url.clone())
            .header(RANGE, format!("bytes=0-{}", PART_BYTES - 1))
            .header(ACCEPT_ENCODING, "identity");
        let first = match fetcher.send(request, until).await {
            // An empty file has no first byte to give.
            Err(FetchError::Status(StatusCode::RANGE_NOT_SATISFIABLE)) => return Ok(Head::Plain),
            first => first?,
        };
        let version = version(first.headers());
        if first.status() != StatusCode::PARTIAL_CONTENT {
            // No Range support: this is the whole file.
            return Ok(Head::Whole(Download { bytes: fetcher.read_whole(first, limit).await?, version }));
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
                .map(|&(start, end)| fetch_range(fetcher, first.url().clone(), start, end, validator.clone(), until)),
        );
        let mut body = BytesMut::with_capacity(total as usize);
        let first_part = PART_BYTES.min(total);
        let (read, tail) = futures::join!(fetcher.read_body(first, &mut body, first_part), tail);
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
    let plain = || fetcher.get(client.get(url.clone()), until, limit);
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
    fetcher: &Fetcher,
    url: reqwest::Url,
    start: u64,
    end: u64,
    if_range: Option<HeaderValue>,
    until: Instant,
) -> Result<Option<Part>, FetchError> {
    let mut request = fetcher
        .trusted
        .get(url)
        .header(RANGE, format!("bytes={start}-{}", end - 1))
        .header(ACCEPT_ENCODING, "identity");
    if let Some(validator) = if_range {
        request = request.header(IF_RANGE, validator);
    }
    let response = match fetcher.send(request, until).await {
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
    fetcher.read_body(response, &mut body, last + 1 - first).await?;
    if body.len() as u64 != last + 1 - first {
        return Err(FetchError::Http(format!("the range {start}-{} came short", end - 1)));
    }
    Ok(Some(Part { body, total, validator }))
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

#[cfg(test)]
mod tests {
    use super::super::testing::{fetcher, file_server, model_bytes};
    use super::*;
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer};

    #[tokio::test]
    async fn large_files_come_in_byte_ranges_when_the_server_allows() {
        let server = MockServer::start().await;
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
            let fetched = fetch_parallel(&fetcher(None), &model, 1 << 30, 4).await.unwrap().bytes;
            assert!(fetched == body, "{len} bytes: the ranges were put together wrong");
            let requests = server.received_requests().await.unwrap();
            let mut ranges: Vec<&str> = requests.iter().map(|r| r.headers["range"].to_str().unwrap()).collect();
            ranges.sort();
            assert_eq!(ranges, expected);
            // Ranges asked for once the version is known are pinned to it.
            let pinned = requests.iter().filter(|r| r.headers.get("if-range").is_some_and(|v| v == "\"v1\"")).count();
            assert_eq!(pinned, expected.len() - 4);
            let err = fetch_parallel(&fetcher(None), &model, len as u64 - 1, 4).await.unwrap_err();
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
        for name in ["plain", "changed"] {
            let model = Source::parse(&format!("{}/{name}", server.uri())).unwrap();
            let fetched = fetch_parallel(&fetcher(None), &model, 1 << 30, 4).await.unwrap().bytes;
            assert!(fetched == body, "{name}: wrong body");
        }
        // An empty file cannot answer a range: it is fetched plainly.
        Mock::given(path("/empty")).respond_with(file_server(vec![], |_| true)).mount(&server).await;
        let empty = Source::parse(&format!("{}/empty", server.uri())).unwrap();
        assert!(fetch_parallel(&fetcher(None), &empty, 1 << 30, 4).await.unwrap().bytes.is_empty());
        let small = Source::parse(&format!("{}/plain", server.uri())).unwrap();
        assert!(matches!(fetch_parallel(&fetcher(None), &small, 100, 4).await, Err(FetchError::TooLarge { .. })));
    }
}
