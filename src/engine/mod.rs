//! The engine under every front end: the prepared model with its labels, an
//! inference pool of its own, and the way an image goes through them.
//!
//! An [`Engine`] starts loading its model and labels when it is made, and
//! takes images at once: they are fetched, decoded and (once the model's
//! input size is known) resized while the model is still on its way, then
//! wait in the pool's bounded queue. [`Engine::ready`] says when the model is
//! loaded, or why it could not be. Every image carries a [`Deadline`];
//! everything the engine does is counted in its [`Metrics`].

mod error;
mod metrics;
mod pool;
mod prepare;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{Instrument, debug_span, info, info_span};

pub use error::{ErrorKind, LoadError, SourceError};
pub use metrics::{Metrics, Snapshot};
pub use pool::WhenFull;

use crate::deadline::Deadline;
use crate::image::Decoding;
use crate::input::{FetchError, Fetcher, Source};
use crate::labels::Labels;
use crate::model::{Arithmetic, Channels, Format, InputSpec, MeanStd, Model};
use crate::rank::{self, Prediction, Scores};

/// The most a model or a label map may weigh.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;
pub const MAX_LABELS_BYTES: u64 = 64 << 20;
/// Connections a model is fetched over, in byte ranges (see BENCHMARKS.md).
const MODEL_CONNECTIONS: usize = 4;

/// What an engine runs, resolved by the front end.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The model, then sources to fall back to, in turn, should it fail.
    pub model: Vec<Source>,
    /// The model's input size (width, height) when it is known in advance,
    /// so that images can be resized while the model downloads. Checked
    /// once the model has loaded.
    pub model_input: Option<(u32, u32)>,
    /// The label map; without one, the label file embedded in the model,
    /// else none (predictions are named by class index).
    pub labels: Option<Source>,
    /// How pixels become the model's input, if not as the model says.
    pub normalization: Option<MeanStd>,
    /// What the scores of the predictions are.
    pub scores: Scores,
    /// Inference workers, also the threads that prepare the model, and the
    /// most decodes at once.
    pub threads: usize,
    /// Most images a worker takes from the queue at once.
    pub batch_size: usize,
    /// Most images waiting in the queue for a worker.
    pub queue: usize,
    /// Largest image accepted, in bytes.
    pub max_image_bytes: u64,
    /// Whether images are turned as their EXIF orientation tag says.
    pub exif_orientation: bool,
    /// How JPEGs are decoded.
    pub decoding: Decoding,
    /// How a quantized model computes.
    pub arithmetic: Arithmetic,
    /// The order of the colour channels the model reads.
    pub channels: Channels,
}

/// An image to classify.
#[derive(Debug, Clone)]
pub enum Input {
    /// Fetched by the engine's fetcher, under its source policy.
    Source(Source),
    /// Bytes the caller has (an upload), with a name for the logs.
    Bytes { name: String, bytes: Bytes },
}

/// How one image is to be classified.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub top_k: usize,
    pub deadline: Deadline,
    pub when_full: WhenFull,
}

/// The model as loaded, with its labels.
#[derive(Debug)]
pub struct Loaded {
    /// Where the model came from (the first of the settings' sources that
    /// answered).
    pub model_source: Source,
    pub format: Format,
    pub input: InputSpec,
    pub classes: usize,
    /// The class names, if there are any (given, or embedded in the model).
    pub labels: Option<Labels>,
    /// Whether the model's outputs are put through a softmax before ranking.
    pub softmax: bool,
}

#[derive(Debug, Clone)]
enum State {
    Loading { input: Option<(u32, u32)> },
    Ready(Arc<Loaded>),
    Failed(LoadError),
}

/// A classifier that outlives any one request: cheap to clone, shared by
/// every caller. Must be made inside a tokio runtime.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    fetcher: Fetcher,
    max_image_bytes: u64,
    exif_orientation: bool,
    decoding: Decoding,
    state: watch::Receiver<State>,
    queue: pool::Queue,
    limits: prepare::Limits,
    metrics: Arc<Metrics>,
    loader: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.loader.abort();
    }
}

impl Engine {
    /// Starts loading the model and the labels, and returns at once.
    pub fn start(settings: EngineSettings, fetcher: Fetcher) -> Engine {
        let threads = settings.threads.max(1);
        let (queue, jobs) = pool::Queue::new(settings.queue);
        let (state_tx, state) = watch::channel(State::Loading { input: settings.model_input });
        let metrics = Arc::new(Metrics::default());
        let (max_image_bytes, exif_orientation) = (settings.max_image_bytes, settings.exif_orientation);
        let decoding = settings.decoding;
        let loader = {
            let (fetcher, metrics, room) = (fetcher.clone(), metrics.clone(), queue.closer());
            tokio::spawn(async move {
                let state = match load(&settings, &fetcher, &metrics).await {
                    Ok((model, loaded)) => {
                        match pool::start(model, jobs, threads, settings.batch_size, metrics.clone()) {
                            Ok(()) => State::Ready(Arc::new(loaded)),
                            Err(e) => State::Failed(LoadError::Internal(format!("cannot start the workers: {e}"))),
                        }
                    }
                    Err(e) => State::Failed(e),
                };
                if matches!(state, State::Failed(_)) {
                    // Nothing queued will run: callers waiting for room fail.
                    room.close();
                }
                state_tx.send_replace(state);
            })
            .abort_handle()
        };
        let inner = Inner {
            max_image_bytes,
            exif_orientation,
            decoding,
            fetcher,
            state,
            queue,
            limits: prepare::Limits::new(threads),
            metrics,
            loader,
        };
        Engine { inner: Arc::new(inner) }
    }

    /// The model and labels once loaded, or why they could not be.
    pub async fn ready(&self) -> Result<Arc<Loaded>, LoadError> {
        let mut state = self.inner.state.clone();
        let state = state.wait_for(|s| !matches!(s, State::Loading { .. })).await;
        match state.as_deref() {
            Ok(State::Ready(loaded)) => Ok(loaded.clone()),
            Ok(State::Failed(e)) => Err(e.clone()),
            Ok(State::Loading { .. }) | Err(_) => Err(LoadError::Internal("the loading task ended".into())),
        }
    }

    /// The model and labels if they are loaded.
    pub fn loaded(&self) -> Option<Arc<Loaded>> {
        match &*self.inner.state.borrow() {
            State::Ready(loaded) => Some(loaded.clone()),
            _ => None,
        }
    }

    /// Images waiting in the inference queue for a worker now.
    pub fn queue_depth(&self) -> usize {
        self.inner.queue.waiting()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Fetches, decodes, resizes and classifies one image: its top
    /// `request.top_k` predictions, best first.
    pub async fn classify(&self, input: Input, request: Request) -> Result<Vec<Prediction>, SourceError> {
        self.submit(input, request).await?.predictions().await
    }

    /// Fetches, decodes and resizes one image and puts it in the inference
    /// queue: the first half of [`Engine::classify`], for a caller that
    /// holds a slot of its own until then (the command line's
    /// `--concurrency`, which bounds the images being downloaded).
    pub async fn submit(&self, input: Input, request: Request) -> Result<Queued, SourceError> {
        let queued = self.queue(input, request).await;
        if let Err(e) = &queued {
            self.inner.metrics.failed(e.kind());
        }
        queued
    }

    /// Downloads (or reads) `source` as [`Engine::submit`] would, for a
    /// caller that bounds downloads apart from decodes: the front ends free
    /// a download's slot once its body is in, so that images waiting for a
    /// decoder do not stop the next downloads (with both CPUs busy decoding,
    /// they held most of the slots and the connections idled). Hand the
    /// bytes to `submit` as [`Input::Bytes`] with the same `request`.
    pub async fn fetch(&self, source: &Source, request: Request) -> Result<Bytes, SourceError> {
        let fetched = match self.refused(request) {
            Err(e) => Err(e),
            Ok(()) => self.download(source, request.deadline).await,
        };
        if let Err(e) = &fetched {
            self.failed(e);
        }
        fetched
    }

    /// Counts a failure a front end met before handing the image over (its
    /// deadline passed while it waited for a slot of the front end's).
    pub fn failed(&self, error: &SourceError) {
        self.inner.metrics.failed(error.kind());
    }

    /// What would fail anyway, before any download or decode.
    fn refused(&self, request: Request) -> Result<(), SourceError> {
        let inner = &*self.inner;
        if request.deadline.expired() {
            return Err(SourceError::Deadline);
        }
        if matches!(&*inner.state.borrow(), State::Failed(_)) {
            return Err(SourceError::Unavailable);
        }
        if request.when_full == WhenFull::Refuse && inner.queue.is_full() {
            return Err(SourceError::Overloaded);
        }
        Ok(())
    }

    async fn download(&self, source: &Source, deadline: Deadline) -> Result<Bytes, SourceError> {
        let inner = &*self.inner;
        let started = Instant::now();
        let fetched = inner
            .fetcher
            .fetch(source, inner.max_image_bytes, deadline)
            .instrument(debug_span!("download", %source))
            .await;
        let bytes = match fetched {
            Ok(bytes) => bytes,
            // The caller's deadline came before the time limit.
            Err(FetchError::Timeout(_)) if deadline.expired() => return Err(SourceError::Deadline),
            Err(e) => return Err(e.into()),
        };
        inner.metrics.downloaded(bytes.len(), started.elapsed());
        Ok(bytes)
    }

    async fn queue(&self, input: Input, request: Request) -> Result<Queued, SourceError> {
        let inner = &*self.inner;
        let deadline = request.deadline;
        self.refused(request)?;
        let (name, bytes) = match input {
            Input::Source(source) => {
                let bytes = self.download(&source, deadline).await?;
                (source.to_string(), bytes)
            }
            Input::Bytes { name, bytes } => (name, bytes),
        };
        let pixels = prepare::prepare(bytes, inner, deadline, &name).await?;
        let answer = inner.queue.submit(pixels, deadline, request.when_full).await?;
        Ok(Queued { engine: self.clone(), answer, request })
    }
}

/// An image waiting in the inference queue.
pub struct Queued {
    engine: Engine,
    answer: tokio::sync::oneshot::Receiver<Result<Vec<f32>, SourceError>>,
    request: Request,
}

impl Queued {
    /// Its top predictions, best first, once a worker has run it. Dropping
    /// this instead leaves the job to be dropped unrun.
    pub async fn predictions(self) -> Result<Vec<Prediction>, SourceError> {
        let Queued { engine, answer, request } = self;
        let predictions = rank_answer(&engine, answer, request).await;
        if let Err(e) = &predictions {
            engine.inner.metrics.failed(e.kind());
        }
        predictions
    }
}

async fn rank_answer(
    engine: &Engine,
    answer: tokio::sync::oneshot::Receiver<Result<Vec<f32>, SourceError>>,
    request: Request,
) -> Result<Vec<Prediction>, SourceError> {
    let mut scores = prepare::within(request.deadline, answer).await?.map_err(|_| SourceError::Unavailable)??;
    let loaded = engine.loaded().ok_or(SourceError::Unavailable)?;
    if loaded.softmax {
        rank::softmax(&mut scores);
    }
    Ok(rank::top_k(&scores, request.top_k)
        .into_iter()
        .map(|index| Prediction {
            index,
            label: loaded.labels.as_ref().and_then(|labels| labels.get(index)).map(str::to_string),
            score: scores[index],
        })
        .collect())
}

/// Fetches and prepares the model, and fetches and reads the labels, at once.
async fn load(
    settings: &EngineSettings,
    fetcher: &Fetcher,
    metrics: &Metrics,
) -> Result<(Arc<Model>, Loaded), LoadError> {
    let model = async {
        let started = Instant::now();
        let (source, bytes) = fetcher
            .fetch_first(&settings.model, MAX_MODEL_BYTES, MODEL_CONNECTIONS)
            .instrument(info_span!("model_download"))
            .await
            .map_err(LoadError::FetchModel)?;
        let download = started.elapsed();
        let started = Instant::now();
        let (threads, given, arithmetic) = (settings.threads.max(1), settings.normalization, settings.arithmetic);
        let channels = settings.channels;
        let prepared = tokio::task::spawn_blocking(move || {
            info_span!("model_prepare", bytes = bytes.len())
                .in_scope(|| Model::load(&bytes, threads, given, arithmetic).map(|model| model.with_channels(channels)))
        })
        .await
        .map_err(|e| LoadError::Internal(format!("model preparation: {e}")))?;
        let model = prepared.map_err(|error| LoadError::Model { model: source.to_string(), error: Arc::new(error) })?;
        metrics.model_loaded(download, started.elapsed());
        let input = model.input();
        let actual = (input.width, input.height);
        if let Some(expected) = settings.model_input
            && expected != actual
        {
            return Err(LoadError::UnexpectedInput { model: source.to_string(), actual, expected });
        }
        Ok((source, model))
    };
    let labels = async {
        let Some(labels) = &settings.labels else { return Ok(None) };
        let name = labels.to_string();
        let bytes = fetcher
            .fetch_kept(labels, MAX_LABELS_BYTES, 1)
            .await
            .map_err(|error| LoadError::FetchLabels { labels: name.clone(), error: Arc::new(error) })?;
        let parsed =
            Labels::parse(&bytes).map_err(|error| LoadError::Labels { labels: name.clone(), error: Arc::new(error) });
        parsed.map(|labels| Some((name, labels)))
    }
    .instrument(info_span!("labels_download"));
    let ((source, model), given) = tokio::try_join!(model, labels)?;
    // Labels given win; else the model's own, else none.
    let labels = match (given, model.embedded_labels()) {
        (Some(given), _) => Some(given),
        (None, Some(file)) => {
            let name = format!("{} embedded in the model {source}", file.name);
            let parsed = Labels::parse(&file.bytes);
            let labels = parsed.map_err(|error| LoadError::Labels { labels: name.clone(), error: Arc::new(error) })?;
            info!(file = %file.name, "labels embedded in the model");
            Some((name, labels))
        }
        (None, None) => {
            info!("no labels: predictions are named by their class index");
            None
        }
    };
    if let Some((name, labels)) = &labels {
        labels.check_count(model.classes()).map_err(|error| LoadError::LabelsMismatch {
            labels: name.clone(),
            model: source.to_string(),
            error: Arc::new(error),
        })?;
    }
    let softmax = settings.scores.softmax(model.gives_probabilities());
    let input = model.input();
    info!(classes = model.classes(), width = input.width, height = input.height, softmax, "model ready");
    let loaded = Loaded {
        model_source: source,
        format: model.format(),
        input,
        classes: model.classes(),
        labels: labels.map(|(_, labels)| labels),
        softmax,
    };
    Ok((Arc::new(model), loaded))
}
