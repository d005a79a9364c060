//! Every option, environment variable, stdin and default of the command
//! line, resolved once into plain settings: the engine and the fetcher never
//! see clap's types.

use anyhow::{Context, bail};

use super::args::{self, Args, Shard};
use crate::engine::EngineSettings;
use crate::input::{ExpandOptions, Expanded, FetchSettings, Source, SourcePolicy};
use crate::render::Format;

/// What one run of the command line does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The sources to classify, folders and patterns expanded, narrowed to
    /// the shard.
    pub sources: Vec<Expanded>,
    pub format: Format,
    pub top_k: usize,
    /// Most images in flight at once, from the start of their download
    /// until they wait in the inference queue.
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
        let labels = Source::parse(&args.labels).context("--labels")?;
        let threads = args.threads();
        let batch_size = args.batch_size as usize;
        let engine = EngineSettings {
            model,
            model_input,
            labels,
            threads,
            batch_size,
            // Enough to keep every worker busy with a full batch while the
            // next images are prepared; more would only hold memory.
            queue: batch_size * threads,
            max_image_bytes: args.max_image_bytes,
            exif_orientation: !args.no_exif_orientation,
            channels: args.channels.into(),
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

/// The sources to classify: the arguments, then `--sources-file`, folders
/// and patterns expanded, narrowed to `--shard`.
fn source_list(args: &Args) -> anyhow::Result<Vec<Expanded>> {
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
    // Every shard expands the whole list, so that they split the same one.
    let expanded = crate::input::expand(inputs, ExpandOptions { max_depth: args.max_depth.map(|d| d as usize) });
    let Some(shard) = shard else { return Ok(expanded) };
    Ok(narrow(expanded, shard))
}

fn narrow<T>(inputs: Vec<T>, shard: Shard) -> Vec<T> {
    let total = inputs.len();
    let mine: Vec<T> =
        inputs.into_iter().enumerate().filter(|(position, _)| shard.contains(*position)).map(|(_, s)| s).collect();
    tracing::info!("shard {}/{}: {} of {total} sources", shard.index, shard.count, mine.len());
    mine
}
