//! `GET /`: the page for people, one file of markup, style and script
//! (`page.html`) built into the binary, so the server stays one file with
//! nothing to deploy beside it. It calls the JSON API as any client does.
//!
//! Its Content-Security-Policy allows the page's one inline style and one
//! inline script by their SHA-256, computed from the file itself: an edit
//! of the page cannot leave a stale hash behind, and nothing else (an
//! injected script, a handler attribute, another origin) runs.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

const PAGE: &str = include_str!("page.html");

static POLICY: LazyLock<String> = LazyLock::new(|| {
    let (style, script) = (hash(inline("style")), hash(inline("script")));
    // Thumbnails: the photos' own object URLs, and the pasted image URLs,
    // which are anywhere on the web.
    format!(
        "default-src 'none'; script-src {script}; style-src {style}; img-src 'self' blob: http: https:; \
         connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
});

pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The servers of pasted image URLs need not learn where the page is.
            (header::REFERRER_POLICY, "no-referrer"),
            // A new version of the server comes with new hashes: never a stale page.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// A CSP source for `text`: its SHA-256 in base64.
fn hash(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest))
}

/// The text of the page's `<tag>` element, exactly as the browser hashes it.
fn inline(tag: &str) -> &'static str {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let Some(start) = PAGE.find(&open).map(|i| i + open.len()) else { return "" };
    PAGE[start..].find(&close).map_or("", |end| &PAGE[start..start + end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_holds_the_hashes_of_the_one_style_and_the_one_script() {
        // The SHA-256 of nothing, as every CSP reference gives it.
        assert_eq!(hash(""), "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='");
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(inline("script").contains("/v1/classify"));
        assert!(inline("style").contains("font"));
        assert!(POLICY.contains(&format!("script-src {};", hash(inline("script")))), "{}", *POLICY);
        assert!(POLICY.contains(&format!("style-src {};", hash(inline("style")))), "{}", *POLICY);
    }

    /// What the policy would silently block: style attributes and handler
    /// attributes in the markup (the script sets styles and handlers itself).
    #[test]
    fn the_markup_has_nothing_the_policy_blocks() {
        let markup = PAGE.replace(inline("script"), "");
        assert!(!markup.contains(" style="));
        let handler = markup.split(|c: char| c.is_whitespace()).find(|word| {
            word.strip_prefix("on")
                .and_then(|rest| rest.split_once('='))
                .is_some_and(|(name, _)| !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase()))
        });
        assert_eq!(handler, None);
        assert!(!markup.contains("javascript:"));
    }
}
