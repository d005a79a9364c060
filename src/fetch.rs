//! The fetch stage: the bytes behind a source, over one shared HTTP client or
//! from the local file system, with a size limit and a timeout.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::{Client, StatusCode};

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
        Source::Path(path) => {
            let size = tokio::fs::metadata(path).await.map_err(FetchError::File)?.len();
            if size > limit {
                return Err(FetchError::TooLarge { limit });
            }
            tokio::fs::read(path).await.map(Bytes::from).map_err(FetchError::File)
        }
        Source::Url(url) => {
            let http_error = |e: reqwest::Error| classify(e, timeout);
            let mut response = client.get(url.clone()).send().await.map_err(http_error)?;
            if !response.status().is_success() {
                return Err(FetchError::Status(response.status()));
            }
            if response.content_length().is_some_and(|len| len > limit) {
                return Err(FetchError::TooLarge { limit });
            }
            let mut body = BytesMut::with_capacity(response.content_length().unwrap_or(0) as usize);
            while let Some(chunk) = response.chunk().await.map_err(http_error)? {
                if body.len() as u64 + chunk.len() as u64 > limit {
                    return Err(FetchError::TooLarge { limit });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body.freeze())
        }
    }
}

/// Fetches the first of `sources` that answers, logging each fallback.
pub async fn fetch_first(client: &Client, timeout: Duration, sources: &[Source], limit: u64) -> anyhow::Result<Bytes> {
    let mut errors = vec![];
    for (i, source) in sources.iter().enumerate() {
        match fetch(client, timeout, source, limit).await {
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
        let bytes = fetch_first(&client, timeout, &[url("kaggle"), url("tfhub")], 100).await.unwrap();
        assert_eq!(&bytes[..], b"model");
        let err = fetch_first(&client, timeout, &[url("kaggle"), url("missing")], 100).await.unwrap_err();
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
}
