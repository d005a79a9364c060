//! `classifier serve`'s options, environment variables and defaults,
//! resolved once into plain settings: the router, the engines and the
//! fetcher never see clap's types.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::http::HeaderValue;

use super::access::ApiKey;
use super::args::ServeArgs;
use crate::cli::{DEFAULT_LABELS_URL, DEFAULT_MODEL_INPUT, DEFAULT_MODEL_URL, FALLBACK_MODEL_URL};
use crate::engine::EngineSettings;
use crate::input::cache::Cache;
use crate::input::{FetchSettings, Source, SourcePolicy};

/// The name of the default model.
pub const DEFAULT_MODEL_NAME: &str = "birds";

/// What one server does.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub listen: SocketAddr,
    /// The models served, the default first.
    pub models: Vec<ModelSettings>,
    /// Image URLs are fetched under its policy; the models and labels by
    /// the fetcher's trusted client.
    pub fetch: FetchSettings,
    pub limits: Limits,
    pub access: Access,
}

/// Who may call what.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Required on classify, infer and usage when set.
    pub api_key: Option<ApiKey>,
    /// Origins allowed to call from a browser; `*` for any.
    pub cors_origins: Vec<HeaderValue>,
}

/// One model served, by name.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub name: String,
    pub engine: EngineSettings,
}

/// What a request may ask and how long it may take.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_sources: usize,
    /// Predictions per image when a request does not say.
    pub top_k: usize,
    /// From the body read to the answer.
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Classify requests handled at once.
    pub max_in_flight: usize,
    /// Images being downloaded or decoded at once, over all requests.
    pub concurrency: usize,
    pub drain_timeout: Duration,
    /// Results kept in the result cache (0: none), and for how long.
    pub cache_entries: u64,
    pub cache_ttl: Duration,
    pub usage_window: Duration,
    pub usage_top: usize,
}

impl ServeSettings {
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<ServeSettings> {
        let env_list = |name: &str| -> Vec<String> {
            std::env::var(name).map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
        };
        let model_args = if args.model.is_empty() { env_list("CLASSIFIER_MODEL") } else { args.model.clone() };
        let label_args = if args.labels.is_empty() { env_list("CLASSIFIER_LABELS") } else { args.labels.clone() };
        let threads = args
            .threads
            .map(|t| t as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let batch_size = args.batch_size as usize;
        let engine = |model: Vec<Source>, model_input, labels| EngineSettings {
            model,
            model_input,
            labels,
            threads,
            batch_size,
            queue: args.queue as usize,
            max_image_bytes: args.max_image_bytes,
            exif_orientation: !args.no_exif_orientation,
            decoding: args.decode.into(),
            // As on the command line, for every model served.
            normalization: args.model_options.normalization(),
            scores: args.model_options.scores,
            arithmetic: args.model_options.arithmetic(),
            channels: args.model_options.channels.into(),
        };
        let models = models(&model_args, &label_args)?
            .into_iter()
            .map(|m| ModelSettings { name: m.name, engine: engine(m.sources, m.input, m.labels) })
            .collect();
        let cache = match (&args.cache_dir, args.no_cache) {
            (_, true) => None,
            (Some(dir), false) => Some(Cache::new(dir)),
            (None, false) => Cache::in_default_dir(),
        };
        // Strangers name the images: public addresses only, unless the
        // operator opened a range.
        let policy = SourcePolicy::PUBLIC_ONLY.allowing(args.allow_address.iter().copied());
        let fetch = FetchSettings { timeout: Duration::from_secs_f64(args.fetch_timeout), policy, cache };
        let limits = Limits {
            max_body_bytes: usize::try_from(args.max_body_bytes).unwrap_or(usize::MAX),
            max_sources: args.max_sources as usize,
            top_k: args.top_k as usize,
            request_timeout: Duration::from_secs_f64(args.request_timeout),
            header_timeout: Duration::from_secs_f64(args.header_timeout),
            body_timeout: Duration::from_secs_f64(args.body_timeout),
            max_in_flight: args.max_in_flight as usize,
            concurrency: args.concurrency as usize,
            drain_timeout: Duration::from_secs_f64(args.drain_timeout),
            cache_entries: args.cache_entries,
            cache_ttl: Duration::from_secs_f64(args.cache_ttl),
            usage_window: Duration::from_secs_f64(args.usage_window),
            usage_top: args.usage_top as usize,
        };
        let access = Access {
            api_key: api_key(args.api_key_file.as_deref(), std::env::var("CLASSIFIER_API_KEY").ok())?,
            cors_origins: cors_origins(&args.cors_origin)?,
        };
        Ok(ServeSettings { listen: args.listen, models, fetch, limits, access })
    }
}

/// The key from `--api-key-file`, else from CLASSIFIER_API_KEY; both is
/// ambiguous, and a blank one a mistake.
fn api_key(file: Option<&std::path::Path>, from_env: Option<String>) -> anyhow::Result<Option<ApiKey>> {
    let (text, origin) = match (file, from_env) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => bail!("--api-key-file and CLASSIFIER_API_KEY are both set: give the key one way"),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--api-key-file {}: cannot read the key", path.display()))?;
            (text, format!("--api-key-file {}", path.display()))
        }
        (None, Some(text)) => (text, "CLASSIFIER_API_KEY".to_string()),
    };
    match ApiKey::new(&text) {
        Some(key) => Ok(Some(key)),
        None => bail!("{origin}: the API key is empty"),
    }
}

/// Each origin as a browser sends it: `scheme://host[:port]`, no path.
fn cors_origins(given: &[String]) -> anyhow::Result<Vec<HeaderValue>> {
    given
        .iter()
        .map(|origin| {
            let origin = origin.trim();
            let exact = origin == "*"
                || reqwest::Url::parse(origin).is_ok_and(|url| {
                    matches!(url.scheme(), "http" | "https") && url.origin().ascii_serialization() == origin
                });
            if !exact {
                bail!("--cors-origin {origin}: not an origin; give scheme://host[:port] without a path, or *");
            }
            Ok(HeaderValue::from_str(origin)?)
        })
        .collect()
}

#[derive(Debug, PartialEq)]
struct Resolved {
    name: String,
    sources: Vec<Source>,
    input: Option<(u32, u32)>,
    /// None: the labels embedded in the model, else none.
    labels: Option<Source>,
}

/// `NAME=VALUE` when what precedes the `=` is a name (letters, digits,
/// `-`, `_`, `.`); a path such as `./a=b.tflite` is not named.
fn named(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once('=') {
        Some((name, value))
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            (Some(name), value)
        }
        _ => (None, arg),
    }
}

/// A model's name from its file: `mobilenet_v2.tflite` is `mobilenet_v2`.
fn name_of(value: &str) -> String {
    let path = value.split(['?', '#']).next().unwrap_or(value).trim_end_matches('/');
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".tar.gz", ".tgz", ".tflite"].iter().find_map(|ext| file.strip_suffix(ext)).unwrap_or(file);
    if stem.is_empty() { "model".into() } else { stem.into() }
}

/// A model as the options name it: its name, its sources (the first, then
/// fallbacks), its input size when known in advance, and its labels.
type Named = (String, Vec<Source>, Option<(u32, u32)>, Option<Source>);

/// The models with their labels, paired by name or by position.
fn models(model_args: &[String], label_args: &[String]) -> anyhow::Result<Vec<Resolved>> {
    let mut models: Vec<Named> = vec![];
    if model_args.is_empty() {
        let sources = vec![Source::parse(DEFAULT_MODEL_URL)?, Source::parse(FALLBACK_MODEL_URL)?];
        let labels = Source::parse(DEFAULT_LABELS_URL)?;
        models.push((DEFAULT_MODEL_NAME.into(), sources, Some(DEFAULT_MODEL_INPUT), Some(labels)));
    }
    for arg in model_args {
        let (name, value) = named(arg);
        let name = name.map_or_else(|| name_of(value), str::to_string);
        if models.iter().any(|m| m.0 == name) {
            bail!("--model {arg}: a model named {name:?} is given twice (name them: --model NAME=URL|PATH)");
        }
        let source = Source::parse(value).with_context(|| format!("--model {arg}"))?;
        models.push((name, vec![source], None, None));
    }
    for (position, arg) in label_args.iter().enumerate() {
        let (name, value) = named(arg);
        let source = Source::parse(value).with_context(|| format!("--labels {arg}"))?;
        let model = match name {
            Some(name) => models.iter_mut().find(|m| m.0 == name),
            None => models.get_mut(position),
        };
        let Some(model) = model else {
            match name {
                Some(name) => bail!("--labels {arg}: no model is named {name:?}"),
                None => bail!("--labels {arg}: more label maps than models"),
            }
        };
        model.3 = Some(source);
    }
    models.into_iter().map(|(name, sources, input, labels)| Ok(Resolved { name, sources, input, labels })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_default_model_is_birds_with_its_labels() {
        let models = models(&[], &[]).unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].name, "birds");
        assert_eq!(models[0].sources.len(), 2);
        assert_eq!(models[0].labels.as_ref().unwrap().to_string(), DEFAULT_LABELS_URL);
        // Its labels can be replaced by position or by name.
        let by_name = models_of(&[], &["birds=l.csv"]);
        assert_eq!(by_name[0].labels, Some(Source::parse("l.csv").unwrap()));
    }

    fn models_of(m: &[&str], l: &[&str]) -> Vec<Resolved> {
        models(&strings(m), &strings(l)).unwrap()
    }

    #[test]
    fn models_are_named_and_paired_with_their_labels() {
        let models = models_of(
            &["https://h/m/mobilenet_v2.tflite?x=1", "flowers=f/model.tar.gz", "./a=b.tflite"],
            &["https://h/imagenet.txt", "flowers=f/labels.txt", "./a.csv"],
        );
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["mobilenet_v2", "flowers", "a=b"]);
        assert_eq!(models[1].labels, Some(Source::parse("f/labels.txt").unwrap()));
        assert_eq!(models[2].labels, Some(Source::parse("./a.csv").unwrap()));
        assert_eq!(models[1].sources, [Source::parse("f/model.tar.gz").unwrap()]);
    }

    #[test]
    fn the_api_key_comes_from_one_place_and_is_not_blank() {
        let dir = std::env::temp_dir().join(format!("classifier-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, blank) = (dir.join("key"), dir.join("blank"));
        std::fs::write(&key, "s3cret\n").unwrap();
        std::fs::write(&blank, " \n").unwrap();
        assert!(api_key(None, None).unwrap().is_none());
        assert!(api_key(Some(&key), None).unwrap().is_some());
        assert!(api_key(None, Some("k".into())).unwrap().is_some());
        let err = |file: Option<&std::path::Path>, env: Option<&str>| {
            format!("{:#}", api_key(file, env.map(str::to_string)).unwrap_err())
        };
        assert!(err(Some(&blank), None).contains("the API key is empty"));
        assert!(err(None, Some("")).starts_with("CLASSIFIER_API_KEY: the API key is empty"));
        assert!(err(Some(&key), Some("k")).contains("both set"));
        assert!(err(Some(&dir.join("absent")), None).contains("cannot read the key"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cors_origins_are_exact_origins_or_any() {
        let ok = cors_origins(&strings(&["https://photos.example.org", "http://127.0.0.1:8080", "*"])).unwrap();
        assert_eq!(ok.len(), 3);
        for bad in ["https://photos.example.org/", "https://h/page", "photos.example.org", "ftp://h", ""] {
            let err = cors_origins(&strings(&[bad])).unwrap_err().to_string();
            assert!(err.contains("not an origin"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_pairings_are_refused_with_the_argument() {
        let err = |m: &[&str], l: &[&str]| format!("{:#}", models(&strings(m), &strings(l)).unwrap_err());
        // A model without labels is not refused: its embedded labels, else class indices.
        assert!(models(&strings(&["a=x.tflite"]), &[]).unwrap()[0].labels.is_none());
        assert!(err(&["a=x.tflite"], &["b=l.csv"]).contains("no model is named \"b\""));
        assert!(err(&["x.tflite"], &["l.csv", "m.csv"]).contains("more label maps than models"));
        assert!(err(&["m/x.tflite", "n/x.tflite"], &[]).contains("given twice"));
        assert!(err(&["a=ftp://h/x"], &[]).starts_with("--model a=ftp://h/x"));
    }
}
