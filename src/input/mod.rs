//! Where bytes come from: what the user named (a URL or a path), fetched over
//! one shared HTTP client or read from disk, with the model and the labels
//! kept between runs.

pub mod cache;
pub mod fetch;
pub mod source;

pub use source::Source;
