//! The fetch stage: the bytes behind a source, over one shared HTTP client or
//! from the local file system, under a size limit, a time limit per request
//! and the source policy.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{ETAG, HeaderMap, HeaderValue, LAST_MODIFIED};
use reqwest::{Client, Response};

use super::Source;
use super::cache::{Cache, Version};
use super::error::{FetchError, classify};
use super::policy::SourcePolicy;
use crate::deadline::Deadline;

/// How a fetcher works, resolved once by the front end.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// The time limit of one download, from request to last byte; for a
    /// model fetched in byte ranges, of all its requests together.
    pub timeout: Duration,
    pub policy: SourcePolicy,
    /// Where the model and the labels are kept between runs, if anywhere.
    pub cache: Option<Cache>,
}

/// Fetches sources: one HTTP client shared by every download (rustls, gzip,
/// redirects, a user agent naming this tool), with the settings' limits.
/// Cheap to clone.
///
/// The source policy applies to the images; the model and the labels are
/// named by whoever runs the tool (the operator of a server), and are
/// fetched by a client of their own that the policy does not restrict.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// For images: restricted by the policy.
    pub(super) client: Client,
    /// For the model and the labels.
    pub(super) trusted: Client,
    pub(super) timeout: Duration,
    pub(super) policy: SourcePolicy,
    pub(super) cache: Option<Cache>,
}

/// A file as downloaded, with what identifies its version.
#[derive(Debug)]
pub(super) struct Download {
    pub bytes: Bytes,
    pub version: Version,
}

impl Fetcher {
    pub fn new(settings: FetchSettings) -> Result<Fetcher, FetchError> {
        // Several providers may be compiled in; this process uses ring. An error
        // only means one is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = || {
            Client::builder()
                .user_agent(concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
        };
        let failed = |e: reqwest::Error| FetchError::Http(format!("cannot set up the HTTP client: {e}"));
        let trusted = builder().redirect(SourcePolicy::ALLOW_ALL.redirects()).build().map_err(failed)?;
        let client = match settings.policy.resolver() {
            // A proxy would resolve the names itself, past the policy.
            Some(resolver) => builder()
                .redirect(settings.policy.redirects())
                .dns_resolver(resolver)
                .no_proxy()
                .build()
                .map_err(failed)?,
            None => trusted.clone(),
        };
        Ok(Fetcher { client, trusted, timeout: settings.timeout, policy: settings.policy, cache: settings.cache })
    }

    /// The time limit of one download.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Fetches `source`, refusing bodies larger than `limit` bytes, within
    /// the time limit and by `deadline`, whichever comes first.
    pub async fn fetch(&self, source: &Source, limit: u64, deadline: Deadline) -> Result<Bytes, FetchError> {
        self.policy.check(source).map_err(|denied| FetchError::Denied(denied.0))?;
        match source {
            Source::Path(path) => {
                let until = self.until(deadline);
                match tokio::time::timeout_at(until.into(), read_file(path, limit)).await {
                    Ok(read) => read,
                    Err(_) => Err(FetchError::Timeout(self.timeout)),
                }
            }
            Source::Url(url) => Ok(self.get(self.client.get(url.clone()), self.until(deadline), limit).await?.bytes),
        }
    }

    /// When a download started now must end: the time limit, or `deadline`
    /// if that is sooner.
    pub(super) fn until(&self, deadline: Deadline) -> Instant {
        let now = Instant::now();
        // A time limit too long to represent is none; a year will do.
        let limit = now.checked_add(self.timeout).unwrap_or(now + Duration::from_secs(365 * 86_400));
        deadline.instant().map_or(limit, |at| at.min(limit))
    }

    /// Sends `request`, to be answered by `until`, turning any answer but a
    /// success into an error.
    pub(super) async fn send(&self, request: reqwest::RequestBuilder, until: Instant) -> Result<Response, FetchError> {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::Timeout(self.timeout));
        }
        let response = request.timeout(left).send().await.map_err(|e| classify(e, self.timeout))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        Ok(response)
    }

    /// Sends `request` and reads the whole answer, refused past `limit` bytes.
    pub(super) async fn get(
        &self,
        request: reqwest::RequestBuilder,
        until: Instant,
        limit: u64,
    ) -> Result<Download, FetchError> {
        let response = self.send(request, until).await?;
        let version = version(response.headers());
        Ok(Download { bytes: self.read_whole(response, limit).await?, version })
    }

    /// The whole body of `response`, refused past `limit` bytes.
    pub(super) async fn read_whole(&self, response: Response, limit: u64) -> Result<Bytes, FetchError> {
        let declared = response.content_length();
        if declared.is_some_and(|len| len > limit) {
            return Err(FetchError::TooLarge { limit });
        }
        let mut body = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        self.read_body(response, &mut body, limit).await?;
        Ok(body.freeze())
    }

    /// Appends the rest of `response` to `body`, which may hold `limit` bytes
    /// in all. The request's own time limit covers the body.
    pub(super) async fn read_body(
        &self,
        mut response: Response,
        body: &mut BytesMut,
        limit: u64,
    ) -> Result<(), FetchError> {
        while let Some(chunk) = response.chunk().await.map_err(|e| classify(e, self.timeout))? {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(FetchError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    }

    /// Fetches the first of `sources` that answers, as [`Fetcher::fetch_kept`]
    /// does (not restricted by the policy), logging each fallback. Returns the source that answered, or
    /// every source's error.
    pub async fn fetch_first(
        &self,
        sources: &[Source],
        limit: u64,
        connections: usize,
    ) -> Result<(Source, Bytes), String> {
        let mut errors = vec![];
        for (i, source) in sources.iter().enumerate() {
            match self.fetch_kept(source, limit, connections).await {
                Ok(bytes) => return Ok((source.clone(), bytes)),
                Err(e) => {
                    if let Some(next) = sources.get(i + 1) {
                        tracing::warn!("cannot fetch {source}: {e}; falling back to {next}");
                    }
                    errors.push(format!("{source}: {e}"));
                }
            }
        }
        Err(errors.join("; "))
    }
}

/// Reads a local file, refused past `limit` bytes: by its size when it says
/// it, and by what it gives otherwise (a FIFO, a device or a /proc file
/// says 0 or anything).
pub(super) async fn read_file(path: &std::path::Path, limit: u64) -> Result<Bytes, FetchError> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await.map_err(FetchError::File)?;
    let size = file.metadata().await.map_err(FetchError::File)?.len();
    if size > limit {
        return Err(FetchError::TooLarge { limit });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).await.map_err(FetchError::File)?;
    if bytes.len() as u64 > limit {
        return Err(FetchError::TooLarge { limit });
    }
    Ok(bytes.into())
}

/// The ETag and the modification date a server gave a file.
pub(super) fn version(headers: &HeaderMap) -> Version {
    let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
    Version { etag: text(ETAG), last_modified: text(LAST_MODIFIED) }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{breaking_server, fetcher};
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
        let fetcher = fetcher(None);
        let url = |p: &str| Source::parse(&format!("{}/{p}", server.uri())).unwrap();
        let (source, bytes) = fetcher.fetch_first(&[url("kaggle"), url("tfhub")], 100, 4).await.unwrap();
        assert_eq!(&bytes[..], b"model");
        assert_eq!(source, url("tfhub"));
        let err = fetcher.fetch_first(&[url("kaggle"), url("missing")], 100, 4).await.unwrap_err();
        assert!(err.ends_with("/missing: HTTP 404 Not Found"), "{err}");
        assert!(err.contains("/kaggle: HTTP 403 Forbidden"), "{err}");
    }

    #[tokio::test]
    async fn limits_are_checked_for_files_and_streams() {
        let server = MockServer::start().await;
        Mock::given(path("/big"))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![7u8; 5000]))
            .mount(&server)
            .await;
        let fetcher = fetcher(None);
        let big = Source::parse(&format!("{}/big", server.uri())).unwrap();
        let never = Deadline::NEVER;
        assert!(matches!(fetcher.fetch(&big, 4999, never).await, Err(FetchError::TooLarge { limit: 4999 })));
        assert_eq!(fetcher.fetch(&big, 5000, never).await.unwrap().len(), 5000);
        let file = Source::Path(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mock_labels.csv").into());
        assert!(matches!(fetcher.fetch(&file, 3, never).await, Err(FetchError::TooLarge { limit: 3 })));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_file_that_does_not_say_its_size_is_still_held_to_the_limit() {
        // /dev/zero says it is empty, and never ends.
        let zero = Source::Path("/dev/zero".into());
        let err = fetcher(None).fetch(&zero, 1000, Deadline::NEVER).await.unwrap_err();
        assert!(matches!(err, FetchError::TooLarge { limit: 1000 }), "{err}");
    }

    #[tokio::test]
    async fn each_request_is_cut_at_the_time_limit_or_the_deadline() {
        let server = MockServer::start().await;
        Mock::given(path("/slow"))
            .respond_with(ResponseTemplate::new(200).set_body_string("late").set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let slow = Source::parse(&format!("{}/slow", server.uri())).unwrap();
        let settings =
            FetchSettings { timeout: Duration::from_millis(300), policy: SourcePolicy::ALLOW_ALL, cache: None };
        let quick = Fetcher::new(settings).unwrap();
        let started = Instant::now();
        let err = quick.fetch(&slow, 100, Deadline::NEVER).await.unwrap_err();
        assert_eq!(err.to_string(), "timed out after 0.3 s");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        // The client-wide limit is generous; the caller's deadline is not.
        let patient = fetcher(None);
        let started = Instant::now();
        let err = patient.fetch(&slow, 100, Deadline::after(Duration::from_millis(300))).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(matches!(patient.fetch(&slow, 100, Deadline::at(Instant::now())).await, Err(FetchError::Timeout(_))));
    }

    #[tokio::test]
    async fn a_broken_off_body_is_said_so() {
        let url = breaking_server(1000, b"partial").await;
        let err = fetcher(None).fetch(&Source::parse(&url).unwrap(), 1 << 20, Deadline::NEVER).await.unwrap_err();
        assert!(err.to_string().starts_with("body interrupted: "), "{err}");
    }

    #[tokio::test]
    async fn the_policy_refuses_files_and_loopback_before_any_request() {
        let server = MockServer::start().await;
        Mock::given(path("/a.jpg")).respond_with(ResponseTemplate::new(200).set_body_string("x")).mount(&server).await;
        let settings =
            FetchSettings { timeout: Duration::from_secs(5), policy: SourcePolicy::PUBLIC_ONLY, cache: None };
        let public = Fetcher::new(settings).unwrap();
        let never = Deadline::NEVER;
        // By address literal, and by a name that resolves to loopback.
        let literal = Source::parse(&format!("{}/a.jpg", server.uri())).unwrap();
        let err = public.fetch(&literal, 100, never).await.unwrap_err();
        assert!(matches!(&err, FetchError::Denied(m) if m == "address 127.0.0.1 is not allowed (loopback)"), "{err}");
        let port = server.address().port();
        let named = Source::parse(&format!("http://localhost:{port}/a.jpg")).unwrap();
        let err = public.fetch(&named, 100, never).await.unwrap_err();
        assert!(matches!(&err, FetchError::Denied(m) if m.starts_with("localhost: address ")), "{err}");
        let file = Source::Path(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mock_labels.csv").into());
        assert_eq!(public.fetch(&file, 100, never).await.unwrap_err().to_string(), "local files are not allowed");
        assert!(server.received_requests().await.unwrap().is_empty());
        // The command line's policy reads all three.
        let all = fetcher(None);
        assert!(all.fetch(&literal, 100, never).await.is_ok());
        assert!(all.fetch(&named, 100, never).await.is_ok());
        assert!(all.fetch(&file, 100, never).await.is_ok());
    }
}
