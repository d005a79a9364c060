//! Where bytes come from: what the user named (a URL or a path), checked
//! against the source policy, fetched over one shared HTTP client or read
//! from disk, with the model and the labels kept between runs.
//!
//! - `source`: what the user typed, as a URL or a path.
//! - `expand`: folders and patterns to the files they stand for.
//! - `policy`: whether local paths may be read, which addresses reached.
//! - `fetch`: the [`Fetcher`]: one client, limits of size and time.
//! - `ranged`: a large file in byte ranges over parallel connections.
//! - `kept`: the model and the labels through the download `cache`.

pub mod cache;
mod error;
pub mod expand;
mod fetch;
mod kept;
pub mod policy;
mod ranged;
pub mod source;
#[cfg(test)]
mod testing;

pub use error::FetchError;
pub use expand::{ExpandOptions, Expanded, expand};
pub use fetch::{FetchSettings, Fetcher};
pub use policy::SourcePolicy;
pub use source::Source;
