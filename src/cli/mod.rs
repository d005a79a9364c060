//! The command-line front end: its options, and the batch run over the
//! engine.

mod args;
pub mod progress;
pub mod run;
mod settings;

pub use args::*;
pub use settings::Settings;
