//! Every option, environment variable, stdin and default of the command
//! line, resolved once into plain settings: the engine and the fetcher never
//! see clap's types.

use anyhow::{Context, bail};

use super::args::{self, Args, Shard};
use crate::engine::EngineSettings;
use crate::input::{ExpandOptions, FetchSettings, Source, SourcePolicy};
use crate::render::Format;

/// What one run of the command line does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The sources to classify.
    pub sources: Sources,
    pub format: Format,
    pub top_k: usize,
    /// Most images downloading at once; as many again, downloaded, may wait
    /// for a decoder.
    pub concurrency: usize,
    /// Whether a progress bar may show (not with `-q`).
    pub progress: bool,
    pub engine: EngineSettings,
    pub fetch: FetchSettings,
}

impl Settings {
    /// Resolves `args`: reads `--sources-file` (or stdin), the shard from the
    /// environment, and the defaults.
    pub fn resolve(args: &Args) -> anyhow::Result<Settings> {
        let (model, model_input) = match &args.model {
            None => (
                vec![Source::parse(args::DEFAULT_MODEL_URL)?, Source::parse(args::FALLBACK_MODEL_URL)?],
                Some(args::DEFAULT_MODEL_INPUT),
            ),
            Some(model) => (vec![Source::parse(model).context("--model")?], None),
        };
        // The default model's labels are fetched beside it; a model given
        // may carry its own.
        let labels = match (&args.labels, &args.model) {
            (Some(labels), _) => Some(Source::parse(labels).context("--labels")?),
            (None, None) => Some(Source::parse(args::DEFAULT_LABELS_URL)?),
            (None, Some(_)) => None,
        };
        let threads = args.threads();
        let batch_size = args.batch_size as usize;
        let engine = EngineSettings {
            model,
            model_input,
            labels,
            normalization: args.model_options.normalization(),
            scores: args.model_options.scores,
            threads,
            batch_size,
            // Enough to keep every worker busy with a full batch while the
            // next images are prepared; more would only hold memory.
            queue: batch_size * threads,
            max_image_bytes: args.max_image_bytes,
            exif_orientation: !args.no_exif_orientation,
            decoding: args.decode.into(),
            arithmetic: args.model_options.arithmetic(),
            channels: args.model_options.channels.into(),
        };
        // The user names the sources: every file and address is theirs to read.
        let fetch = FetchSettings { timeout: args.timeout(), policy: SourcePolicy::ALLOW_ALL, cache: args.cache() };
        Ok(Settings {
            sources: source_list(args)?,
            format: args.format,
            top_k: args.top_k as usize,
            concurrency: args.concurrency as usize,
            progress: !args.quiet,
            engine,
            fetch,
        })
    }
}

/// The sources as given, and how they become records: expanded (folders
/// and patterns) as the run goes, then narrowed to the shard. Every shard
/// expands the whole list, so that they split the same one.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The arguments, then the lines of `--sources-file`.
    pub inputs: Vec<String>,
    pub expand: ExpandOptions,
    pub shard: Option<Shard>,
}

/// The sources to classify: the arguments, then `--sources-file`.
fn source_list(args: &Args) -> anyhow::Result<Sources> {
    let mut inputs = args.sources.clone();
    if let Some(path) = &args.sources_file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("cannot read sources from stdin")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("cannot read --sources-file {}", path.display()))?
        };
        inputs.extend(args::parse_source_list(&text));
    }
    if inputs.is_empty() {
        bail!("no sources to classify");
    }
    let shard = args.shard().map_err(anyhow::Error::msg)?;
    Ok(Sources { inputs, expand: ExpandOptions { max_depth: args.max_depth.map(|d| d as usize) }, shard })
}
