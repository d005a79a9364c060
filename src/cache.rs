//! The download cache: the model and the label map kept on disk between
//! runs, each with what identifies its version on the server (ETag,
//! Last-Modified), so that a later run asks only whether it changed.
//!
//! One file per URL, named by a hash of the URL: a line of JSON (the URL,
//! the version, the length), then the bytes as downloaded. Files are written
//! whole under a temporary name and renamed into place, so processes sharing
//! the folder never read a half-written copy; a copy that does not match its
//! header (another URL, a short file) is ignored.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A folder of downloads kept between runs.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// What identifies one version of a file, as its server gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Version {
    /// Whether the server can be asked if the file changed since.
    pub fn is_known(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }
}

/// A copy kept from an earlier download.
#[derive(Debug, Clone)]
pub struct Entry {
    pub bytes: Bytes,
    pub version: Version,
}

#[derive(Serialize, Deserialize)]
struct Header {
    url: String,
    #[serde(flatten)]
    version: Version,
    len: u64,
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into() }
    }

    /// The user's cache folder for this tool (`$XDG_CACHE_HOME/classifier`,
    /// `~/.cache/classifier`, or the platform's equivalent), if there is one
    /// and it can be made. A container without a home has none: the run then
    /// goes without a cache, which a one-shot job would not reuse anyway.
    pub fn in_default_dir() -> Option<Cache> {
        let dir = dirs::cache_dir()?.join(env!("CARGO_PKG_NAME"));
        match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(Cache::new(dir)),
            Err(e) => {
                tracing::debug!("no download cache: cannot make {}: {e}", dir.display());
                None
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The copy of `url` kept here, if there is a whole one. Blocking.
    pub fn load(&self, url: &str) -> Option<Entry> {
        let mut data = std::fs::read(self.path(url)).ok()?;
        let end = data.iter().position(|&b| b == b'\n')?;
        let header: Header = serde_json::from_slice(&data[..end]).ok()?;
        if header.url != url || (data.len() - end - 1) as u64 != header.len {
            return None;
        }
        // The bytes stay where they were read, after the header.
        let bytes = Bytes::from(std::mem::take(&mut data)).slice(end + 1..);
        Some(Entry { bytes, version: header.version })
    }

    /// Keeps `bytes` as the copy of `url` at `version`, replacing any older
    /// one. Blocking.
    pub fn store(&self, url: &str, bytes: &[u8], version: &Version) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(url);
        // Unique per process and call, so concurrent writers never share one.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temporary = path.with_extension(format!("{}-{n}.partial", std::process::id()));
        let header = Header { url: url.to_string(), version: version.clone(), len: bytes.len() as u64 };
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&temporary)?);
            serde_json::to_writer(&mut file, &header)?;
            file.write_all(b"\n")?;
            file.write_all(bytes)?;
            file.into_inner().map_err(|e| e.into_error())?;
            std::fs::rename(&temporary, &path)
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })
    }

    fn path(&self, url: &str) -> PathBuf {
        // FNV-1a is fixed by its definition, so names stay the same across
        // builds; a collision only costs a download, as the header names
        // the URL.
        let mut hash = fnv::FnvHasher::default();
        hash.write(url.as_bytes());
        self.dir.join(format!("{:016x}", hash.finish()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> Cache {
        let dir = std::env::temp_dir().join(format!("classifier-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Cache::new(dir)
    }

    #[test]
    fn a_stored_copy_comes_back_with_its_version() {
        let cache = scratch("roundtrip");
        let url = "https://example.org/model.tflite";
        assert!(cache.load(url).is_none());
        let version = Version { etag: Some("\"v1\"".into()), last_modified: None };
        cache.store(url, b"model\nbytes", &version).unwrap();
        let entry = cache.load(url).unwrap();
        assert_eq!(&entry.bytes[..], b"model\nbytes");
        assert_eq!(entry.version, version);
        assert!(cache.load("https://example.org/other.tflite").is_none());
        // A newer version replaces the old one, leaving nothing else behind.
        let newer = Version { etag: None, last_modified: Some("Mon, 23 Nov 2026 10:00:00 GMT".into()) };
        cache.store(url, b"", &newer).unwrap();
        let entry = cache.load(url).unwrap();
        assert!(entry.bytes.is_empty());
        assert_eq!(entry.version, newer);
        assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 1);
        std::fs::remove_dir_all(cache.dir()).unwrap();
    }

    #[test]
    fn a_damaged_copy_is_ignored() {
        let cache = scratch("damaged");
        let url = "https://example.org/labels.csv";
        cache.store(url, b"id,name\n0,robin\n", &Version { etag: Some("\"a\"".into()), last_modified: None }).unwrap();
        let path = cache.path(url);
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert!(cache.load(url).is_none(), "a short copy was used");
        std::fs::write(&path, b"not a header\nid,name\n").unwrap();
        assert!(cache.load(url).is_none(), "a copy without a header was used");
        std::fs::remove_dir_all(cache.dir()).unwrap();
    }

    #[test]
    fn an_unwritable_folder_is_an_error_not_a_panic() {
        let cache = scratch("unwritable");
        // A file where the folder should be.
        std::fs::write(cache.dir(), b"").unwrap();
        assert!(cache.store("https://example.org/m", b"m", &Version::default()).is_err());
        std::fs::remove_file(cache.dir()).unwrap();
    }
}
