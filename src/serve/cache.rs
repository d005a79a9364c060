//! The result cache: the predictions of a source already classified, by
//! model, source (the URL, or the SHA-256 of an upload) and `top_k`, kept
//! for a time (an hour by default, as the service this replaces did) and up
//! to a number of entries. Concurrent requests for the same key wait for one
//! classification (moka coalesces them) rather than each fetching the URL.
//!
//! Only predictions are kept: a failure (a 404, a timeout, a full queue) is
//! tried again by the next request.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::identity::Identity;
use crate::engine::SourceError;
use crate::rank::Prediction;

/// What became of one source, as the cache shares it between requests.
pub type Shared = Result<Arc<Vec<Prediction>>, Arc<SourceError>>;

/// The key of a result: a digest, so that an entry weighs the same however
/// long the URL or large the upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    pub fn new(model: &str, source: &Identity, top_k: usize) -> Key {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        // Lengths first, so that no two different triples hash the same bytes.
        context.update(&(model.len() as u64).to_le_bytes());
        context.update(model.as_bytes());
        context.update(&(top_k as u64).to_le_bytes());
        match source {
            Identity::Source(url) => {
                context.update(b"source");
                context.update(url.as_bytes());
            }
            Identity::Upload(digest) => {
                context.update(b"upload");
                context.update(digest);
            }
        }
        let mut key = [0; 32];
        key.copy_from_slice(context.finish().as_ref());
        Key(key)
    }
}

#[derive(Clone)]
pub struct ResultCache {
    entries: Option<moka::future::Cache<Key, Arc<Vec<Prediction>>>>,
}

impl ResultCache {
    /// No cache when either bound is zero.
    pub fn new(entries: u64, ttl: Duration) -> ResultCache {
        let entries = (entries > 0 && !ttl.is_zero())
            .then(|| moka::future::Cache::builder().max_capacity(entries).time_to_live(ttl).build());
        ResultCache { entries }
    }

    pub fn is_on(&self) -> bool {
        self.entries.is_some()
    }

    /// The cached predictions of `key`, else those `classify` gives (kept
    /// when they are predictions); and whether they came from the cache,
    /// that is, this call did not classify.
    pub async fn get_or_classify(
        &self,
        key: Key,
        classify: impl Future<Output = Result<Vec<Prediction>, SourceError>>,
    ) -> (Shared, bool) {
        let Some(entries) = &self.entries else {
            return (classify.await.map(Arc::new).map_err(Arc::new), false);
        };
        let mut classified = false;
        let outcome = entries
            .try_get_with(key, async {
                classified = true;
                classify.await.map(Arc::new)
            })
            .await;
        (outcome, !classified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Input;

    fn prediction(label: &str) -> Vec<Prediction> {
        vec![Prediction { index: 0, label: Some(label.into()), score: 0.5 }]
    }

    fn url(u: &str) -> Identity {
        Identity::Source(u.into())
    }

    #[test]
    fn keys_differ_by_model_source_kind_and_top_k() {
        let a = Key::new("birds", &url("https://h/a.jpg"), 3);
        assert_eq!(a, Key::new("birds", &url("https://h/a.jpg"), 3));
        assert_ne!(a, Key::new("birds", &url("https://h/b.jpg"), 3));
        assert_ne!(a, Key::new("flowers", &url("https://h/a.jpg"), 3));
        assert_ne!(a, Key::new("birds", &url("https://h/a.jpg"), 4));
        let upload =
            |name: &str, bytes: &'static [u8]| Identity::of(&Input::Bytes { name: name.into(), bytes: bytes.into() });
        // An upload is its content, whatever its name.
        assert_eq!(Key::new("birds", &upload("a.jpg", b"xyz"), 3), Key::new("birds", &upload("b.jpg", b"xyz"), 3));
        assert_ne!(Key::new("birds", &upload("a.jpg", b"xyz"), 3), Key::new("birds", &upload("a.jpg", b"xy"), 3));
    }

    #[tokio::test]
    async fn predictions_are_kept_and_failures_are_not() {
        let cache = ResultCache::new(16, Duration::from_secs(60));
        let key = Key::new("m", &url("https://h/a.jpg"), 3);
        let (first, cached) = cache.get_or_classify(key, async { Ok(prediction("robin")) }).await;
        assert_eq!((first.unwrap()[0].label.as_deref(), cached), (Some("robin"), false));
        let (again, cached) = cache.get_or_classify(key, async { Ok(prediction("other")) }).await;
        assert_eq!((again.unwrap()[0].label.as_deref(), cached), (Some("robin"), true));

        let failing = Key::new("m", &url("https://h/b.jpg"), 3);
        let (failed, cached) = cache.get_or_classify(failing, async { Err(SourceError::Deadline) }).await;
        assert!(matches!(failed.unwrap_err().as_ref(), SourceError::Deadline) && !cached);
        let (retried, cached) = cache.get_or_classify(failing, async { Ok(prediction("wren")) }).await;
        assert_eq!((retried.unwrap()[0].label.as_deref(), cached), (Some("wren"), false));
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_key_classify_once() {
        let cache = ResultCache::new(16, Duration::from_secs(60));
        let key = Key::new("m", &url("https://h/a.jpg"), 3);
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let lookup = || {
            cache.get_or_classify(key, async {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(prediction("robin"))
            })
        };
        let answers = futures::future::join_all((0..8).map(|_| lookup())).await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(answers.iter().filter(|(_, cached)| !cached).count(), 1);
        assert!(answers.iter().all(|(outcome, _)| outcome.as_ref().unwrap()[0].label.as_deref() == Some("robin")));
    }

    #[tokio::test]
    async fn zero_entries_or_ttl_turn_it_off() {
        for cache in [ResultCache::new(0, Duration::from_secs(60)), ResultCache::new(16, Duration::ZERO)] {
            let key = Key::new("m", &url("https://h/a.jpg"), 3);
            cache.get_or_classify(key, async { Ok(prediction("robin")) }).await.0.unwrap();
            let (again, cached) = cache.get_or_classify(key, async { Ok(prediction("other")) }).await;
            assert_eq!((again.unwrap()[0].label.as_deref(), cached), (Some("other"), false));
        }
    }
}
