//! The command line.

use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::render::Format;

/// Kaggle's download endpoint for Google's AIY birds V1 classifier, version
/// 3; it answers a gzip'd tar holding the `.tflite`.
pub const DEFAULT_MODEL_URL: &str =
    "https://www.kaggle.com/api/v1/models/google/aiy/tfLite/vision-classifier-birds-v1/3/download";
/// Where TF Hub used to serve the same model, tried when Kaggle fails.
pub const FALLBACK_MODEL_URL: &str =
    "https://tfhub.dev/google/lite-model/aiy/vision/classifier/birds_V1/3?lite-format=tflite";
/// The default model's input size, known in advance so that images can be
/// resized while the model is still downloading. Checked once it has loaded.
pub const DEFAULT_MODEL_INPUT: (u32, u32) = (224, 224);
/// The label map of the default model.
pub const DEFAULT_LABELS_URL: &str = "https://www.gstatic.com/aihub/tfhub/labelmaps/aiy_birds_V1_labelmap.csv";

/// Classify images with a TensorFlow Lite model: by default, which bird is in
/// each picture.
///
/// Downloads the model, its labels and every image concurrently, classifies
/// the images in batches on the CPU, and prints the top predictions of each
/// image on stdout, in the order given. Logs and timings go to stderr.
#[derive(Debug, Parser)]
#[command(version, max_term_width = 100)]
pub struct Args {
    /// Images to classify: http(s) URLs or local file paths.
    #[arg(value_name = "SOURCE", required = true)]
    pub sources: Vec<String>,

    /// The TFLite classifier: a URL or a path, to a .tflite file or a .tar.gz
    /// holding one. [default: the AIY birds V1 model, from Kaggle, falling
    /// back to TF Hub]
    #[arg(long, value_name = "URL|PATH")]
    pub model: Option<String>,

    /// The label map: a CSV with an `id,name` header, or one label a line.
    #[arg(long, value_name = "URL|PATH", default_value = DEFAULT_LABELS_URL)]
    pub labels: String,

    /// How many predictions to print per image.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,

    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Time limit of each download, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = positive_seconds)]
    pub timeout: f64,

    /// Most downloads in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,

    /// Most images per inference batch.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch_size: u32,

    /// Inference threads, each running its own batches. [default: the number of CPUs]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: Option<u32>,

    /// Largest image accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_image_bytes: u64,

    /// More logs on stderr: -v adds a timing line per download, decode and
    /// batch; -vv traces everything. RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

impl Args {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}
