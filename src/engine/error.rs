//! Why a source could not be classified, and why an engine could not load.
//!
//! A [`SourceError`]'s message is the `error` of a JSON Lines record, a
//! contract: the messages are those the tool always gave. Its
//! [`ErrorKind`] is what a server maps to a status code, and what the
//! metrics count failures by.

use std::sync::Arc;

use reqwest::StatusCode;

use crate::image::DecodeError;
use crate::input::FetchError;
use crate::labels::LabelsError;
use crate::model::ModelError;

/// What became of one source that was not classified.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source string names neither an http(s) URL nor a path.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Image(#[from] DecodeError),
    /// The inference queue is full and the caller would not wait.
    #[error("overloaded: too many images are waiting for inference")]
    Overloaded,
    /// The caller's deadline passed before the image was classified.
    #[error("deadline passed before the image was classified")]
    Deadline,
    #[error("{0}")]
    Inference(String),
    /// The engine's model could not be loaded, so no image can be classified.
    #[error("the model could not be loaded")]
    Unavailable,
    /// A bug: a stage failed in a way it should not.
    #[error("{0}")]
    Internal(String),
}

/// The kinds of [`SourceError`], flat, for status codes and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The source itself: not a URL or path we read.
    Source,
    /// Refused by the source policy.
    Denied,
    /// The server answered with an error status.
    Http(StatusCode),
    Connect,
    Timeout,
    /// The body or the file is over the size limit.
    TooLarge,
    /// The body broke off, or the HTTP exchange failed otherwise.
    Transfer,
    /// A local file that cannot be read.
    File,
    /// Empty, or not an image at all.
    NotImage,
    /// An image format we know, that cannot be decoded.
    Decode,
    /// An image with more pixels than the limit.
    TooManyPixels,
    Overloaded,
    Deadline,
    Inference,
    Unavailable,
    Internal,
}

impl ErrorKind {
    /// Every kind, in the order the metrics report them (all HTTP statuses
    /// counted as one).
    pub const ALL: [ErrorKind; 16] = [
        ErrorKind::Source,
        ErrorKind::Denied,
        ErrorKind::Http(StatusCode::OK),
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::TooLarge,
        ErrorKind::Transfer,
        ErrorKind::File,
        ErrorKind::NotImage,
        ErrorKind::Decode,
        ErrorKind::TooManyPixels,
        ErrorKind::Overloaded,
        ErrorKind::Deadline,
        ErrorKind::Inference,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    /// Its place in [`ErrorKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            ErrorKind::Source => 0,
            ErrorKind::Denied => 1,
            ErrorKind::Http(_) => 2,
            ErrorKind::Connect => 3,
            ErrorKind::Timeout => 4,
            ErrorKind::TooLarge => 5,
            ErrorKind::Transfer => 6,
            ErrorKind::File => 7,
            ErrorKind::NotImage => 8,
            ErrorKind::Decode => 9,
            ErrorKind::TooManyPixels => 10,
            ErrorKind::Overloaded => 11,
            ErrorKind::Deadline => 12,
            ErrorKind::Inference => 13,
            ErrorKind::Unavailable => 14,
            ErrorKind::Internal => 15,
        }
    }

    /// A short name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Source => "source",
            ErrorKind::Denied => "denied",
            ErrorKind::Http(_) => "http_status",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Transfer => "transfer",
            ErrorKind::File => "file",
            ErrorKind::NotImage => "not_image",
            ErrorKind::Decode => "decode",
            ErrorKind::TooManyPixels => "too_many_pixels",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Deadline => "deadline",
            ErrorKind::Inference => "inference",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Invalid(_) => ErrorKind::Source,
            SourceError::Fetch(e) => match e {
                FetchError::Status(status) => ErrorKind::Http(*status),
                FetchError::Timeout(_) => ErrorKind::Timeout,
                FetchError::Connect(_) => ErrorKind::Connect,
                FetchError::TooLarge { .. } => ErrorKind::TooLarge,
                FetchError::Interrupted(_) | FetchError::Http(_) => ErrorKind::Transfer,
                FetchError::File(_) => ErrorKind::File,
                FetchError::Denied(_) => ErrorKind::Denied,
            },
            SourceError::Image(e) => match e {
                DecodeError::Empty | DecodeError::NotAnImage(_) => ErrorKind::NotImage,
                DecodeError::TooLarge { .. } => ErrorKind::TooManyPixels,
                _ => ErrorKind::Decode,
            },
            SourceError::Overloaded => ErrorKind::Overloaded,
            SourceError::Deadline => ErrorKind::Deadline,
            SourceError::Inference(_) => ErrorKind::Inference,
            SourceError::Unavailable => ErrorKind::Unavailable,
            SourceError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Why the engine could not load its model or its labels. Each names what
/// it was loading.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("cannot fetch the model: {0}")]
    FetchModel(String),
    #[error("cannot load the model {model}: {error}")]
    Model { model: String, error: Arc<ModelError> },
    #[error("the model {model} takes {actual:?} images, not {expected:?} as expected")]
    UnexpectedInput { model: String, actual: (u32, u32), expected: (u32, u32) },
    #[error("cannot fetch the labels {labels}: {error}")]
    FetchLabels { labels: String, error: Arc<FetchError> },
    #[error("cannot read the labels {labels}: {error}")]
    Labels { labels: String, error: Arc<LabelsError> },
    #[error("the labels {labels} do not fit the model {model}: {error}")]
    LabelsMismatch { labels: String, model: String, error: Arc<LabelsError> },
    #[error("internal error while loading: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_place() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
        let names: std::collections::HashSet<_> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn messages_are_the_records_errors() {
        let e = SourceError::from(FetchError::Status(StatusCode::NOT_FOUND));
        assert_eq!((e.to_string(), e.kind()), ("HTTP 404 Not Found".into(), ErrorKind::Http(StatusCode::NOT_FOUND)));
        let e = SourceError::from(FetchError::Timeout(std::time::Duration::from_secs(30)));
        assert_eq!((e.to_string(), e.kind()), ("timed out after 30 s".into(), ErrorKind::Timeout));
        let e = SourceError::from(DecodeError::TooLarge { width: 50_000, height: 50_000 });
        assert_eq!(e.to_string(), "image of 50000x50000 pixels is larger than the limit of 16384x16384");
        assert_eq!(e.kind(), ErrorKind::TooManyPixels);
        let e = SourceError::from(DecodeError::NotAnImage("the content is an HTML page".into()));
        assert_eq!(
            (e.to_string(), e.kind()),
            ("not an image (the content is an HTML page)".into(), ErrorKind::NotImage)
        );
        assert_eq!(SourceError::from(DecodeError::Empty).to_string(), "empty body");
        let e = SourceError::from(FetchError::TooLarge { limit: 10 });
        assert_eq!((e.to_string(), e.kind()), ("body larger than the limit of 10 bytes".into(), ErrorKind::TooLarge));
    }
}
