//! `classifier serve`'s command line: clap's types, each option with its
//! environment variable, kept apart from the batch command's so that the two
//! evolve without stepping on each other. [`super::settings`] resolves them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgAction, Parser};
use ipnet::IpNet;

/// Serve the classifier over HTTP: the models loaded once, the inference
/// pool shared by every request.
///
/// POST /v1/classify takes URLs (JSON), uploads (multipart) or a raw image;
/// GET /v1/models, /healthz, /readyz and /metrics tell how it is doing. Every
/// option can also be set by the environment variable named with it.
#[derive(Debug, Parser)]
#[command(name = "classifier serve", version, max_term_width = 100)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, value_name = "ADDR:PORT", env = "CLASSIFIER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A model to serve, repeatable: `NAME=URL|PATH`, or a URL or path alone
    /// (named after its file). The first is the default. CLASSIFIER_MODEL
    /// holds several, separated by spaces. [default: the AIY birds V1
    /// model, named birds]
    #[arg(long, value_name = "[NAME=]URL|PATH")]
    pub model: Vec<String>,

    /// The label map of a model, repeatable: `NAME=URL|PATH` for the model
    /// of that name, or a URL or path alone for the model at the same
    /// position. CLASSIFIER_LABELS holds several, separated by spaces.
    /// [default: the AIY birds label map, for the default model]
    #[arg(long, value_name = "[NAME=]URL|PATH")]
    pub labels: Vec<String>,

    /// Let image URLs reach this range of addresses (CIDR, such as
    /// 10.1.0.0/16), repeatable; by default loopback, private, link-local
    /// and other non-public addresses are refused. Comma-separated in the
    /// variable.
    #[arg(long, value_name = "CIDR", env = "CLASSIFIER_ALLOW_ADDRESS", value_delimiter = ',')]
    pub allow_address: Vec<IpNet>,

    /// A file holding the API key: then classify, infer and usage require
    /// `Authorization: Bearer KEY`. CLASSIFIER_API_KEY holds the key itself.
    /// [default: no key]
    #[arg(long, value_name = "PATH", env = "CLASSIFIER_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// An origin whose pages may call the API from a browser (CORS), such
    /// as https://photos.example.org, repeatable; `*` for any.
    /// Comma-separated in the variable. [default: none]
    #[arg(long, value_name = "ORIGIN", env = "CLASSIFIER_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,

    /// How every model served is fed and read, as on the command line.
    #[command(flatten)]
    pub model_options: crate::cli::ModelArgs,

    /// Predictions per image when a request does not say.
    #[arg(long, value_name = "N", env = "CLASSIFIER_TOP_K", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,

    /// Largest request body, in bytes (JSON, multipart or raw image).
    #[arg(long, value_name = "BYTES", env = "CLASSIFIER_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: u64,

    /// Most sources (URLs or uploaded files) in one request.
    #[arg(long, value_name = "N", env = "CLASSIFIER_MAX_SOURCES", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_sources: u32,

    /// Time limit of a whole request, once its body is read, in seconds: a
    /// source not classified by then is an error record.
    #[arg(long, value_name = "SECS", env = "CLASSIFIER_REQUEST_TIMEOUT", default_value_t = 30.0,
          value_parser = positive_seconds)]
    pub request_timeout: f64,

    /// Time limit of each download (images, and the models and labels), in
    /// seconds.
    #[arg(long, value_name = "SECS", env = "CLASSIFIER_FETCH_TIMEOUT", default_value_t = 10.0,
          value_parser = positive_seconds)]
    pub fetch_timeout: f64,

    /// Time a client has to send a request's headers, in seconds.
    #[arg(long, value_name = "SECS", env = "CLASSIFIER_HEADER_TIMEOUT", default_value_t = 10.0,
          value_parser = positive_seconds)]
    pub header_timeout: f64,

    /// Time a client has to send a request's body, in seconds.
    #[arg(long, value_name = "SECS", env = "CLASSIFIER_BODY_TIMEOUT", default_value_t = 30.0,
          value_parser = positive_seconds)]
    pub body_timeout: f64,

    /// Most classify requests handled at once; more are answered 503 at
    /// once.
    #[arg(long, value_name = "N", env = "CLASSIFIER_MAX_IN_FLIGHT", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight: u32,

    /// How long requests in flight may take to finish after SIGTERM or
    /// ctrl-c, in seconds.
    #[arg(long, value_name = "SECS", env = "CLASSIFIER_DRAIN_TIMEOUT", default_value_t = 25.0,
          value_parser = positive_seconds)]
    pub drain_timeout: f64,

    /// Most images of a model waiting for inference; when it is full,
    /// requests are answered 503 with Retry-After.
    #[arg(long, value_name = "N", env = "CLASSIFIER_QUEUE", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queue: u32,

    /// Most images downloading at once, over all requests; as many again,
    /// downloaded or uploaded, may wait for a decoder.
    #[arg(long, value_name = "N", env = "CLASSIFIER_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,

    /// Most images per inference batch.
    #[arg(long, value_name = "N", env = "CLASSIFIER_BATCH_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch_size: u32,

    /// Inference threads of each model, also the threads that prepare it.
    /// [default: the number of CPUs]
    #[arg(long, value_name = "N", env = "CLASSIFIER_THREADS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: Option<u32>,

    /// How long a result stays in the result cache, in seconds; 0 turns
    /// the cache off.
    #[arg(long, value_name = "SECS", env = "CLASSIFIER_CACHE_TTL", default_value_t = 3600.0,
          value_parser = seconds_or_zero)]
    pub cache_ttl: f64,

    /// Most results in the result cache; 0 turns it off.
    #[arg(long, value_name = "N", env = "CLASSIFIER_CACHE_ENTRIES", default_value_t = 1024)]
    pub cache_entries: u64,

    /// The window of GET /v1/usage, in seconds. [default: 3 days]
    #[arg(long, value_name = "SECS", env = "CLASSIFIER_USAGE_WINDOW", default_value_t = 259_200.0,
          value_parser = positive_seconds, hide_default_value = true)]
    pub usage_window: f64,

    /// Sources in a usage report when the request does not say (?top=N).
    #[arg(long, value_name = "N", env = "CLASSIFIER_USAGE_TOP", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub usage_top: u32,

    /// Largest image accepted, in bytes.
    #[arg(long, value_name = "BYTES", env = "CLASSIFIER_MAX_IMAGE_BYTES", default_value_t = 64 << 20)]
    pub max_image_bytes: u64,

    /// Classify images as their pixels are stored, without turning them as
    /// their EXIF orientation tag says.
    #[arg(long, env = "CLASSIFIER_NO_EXIF_ORIENTATION", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_exif_orientation: bool,

    /// How JPEGs are decoded: `exact` whole, then resized as Pillow
    /// resizes; `fast` reduced where the model's input allows, as the
    /// command line's --decode.
    #[arg(long, env = "CLASSIFIER_DECODE", value_enum, default_value_t = crate::cli::DecodeArg::Exact)]
    pub decode: crate::cli::DecodeArg,

    /// Keep the models and label maps in this folder between runs.
    /// [default: the user's cache folder, such as ~/.cache/classifier]
    #[arg(long, value_name = "PATH", env = "CLASSIFIER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Download the models and label maps afresh, neither reading nor
    /// writing the cache.
    #[arg(long, env = "CLASSIFIER_NO_CACHE", hide_env_values = true,
          value_parser = clap::builder::FalseyValueParser::new())]
    pub no_cache: bool,

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

fn seconds_or_zero(s: &str) -> Result<f64, String> {
    if s.trim() == "0" { Ok(0.0) } else { positive_seconds(s) }
}

/// Whether the command line asks for the server: `serve` as the first
/// argument. Anywhere else, and as `./serve`, it is a source.
pub fn is_serve(args: &[std::ffi::OsString]) -> bool {
    args.get(1).is_some_and(|a| a == "serve")
}
