//! What the user asked to classify: URLs and local files.

use std::fmt;
use std::path::PathBuf;

use reqwest::Url;

/// Where bytes come from: a model, a label map or an image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Url(Url),
    Path(PathBuf),
}

/// A source string that names neither an http(s) URL nor a local path.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{input:?}: {reason}")]
pub struct SourceError {
    pub input: String,
    pub reason: String,
}

impl Source {
    /// Parses what the user typed: `http://` and `https://` URLs are fetched,
    /// anything with another scheme is refused, and the rest is a file path.
    pub fn parse(input: &str) -> Result<Source, SourceError> {
        let error = |reason: String| SourceError { input: input.to_string(), reason };
        if input.is_empty() {
            return Err(error("empty source".into()));
        }
        if let Some((scheme, _)) = input.split_once("://") {
            let scheme = scheme.to_ascii_lowercase();
            if scheme != "http" && scheme != "https" {
                return Err(error(format!("unsupported scheme {scheme:?}: use http://, https:// or a file path")));
            }
            let url = Url::parse(input).map_err(|e| error(format!("invalid URL: {e}")))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(error("URL has no host".into()));
            }
            return Ok(Source::Url(url));
        }
        // Windows drive letters aside, `scheme:rest` without slashes (data:,
        // file:, ftp:...) is a URL the user expects us to understand.
        if let Some((scheme, _)) = input.split_once(':')
            && scheme.len() > 1
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !std::path::Path::new(input).exists()
        {
            return Err(error(format!(
                "unsupported scheme {:?}: use http://, https:// or a file path",
                scheme.to_ascii_lowercase()
            )));
        }
        Ok(Source::Path(PathBuf::from(input)))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Url(url) => write!(f, "{url}"),
            Source::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert!(matches!(Source::parse("https://example.org/a.jpg"), Ok(Source::Url(_))));
        assert!(matches!(Source::parse("HTTP://example.org/a.jpg"), Ok(Source::Url(_))));
        assert_eq!(Source::parse("images/a.jpg").unwrap(), Source::Path("images/a.jpg".into()));
        assert_eq!(Source::parse("/tmp/a b.png").unwrap(), Source::Path("/tmp/a b.png".into()));
    }

    #[test]
    fn other_schemes_are_refused_with_the_reason() {
        for input in ["ftp://example.org/a.jpg", "file:///tmp/a.jpg", "data:image/png;base64,AAAA", "s3://bucket/key"] {
            let err = Source::parse(input).unwrap_err();
            assert_eq!(err.input, input);
            assert!(err.reason.contains("unsupported scheme"), "{err}");
        }
        assert!(Source::parse("http://").unwrap_err().to_string().contains("http://"));
        assert!(Source::parse("").is_err());
    }
}
