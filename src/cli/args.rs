//! The command line.

use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::image::Decoding;
use crate::input::cache::Cache;
use crate::model::{Arithmetic, Channels, MeanStd};
use crate::rank::Scores;
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
    /// Images to classify: http(s) URLs, local files, folders (the image
    /// files under them, by extension, hidden ones skipped) or quoted
    /// patterns such as 'photos/**/*.jpg', in sorted path order.
    #[arg(value_name = "SOURCE", required_unless_present_any = ["sources_file", "generate"])]
    pub sources: Vec<String>,

    /// Read more sources from a file, one a line (`-` for stdin); blank lines
    /// and lines starting with `#` are skipped. They follow those given as
    /// arguments.
    #[arg(long, value_name = "PATH")]
    pub sources_file: Option<std::path::PathBuf>,

    /// Classify only shard I of N (counting from 0): the sources at positions
    /// I, I+N, I+2N... of the list. N processes with shards 0/N to N-1/N
    /// together classify every source exactly once. [default: from
    /// CLASSIFIER_SHARD, else JOB_COMPLETION_INDEX / CLASSIFIER_SHARD_COUNT]
    #[arg(long, value_name = "I/N", env = "CLASSIFIER_SHARD")]
    pub shard: Option<Shard>,

    /// How deep folders given as sources are walked: 1 is only the files
    /// directly in the folder, 2 those of its subfolders too... [default: no
    /// limit]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_depth: Option<u32>,

    /// Classify images as their pixels are stored, without turning them as
    /// their EXIF orientation tag says (browsers and Pillow's exif_transpose
    /// turn them).
    #[arg(long)]
    pub no_exif_orientation: bool,

    /// How JPEGs are decoded: `exact` whole, then resized as Pillow
    /// resizes, the pixels the reference outputs were computed from; `fast`
    /// at 1/2, 1/4 or 1/8 of their size where the model's input allows,
    /// for less CPU and scores a few 1/256 steps off the reference's.
    #[arg(long, env = "CLASSIFIER_DECODE", value_enum, default_value_t = DecodeArg::Exact)]
    pub decode: DecodeArg,

    #[command(flatten)]
    pub model_options: ModelArgs,

    /// The classifier: a URL or a path, to a TensorFlow Lite or ONNX file or
    /// a .tar.gz holding one (recognised by content, not name). [default:
    /// the AIY birds V1 model, from Kaggle, falling
    /// back to TF Hub]
    #[arg(long, value_name = "URL|PATH")]
    pub model: Option<String>,

    /// The label map: a CSV with an `id,name` header, or one label a line.
    /// [default: for the default model, its AIY label map; for a model given
    /// with --model, the label file embedded in it, else none (classes are
    /// named by index)]
    #[arg(long, value_name = "URL|PATH")]
    pub labels: Option<String>,

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
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,

    /// Most images per inference batch.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch_size: u32,

    /// Inference threads, each running its own batches; also the threads that
    /// prepare the model. [default: the number of CPUs]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: Option<u32>,

    /// Keep the model and the label map in this folder between runs: a later
    /// run asks their server only whether they changed, and uses the kept
    /// copy if the server cannot be reached. [default: the user's cache
    /// folder, such as ~/.cache/classifier]
    #[arg(long, value_name = "PATH", env = "CLASSIFIER_CACHE_DIR")]
    pub cache_dir: Option<std::path::PathBuf>,

    /// Download the model and the label map afresh, neither reading nor
    /// writing the cache. CLASSIFIER_NO_CACHE=1 (or true, yes, on) does the
    /// same.
    #[arg(long, env = "CLASSIFIER_NO_CACHE", hide_env_values = true,
          value_parser = clap::builder::FalseyValueParser::new())]
    pub no_cache: bool,

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

    /// Print a man page or shell completions on stdout, and exit.
    #[arg(long, value_enum, value_name = "KIND", exclusive = true)]
    pub generate: Option<super::Generate>,
}

/// How a model is fed and read, for the command line and the server alike:
/// where these are not given, each model says (its metadata, its
/// quantization, its last op).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// The pixel mean, subtracted from each pixel in [0, 255] before it is
    /// divided by --std: one value, or one per channel (R,G,B). With --std it
    /// takes the place of the model's own normalization (its metadata's, its
    /// quantization's, else the guess 127.5).
    #[arg(long, env = "CLASSIFIER_MEAN", value_name = "M[,M,M]", requires = "std", allow_hyphen_values = true, value_parser = mean)]
    pub mean: Option<[f32; 3]>,

    /// The pixel standard deviation, by which (pixel - mean) is divided: one
    /// value, or one per channel (R,G,B). `--mean 0 --std 1` feeds raw
    /// pixels in [0, 255]; `--mean 0 --std 255` feeds [0, 1].
    #[arg(long, env = "CLASSIFIER_STD", value_name = "S[,S,S]", requires = "mean", allow_hyphen_values = true, value_parser = std_dev)]
    pub std: Option<[f32; 3]>,

    /// What the printed scores are: `auto`, a probability (the model's
    /// outputs when its graph ends in SOFTMAX or LOGISTIC, else their
    /// softmax); `softmax`, the softmax of the outputs; `raw`, the outputs as
    /// the model gives them.
    #[arg(long, env = "CLASSIFIER_SCORES", value_enum, default_value_t = Scores::Auto)]
    pub scores: Scores,

    /// How a quantized model computes: `quantized` in 8-bit integers, as the
    /// quantized runtime does (or, for a graph with an op the integer path
    /// lacks, as `rounded`); `rounded` in float32 with every activation
    /// rounded to its 8-bit grid; `float` in float32 unrounded. Float models
    /// are unaffected.
    #[arg(long, env = "CLASSIFIER_ARITHMETIC", value_enum, default_value_t = ArithmeticArg::Quantized)]
    pub arithmetic: ArithmeticArg,

    /// The order of the colour channels the model was trained on: bgr for
    /// models trained on images read by OpenCV or Caffe.
    #[arg(long, env = "CLASSIFIER_CHANNELS", value_enum, default_value_t = ChannelOrder::Rgb)]
    pub channels: ChannelOrder,
}

impl ModelArgs {
    pub fn normalization(&self) -> Option<MeanStd> {
        match (self.mean, self.std) {
            (Some(mean), Some(std)) => Some(MeanStd { mean, std }),
            _ => None,
        }
    }

    pub fn arithmetic(&self) -> Arithmetic {
        match self.arithmetic {
            ArithmeticArg::Quantized => Arithmetic::Quantized,
            ArithmeticArg::Rounded => Arithmetic::Rounded,
            ArithmeticArg::Float => Arithmetic::Float,
        }
    }
}

/// `--decode`, as clap reads it (the engine takes `image::Decoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecodeArg {
    Exact,
    Fast,
}

impl From<DecodeArg> for Decoding {
    fn from(arg: DecodeArg) -> Decoding {
        match arg {
            DecodeArg::Exact => Decoding::Exact,
            DecodeArg::Fast => Decoding::Fast,
        }
    }
}

/// `--arithmetic`, as clap reads it (the model takes `model::Arithmetic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArithmeticArg {
    Quantized,
    Rounded,
    Float,
}

/// `--channels`: clap's copy of [`Channels`], which the model keeps free of
/// clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

impl From<ChannelOrder> for Channels {
    fn from(order: ChannelOrder) -> Channels {
        match order {
            ChannelOrder::Rgb => Channels::Rgb,
            ChannelOrder::Bgr => Channels::Bgr,
        }
    }
}

/// Part `index` of `count` of the source list, by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether the source at `position` of the list belongs to this shard.
    pub fn contains(&self, position: usize) -> bool {
        position % self.count == self.index
    }

    fn new(index: usize, count: usize) -> Result<Shard, String> {
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: expected I/N with 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }

    /// The shard of a Kubernetes Indexed Job's pod: its completion index,
    /// out of CLASSIFIER_SHARD_COUNT. The index alone says nothing of the
    /// count, so without both there is no sharding.
    pub fn from_job_env() -> Result<Option<Shard>, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        match (var("JOB_COMPLETION_INDEX"), var("CLASSIFIER_SHARD_COUNT")) {
            (Some(index), Some(count)) => {
                let parse = |name: &str, v: &str| {
                    v.trim().parse::<usize>().map_err(|_| format!("{name}={v:?} is not a number"))
                };
                Shard::new(parse("JOB_COMPLETION_INDEX", &index)?, parse("CLASSIFIER_SHARD_COUNT", &count)?).map(Some)
            }
            _ => Ok(None),
        }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let (index, count) = s.split_once('/').ok_or_else(|| format!("{s:?} is not of the form I/N"))?;
        let parse = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("{s:?} is not of the form I/N"));
        Shard::new(parse(index)?, parse(count)?)
    }
}

/// One value or three, comma-separated, as `--mean` and `--std` take them.
fn channel_values(s: &str, what: &str) -> Result<[f32; 3], String> {
    let values = s
        .split(',')
        .map(|v| v.trim().parse::<f32>().map_err(|_| format!("{:?} is not a number", v.trim())))
        .collect::<Result<Vec<f32>, String>>()?;
    crate::model::tflite::channels(&values, what)
}

fn mean(s: &str) -> Result<[f32; 3], String> {
    channel_values(s, "mean")
}

fn std_dev(s: &str) -> Result<[f32; 3], String> {
    channel_values(s, "std")
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

impl Args {
    /// Inference threads: `--threads`, else one per CPU.
    pub fn threads(&self) -> usize {
        self.threads.map(|t| t as usize).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }

    /// Where downloads of the model and labels are kept: `--cache-dir`, else
    /// the user's cache folder; none with `--no-cache`.
    pub fn cache(&self) -> Option<Cache> {
        match (&self.cache_dir, self.no_cache) {
            (_, true) => None,
            (Some(dir), false) => Some(Cache::new(dir)),
            (None, false) => Cache::in_default_dir(),
        }
    }

    /// The shard to classify: `--shard`, else the Indexed Job's.
    pub fn shard(&self) -> Result<Option<Shard>, String> {
        match self.shard {
            Some(shard) => Ok(Some(shard)),
            None => Shard::from_job_env(),
        }
    }
}

/// The sources listed in a file's text: one a line, blank lines and `#`
/// comments skipped.
pub fn parse_source_list(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_list() {
        assert_eq!("1/3".parse::<Shard>(), Ok(Shard { index: 1, count: 3 }));
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (0..3).map(|i| Shard { index: i, count: 3 }).collect();
        for position in 0..100 {
            assert_eq!(shards.iter().filter(|s| s.contains(position)).count(), 1);
        }
    }

    #[test]
    fn mean_and_std_take_one_value_or_three() {
        assert_eq!(mean("0"), Ok([0.0; 3]));
        assert_eq!(mean("123.7, 116.3,103.5"), Ok([123.7, 116.3, 103.5]));
        assert_eq!(mean("-1"), Ok([-1.0; 3]));
        assert_eq!(std_dev("58.4,57.1,57.4"), Ok([58.4, 57.1, 57.4]));
        assert_eq!(mean("1,2").unwrap_err(), "2 values for the mean, expected one or one per channel (R,G,B)");
        assert_eq!(std_dev("1,0,1").unwrap_err(), "a std of 0 divides by zero");
        assert_eq!(std_dev("inf").unwrap_err(), "the std inf is not a finite number");
        assert_eq!(mean("a").unwrap_err(), "\"a\" is not a number");
        assert_eq!(mean("1,,2").unwrap_err(), "\"\" is not a number");
        assert!(mean("0").is_ok() && std_dev("0").is_err(), "a mean of 0 is fine, a std of 0 is not");
    }

    #[test]
    fn mean_and_std_go_together_and_errors_name_the_option() {
        let parse = |args: &[&str]| Args::try_parse_from([&["classifier"], args, &["a.jpg"]].concat());
        let args = parse(&["--mean", "0", "--std", "1"]).unwrap();
        assert_eq!((args.model_options.mean, args.model_options.std), (Some([0.0; 3]), Some([1.0; 3])));
        assert_eq!(args.model_options.scores, Scores::Auto);
        let err = parse(&["--std", "0", "--mean", "0"]).unwrap_err().to_string();
        assert!(err.contains("--std") && err.contains("divides by zero"), "{err}");
        let err = parse(&["--mean", "0"]).unwrap_err().to_string();
        assert!(err.contains("--std"), "{err}");
        assert_eq!(parse(&["--scores", "raw"]).unwrap().model_options.scores, Scores::Raw);
        assert!(parse(&["--scores", "logits"]).is_err());
    }

    #[test]
    fn source_lists_skip_blanks_and_comments() {
        let list = parse_source_list("# birds\nhttps://h/a.jpg\n\n  b.png  \r\n#c.jpg\n");
        assert_eq!(list, ["https://h/a.jpg", "b.png"]);
    }
}
