//! Which source a request names, as the result cache keys it and the usage
//! report counts it: a URL as given, an upload by the SHA-256 of its
//! content (so the same photo sent under two names is one source). An
//! upload is hashed once, here, for both.

use super::sha256;
use crate::engine::Input;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Source(String),
    Upload([u8; 32]),
}

impl Identity {
    pub fn of(input: &Input) -> Identity {
        match input {
            Input::Source(source) => Identity::Source(source.to_string()),
            Input::Bytes { bytes, .. } => Identity::Upload(sha256(bytes)),
        }
    }

    /// How the usage report names it: the URL, or `sha256:HEX`.
    pub fn name(&self) -> String {
        match self {
            Identity::Source(url) => url.clone(),
            Identity::Upload(digest) => {
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                format!("sha256:{hex}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(name: &str, bytes: &'static [u8]) -> Input {
        Input::Bytes { name: name.into(), bytes: bytes::Bytes::from_static(bytes) }
    }

    #[test]
    fn uploads_are_named_by_their_content_and_urls_as_given() {
        // The SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        let abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Identity::of(&upload("a.jpg", b"abc")).name(), abc);
        assert_eq!(Identity::of(&upload("a.jpg", b"abc")), Identity::of(&upload("b.jpg", b"abc")));
        assert_ne!(Identity::of(&upload("a.jpg", b"abc")), Identity::of(&upload("a.jpg", b"abd")));
        let url = Input::Source(crate::input::Source::parse("https://h/a.jpg?x=1").unwrap());
        assert_eq!(Identity::of(&url).name(), "https://h/a.jpg?x=1");
    }
}
