//! The command-line front end: its options, and the batch run over the
//! engine.

mod args;
mod generate;
pub mod progress;
pub mod run;
mod settings;

pub use args::*;
pub use generate::{Generate, generate};
pub use settings::Settings;
