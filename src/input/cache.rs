//! The download cache: the model and the label map kept on disk between
//! runs, each with what identifies its version on the server (ETag,
//! Last-Modified), so that a later run asks only whether it changed.
//!
//! One file per URL, named by a hash of the URL: a line of JSON (the URL,
//! the version, the length and CRC-32 of the bytes), then the bytes as
//! downloaded. Files are written whole under a temporary name and renamed
//! into place, so processes sharing the folder never read a half-written
//! copy; a copy that does not match its header (another URL, a short or
//! damaged file) is ignored, and downloaded again.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A folder of downloads kept between runs.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    /// Whether the user named the folder: only then is failing to write to
    /// it worth a warning.
    named: bool,
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
    crc32: u32,
}

impl Cache {
    /// The folder the user named.
    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into(), named: true }
    }

    /// The user's cache folder for this tool (`$XDG_CACHE_HOME/classifier`,
    /// `~/.cache/classifier`, or the platform's equivalent), if there is one.
    /// It is made on the first download kept; where it cannot be (a
    /// container whose user has no home), runs go without a cache, which a
    /// one-shot job would not reuse anyway.
    pub fn in_default_dir() -> Option<Cache> {
        Some(Cache { dir: dirs::cache_dir()?.join(env!("CARGO_PKG_NAME")), named: false })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the user named the folder (`--cache-dir`), rather than it
    /// being the default one.
    pub fn is_named(&self) -> bool {
        self.named
    }

    /// The copy of `url` kept here, if there is a whole one. Blocking.
    pub fn load(&self, url: &str) -> Option<Entry> {
        // Every run that reads the folder sweeps it (a run reads before it
        // writes): most never write to it again once their copies are kept.
        self.remove_abandoned();
        let path = self.path(url);
        let mut data = std::fs::read(&path).ok()?;
        let header = data
            .iter()
            .position(|&b| b == b'\n')
            .and_then(|end| Some((end, serde_json::from_slice::<Header>(&data[..end]).ok()?)));
        let Some((end, header)) = header else {
            tracing::warn!("ignoring {}: not a cached download", path.display());
            return None;
        };
        if header.url != url {
            return None;
        }
        let body = &data[end + 1..];
        if body.len() as u64 != header.len || crc32fast::hash(body) != header.crc32 {
            tracing::warn!("ignoring the cached copy of {url} in {}: it is damaged", path.display());
            return None;
        }
        // The bytes stay where they were read, after the header.
        let bytes = Bytes::from(std::mem::take(&mut data)).slice(end + 1..);
        Some(Entry { bytes, version: header.version })
    }

    /// Forgets the copy of `url`, if there is one. Blocking.
    pub fn remove(&self, url: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(url)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            removed => removed,
        }
    }

    /// Keeps `bytes` as the copy of `url` at `version`, replacing any older
    /// one. Blocking.
    pub fn store(&self, url: &str, bytes: &[u8], version: &Version) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(url);
        let temporary = temporary_path(&path);
        let header = Header {
            url: url.to_string(),
            version: version.clone(),
            len: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        // The header names the URL, which may carry a token.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&temporary)?;
        // The file is ours from here on: removed if anything below fails.
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(file);
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

    /// Removes what writers killed halfway left behind: temporary files
    /// older than an hour, far longer than any write takes.
    fn remove_abandoned(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if is_temporary(&entry.file_name()) && old.is_some_and(|age| age.as_secs() > 3600) {
                let _ = std::fs::remove_file(path);
            }
        }
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

/// A name to write `path` under, unique per write: containers sharing the
/// folder may all be process 1, so the time tells them apart.
fn temporary_path(path: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    path.with_extension(format!("{}-{nanos}-{n}.partial", std::process::id()))
}

/// Whether `name` is one of `store`'s temporary files (`<hash>.<pid>-<time>-<n>.partial`):
/// the folder may be shared with files that are not ours.
fn is_temporary(name: &std::ffi::OsStr) -> bool {
    let Some((hash, rest)) = name.to_str().and_then(|name| name.split_once('.')) else { return false };
    let Some(numbers) = rest.strip_suffix(".partial") else { return false };
    hash.len() == 16
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && numbers.split('-').count() == 3
        && numbers.split('-').all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
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
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(cache.load(url).is_none(), "a damaged copy was used");
        std::fs::write(&path, &whole).unwrap();
        assert!(cache.load(url).is_some(), "the whole copy was refused");
        std::fs::write(&path, b"not a header\nid,name\n").unwrap();
        assert!(cache.load(url).is_none(), "a copy without a header was used");
        std::fs::remove_dir_all(cache.dir()).unwrap();
    }

    #[test]
    fn what_a_killed_writer_left_is_cleared_once_old() {
        let cache = scratch("abandoned");
        std::fs::create_dir_all(cache.dir()).unwrap();
        let (old, fresh) = (
            cache.dir().join("0123456789abcdef.77-1700000000000000000-0.partial"),
            cache.dir().join("fedcba9876543210.78-1700000000000000000-0.partial"),
        );
        let ours = temporary_path(&cache.path("https://example.org/m"));
        assert!(is_temporary(ours.file_name().unwrap()), "{}", ours.display());
        assert_ne!(ours, temporary_path(&cache.path("https://example.org/m")));
        // Not ours, however old: the folder may be shared.
        let foreign = cache.dir().join("download.partial");
        for path in [&old, &fresh, &foreign] {
            std::fs::write(path, b"half").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for path in [&old, &foreign] {
            std::fs::File::options().write(true).open(path).unwrap().set_modified(two_hours_ago).unwrap();
        }
        // Reading sweeps, as runs that find their copies unchanged never write.
        assert!(cache.load("https://example.org/m").is_none());
        assert!(!old.exists(), "an abandoned write was left");
        assert!(foreign.exists(), "a file that is not ours was removed");
        assert!(fresh.exists(), "a write that may be under way was removed");
        std::fs::remove_dir_all(cache.dir()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn copies_are_private_to_their_user() {
        use std::os::unix::fs::PermissionsExt;
        let cache = scratch("private");
        let url = "https://example.org/m?token=secret";
        cache.store(url, b"m", &Version::default()).unwrap();
        let mode = std::fs::metadata(cache.path(url)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
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
