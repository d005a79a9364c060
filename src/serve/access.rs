//! Who may call what: the optional API key on the routes that spend the
//! server's CPU or tell what others asked (classify, infer, usage), and the
//! origins a browser page may call from (CORS, off unless named).
//!
//! Health, readiness, metrics, the model list and the page stay open: an
//! orchestrator and a scraper hold no key, and the page asks for one itself.

use std::fmt;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::errors::ApiError;
use super::sha256;

/// The key a client must present as `Authorization: Bearer KEY`.
#[derive(Clone)]
pub struct ApiKey {
    /// Its SHA-256: comparing digests of equal length leaks neither the key
    /// nor its length through timing.
    digest: [u8; 32],
}

impl ApiKey {
    /// None for an empty key: a file or variable left blank must not open
    /// the server to anyone sending `Bearer ` alone.
    pub fn new(key: &str) -> Option<ApiKey> {
        let key = key.trim();
        (!key.is_empty()).then(|| ApiKey { digest: sha256(key.as_bytes()) })
    }

    fn admits(&self, presented: &str) -> bool {
        self.digest.ct_eq(&sha256(presented.as_bytes())).into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

/// Refuses, with 401, a request without the right key: the router puts it
/// on the keyed routes (classify, infer, usage), whose only methods are
/// theirs: a browser's preflight (OPTIONS), which carries no credentials,
/// is answered by the CORS layer and a wrong method by a 405, never here.
pub async fn require_key(
    State(key): State<Option<Arc<ApiKey>>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(key) = key else {
        return next.run(request).await;
    };
    let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    match presented.map(|token| key.admits(token)) {
        Some(true) => next.run(request).await,
        Some(false) => unauthorized("wrong API key", true),
        None => unauthorized("an API key is required: send the header Authorization: Bearer KEY", false),
    }
}

/// The token of `Bearer TOKEN` (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(message: &str, wrong: bool) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    // RFC 6750: the scheme to use, and whether the one sent was refused.
    let challenge =
        if wrong { r#"Bearer realm="classifier", error="invalid_token""# } else { r#"Bearer realm="classifier""# };
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

/// The CORS layer for these origins (`*` for any), or none when there are
/// none: then a browser refuses pages from other origins, as it should.
pub fn cors(origins: &[HeaderValue]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") { AllowOrigin::any() } else { AllowOrigin::list(origins.to_vec()) };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("inference-header-content-length"),
            ])
            .expose_headers([header::RETRY_AFTER, header::HeaderName::from_static("inference-header-content-length")])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_admitted_exactly() {
        let key = ApiKey::new(" s3cret\n").unwrap();
        assert!(key.admits("s3cret"));
        for wrong in ["", "s3cre", "s3cret ", "S3CRET", "s3cret2"] {
            assert!(!key.admits(wrong), "{wrong:?}");
        }
        assert!(ApiKey::new(" \n").is_none());
        assert_eq!(format!("{key:?}"), "ApiKey(..)");
    }

    #[test]
    fn bearer_tokens_are_read_with_any_case_of_scheme() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
