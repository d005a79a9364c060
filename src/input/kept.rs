//! The model and the labels through the download cache: a kept copy is
//! revalidated with its server, replaced when it changed, and stands in when
//! the server cannot be reached.

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH};

use super::Source;
use super::error::FetchError;
use super::fetch::Fetcher;
use super::ranged::fetch_parallel;
use crate::deadline::Deadline;

impl Fetcher {
    /// Fetches `source`, a large one over up to `connections` connections in
    /// byte ranges (see `fetch_parallel`), through `cache` when there is one.
    /// A URL kept from an earlier run is asked for only if it changed since
    /// (`If-None-Match`, `If-Modified-Since`): unchanged, the kept copy is used;
    /// changed, the new one comes in one plain request and is kept in its place.
    /// When the host cannot be reached, or fails to answer, the kept copy
    /// is used, with a warning (it is unreachable, times out, breaks off, is
    /// overloaded or fails with a 5xx); any other answer is final. A download
    /// whose server gives no ETag nor modification date is not kept, and
    /// replaces nothing: it could never be revalidated. For the model and the
    /// labels: the source policy does not apply.
    pub async fn fetch_kept(&self, source: &Source, limit: u64, connections: usize) -> Result<Bytes, FetchError> {
        let (Source::Url(url), Some(cache)) = (source, &self.cache) else {
            return fetch_parallel(self, source, limit, connections).await.map(|d| d.bytes);
        };
        let kept = {
            let (cache, url) = (cache.clone(), url.to_string());
            tokio::task::spawn_blocking(move || cache.load(&url)).await.ok().flatten()
        };
        let kept = kept.filter(|kept| kept.version.is_known() && kept.bytes.len() as u64 <= limit);
        let download = match kept {
            None => fetch_parallel(self, source, limit, connections).await?,
            Some(kept) => {
                let mut request = self.trusted.get(url.clone());
                if let Some(etag) = &kept.version.etag {
                    request = request.header(IF_NONE_MATCH, etag);
                }
                if let Some(date) = &kept.version.last_modified {
                    request = request.header(IF_MODIFIED_SINCE, date);
                }
                match self.get(request, self.until(Deadline::NEVER), limit).await {
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
}

#[cfg(test)]
mod tests {
    use super::super::cache::Version;
    use super::super::testing::{breaking_server, fetcher, model_bytes, scratch_cache, versioned_file_server};
    use super::*;
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    #[tokio::test]
    async fn a_cached_file_is_revalidated_replaced_and_used_offline() {
        let server = MockServer::start().await;
        let cache = scratch_cache("revalidate");
        let v1 = model_bytes(3_000_000);
        Mock::given(path("/model"))
            .respond_with(versioned_file_server(v1.clone(), "\"v1\"", |_| true))
            .mount(&server)
            .await;
        let model = Source::parse(&format!("{}/model", server.uri())).unwrap();
        let url = format!("{}/model", server.uri());
        let kept = fetcher(Some(&cache));
        let fetch = || kept.fetch_kept(&model, 1 << 30, 4);

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
        assert!(fetcher(Some(&cache)).fetch_kept(&model, 1 << 30, 4).await.unwrap() == v2);
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
        let cache = scratch_cache("last-modified");
        let labels = Source::parse(&format!("{}/labels.csv", server.uri())).unwrap();
        for _ in 0..2 {
            let bytes = fetcher(Some(&cache)).fetch_kept(&labels, 1000, 1).await.unwrap();
            assert_eq!(&bytes[..], b"id,name\n0,robin\n");
        }
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 2);
        assert!(requests[0].headers.get("if-modified-since").is_none());
        assert_eq!(requests[1].headers["if-modified-since"], date);
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[tokio::test]
    async fn a_kept_copy_stands_in_for_a_broken_or_throttled_answer() {
        let cache = scratch_cache("broken");
        let kept = Version { etag: Some("\"v1\"".into()), last_modified: None };

        let url = breaking_server(1000, b"partial").await;
        cache.store(&url, b"kept", &kept).unwrap();
        let bytes = fetcher(Some(&cache)).fetch_kept(&Source::parse(&url).unwrap(), 1 << 20, 4).await;
        assert_eq!(&bytes.unwrap()[..], b"kept");

        let server = MockServer::start().await;
        Mock::given(path("/model")).respond_with(ResponseTemplate::new(429)).mount(&server).await;
        let url = format!("{}/model", server.uri());
        cache.store(&url, b"kept", &kept).unwrap();
        let bytes = fetcher(Some(&cache)).fetch_kept(&Source::parse(&url).unwrap(), 1 << 20, 4).await;
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
        let cache = scratch_cache("unversioned");
        let labels = Source::parse(&format!("{}/labels.csv", server.uri())).unwrap();
        let bytes = fetcher(Some(&cache)).fetch_kept(&labels, 1000, 1).await.unwrap();
        assert_eq!(&bytes[..], b"id,name\n0,robin\n");
        let url = format!("{}/labels.csv", server.uri());
        assert!(cache.load(&url).is_none());
        // Nor does it leave an older, versioned copy to stand in for it later.
        cache.store(&url, b"id,name\n0,wren\n", &Version { etag: Some("\"v0\"".into()), last_modified: None }).unwrap();
        let bytes = fetcher(Some(&cache)).fetch_kept(&labels, 1000, 1).await.unwrap();
        assert_eq!(&bytes[..], b"id,name\n0,robin\n");
        assert!(cache.load(&url).is_none(), "the older copy was kept");
        let _ = std::fs::remove_dir_all(cache.dir());
    }
}
