//! Why a fetch failed, in words a user can act on, and in kinds a server can
//! map to a status code.

use std::time::Duration;

use reqwest::StatusCode;

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
    /// The source policy refuses it: a local path, or an address in a
    /// range the policy keeps out of reach.
    #[error("{0}")]
    Denied(String),
}

impl FetchError {
    /// Whether the host could not be reached or could not answer, rather
    /// than refusing the request.
    pub(super) fn is_unreachable(&self) -> bool {
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

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// Turns reqwest's error into one that says what went wrong in a few words.
pub(super) fn classify(e: reqwest::Error, timeout: Duration) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout(timeout);
    }
    // The innermost cause is the one a user can act on ("Connection refused"),
    // unless the source policy refused the address (in the resolver, or on a
    // redirect), which is said as it is.
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        if let Some(denied) = next.downcast_ref::<super::policy::Denied>() {
            return FetchError::Denied(denied.to_string());
        }
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
