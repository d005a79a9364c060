//! classifier: downloads a TFLite image classifier, its labels and images
//! concurrently, and prints the top predictions for each image.
//!
//! The modules are the stages, in the order data flows through them:
//! [`source`] → [`fetch`] → [`preprocess`] → [`model`] (run in batches by
//! [`pipeline`]) → [`rank`] → [`render`]. [`labels`] reads the label map and
//! [`cli`] the command line.

pub mod cli;
pub mod fetch;
pub mod labels;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod progress;
pub mod rank;
pub mod render;
pub mod source;
