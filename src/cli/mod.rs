//! The command-line front end: its options, and the batch run over the
//! engine.

mod args;
pub mod progress;
pub mod run;

pub use args::*;
