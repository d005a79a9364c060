//! Ties the stages together: sources → fetch → decode/preprocess → batch →
//! infer → rank → render.
//!
//! The model, the labels and every image are fetched at once (images bounded
//! by `--concurrency`). Each image is decoded and resized on the blocking
//! pool as soon as its bytes arrive, while the model may still be
//! downloading. Once the model is ready, prepared images are grouped into
//! batches and classified on `--threads` workers sharing one optimized plan.
//! Records are printed in the order the sources were given, each as soon as
//! it and all before it are done. Every queue is bounded, so memory does not
//! grow with the number of sources.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{Instrument, debug_span, info, info_span, warn};

use crate::cli::{self, Args};
use crate::image as preprocess;
use crate::input::Source;
use crate::input::fetch::{self, FetchError};
use crate::labels::Labels;
use crate::model::Model;
use crate::rank::{self, Prediction};
use crate::render::{self, Outcome};

/// The most a model or a label map may weigh.
const MAX_MODEL_BYTES: u64 = 1 << 30;
const MAX_LABELS_BYTES: u64 = 64 << 20;
/// Connections a model is fetched over, in byte ranges (see BENCHMARKS.md).
const MODEL_CONNECTIONS: usize = 4;

/// How a run ended, when it could run at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub classified: usize,
    pub failed: usize,
}

/// Per-stage time, summed over every item of the stage.
#[derive(Debug, Default)]
struct Stats {
    downloads: Duration,
    downloaded_bytes: u64,
    decode: Duration,
    inference: Duration,
    batches: usize,
    model_download: Duration,
    model_prepare: Duration,
}

/// Runs the classifier as `args` says, writing records to `out`. An error
/// means the run could not start (bad options, or no model or labels).
pub async fn run(args: &Args, out: &mut (dyn Write + Send)) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let timeout = args.timeout();
    let threads = args.threads();
    let (model_sources, input_hint) = match &args.model {
        None => (
            vec![Source::parse(cli::DEFAULT_MODEL_URL)?, Source::parse(cli::FALLBACK_MODEL_URL)?],
            Some(cli::DEFAULT_MODEL_INPUT),
        ),
        Some(model) => (vec![Source::parse(model).context("--model")?], None),
    };
    let labels_source = Source::parse(&args.labels).context("--labels")?;
    let inputs = source_list(args)?;
    if inputs.is_empty() {
        info!("this shard has no sources");
        return Ok(Summary { classified: 0, failed: 0 });
    }
    let client = fetch::client(timeout).context("cannot set up the HTTP client")?;
    let cache = args.cache();
    let stats = Arc::new(Mutex::new(Stats::default()));

    // Each source as given, and the distinct sources to fetch: a URL given
    // twice is fetched once and reported twice.
    let mut unique: Vec<Source> = vec![];
    let mut index: HashMap<Source, usize> = HashMap::new();
    let mut outcomes: Vec<Option<Outcome>> = vec![];
    let occurrences: Vec<usize> = inputs
        .iter()
        .map(|input| match Source::parse(input) {
            Ok(source) => *index.entry(source.clone()).or_insert_with(|| {
                unique.push(source);
                outcomes.push(None);
                outcomes.len() - 1
            }),
            Err(e) => {
                outcomes.push(Some(Err(e.reason)));
                outcomes.len() - 1
            }
        })
        .collect();

    // The model's input size: known up front for the default model, else
    // once the model has loaded. Images wait for it only to be resized.
    let (size_tx, size_rx) = watch::channel(input_hint);

    let model_task = {
        let (client, stats, cache) = (client.clone(), stats.clone(), cache.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let bytes = fetch::fetch_first(
                &client,
                timeout,
                &model_sources,
                MAX_MODEL_BYTES,
                MODEL_CONNECTIONS,
                cache.as_ref(),
            )
            .instrument(info_span!("model_download"))
            .await?;
            stats.lock().unwrap().model_download = t.elapsed();
            let t = Instant::now();
            let model = tokio::task::spawn_blocking(move || {
                info_span!("model_prepare", bytes = bytes.len()).in_scope(|| Model::from_bytes(&bytes, threads))
            })
            .await??;
            stats.lock().unwrap().model_prepare = t.elapsed();
            let input = model.input();
            let size = (input.width, input.height);
            if let Some(hint) = input_hint
                && hint != size
            {
                bail!("the default model takes {size:?} images, not {hint:?} as expected");
            }
            size_tx.send_replace(Some(size));
            info!(classes = model.classes(), width = size.0, height = size.1, "model ready");
            anyhow::Ok(Arc::new(model))
        })
    };
    let labels_task = {
        let client = client.clone();
        tokio::spawn(
            async move {
                let bytes = fetch::fetch_kept(&client, timeout, &labels_source, MAX_LABELS_BYTES, 1, cache.as_ref())
                    .await
                    .with_context(|| format!("cannot fetch the labels {labels_source}"))?;
                Labels::parse(&bytes).with_context(|| format!("cannot read the labels {labels_source}"))
            }
            .instrument(info_span!("labels_download")),
        )
    };

    // Prepared images, bounded: when inference falls behind, downloads wait.
    let batch_size = args.batch_size as usize;
    let queue = batch_size * threads;
    let (prepared_tx, mut prepared_rx) = mpsc::channel::<(usize, Result<Vec<u8>, String>)>(queue);
    let producer = {
        let (client, stats) = (client.clone(), stats.clone());
        let limits = Limits {
            bytes: args.max_image_bytes,
            decoders: Arc::new(Semaphore::new(threads)),
            early: Arc::new(Semaphore::new(2 * threads)),
        };
        // A permit is held from the start of a download until its result is
        // queued, so at most `--concurrency` images are in flight. Each image
        // is its own task: a download keeps streaming (and its timeout stays
        // honest) while others wait to be queued.
        let in_flight = Arc::new(Semaphore::new(args.concurrency as usize));
        let jobs: Vec<(usize, Source)> = unique.into_iter().map(|s| (index[&s], s)).collect();
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (slot, source) in jobs {
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let (client, stats, limits, size_rx, tx) =
                    (client.clone(), stats.clone(), limits.clone(), size_rx.clone(), prepared_tx.clone());
                tasks.spawn(async move {
                    let result = prepare(&client, timeout, &source, &limits, size_rx, &stats).await;
                    if let Err(e) = &result {
                        warn!(%source, "{e}");
                    }
                    let _ = tx.send((slot, result)).await;
                    drop(permit);
                });
                // Reap finished tasks as we go so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    let tasks = [model_task.abort_handle(), labels_task.abort_handle(), producer.abort_handle()];
    let abort = || tasks.iter().for_each(|task| task.abort());
    let (model, labels) = tokio::try_join!(flatten(model_task), flatten(labels_task)).inspect_err(|_| abort())?;
    if let Err(e) = labels.check_count(model.classes()) {
        abort();
        bail!("the labels do not fit the model: {e}");
    }
    let labels = Arc::new(labels);

    let progress = crate::cli::progress::bar(occurrences.len(), 10, args.quiet);
    let mut printer = Printer::new(&occurrences, outcomes.len(), out, &progress);
    printer.flush(&inputs, &mut outcomes, args.format)?;

    let mut pending: VecDeque<(usize, Vec<u8>)> = VecDeque::new();
    let mut running = FuturesUnordered::new();
    let mut input_open = true;
    let top_k = args.top_k as usize;
    loop {
        while pending.len() < queue
            && let Ok(item) = prepared_rx.try_recv()
        {
            accept(item, &mut pending, &mut outcomes);
        }
        while running.len() < threads && !pending.is_empty() {
            // Share what is waiting among the idle workers: a lone image
            // starts at once, a crowd is split rather than queued behind one.
            let idle = threads - running.len();
            let take = pending.len().div_ceil(idle).min(batch_size);
            let batch: Vec<(usize, Vec<u8>)> = pending.drain(..take).collect();
            let slots: Vec<usize> = batch.iter().map(|(slot, _)| *slot).collect();
            let (model, labels, stats) = (model.clone(), labels.clone(), stats.clone());
            let job = tokio::task::spawn_blocking(move || classify(&model, &labels, batch, top_k, &stats));
            running.push(async move { (slots, job.await) });
        }
        printer.flush(&inputs, &mut outcomes, args.format)?;
        if !input_open && pending.is_empty() && running.is_empty() {
            break;
        }
        tokio::select! {
            item = prepared_rx.recv(), if input_open && pending.len() < queue => match item {
                Some(item) => accept(item, &mut pending, &mut outcomes),
                None => input_open = false,
            },
            Some((slots, done)) = running.next(), if !running.is_empty() => {
                match done {
                    Ok(results) => {
                        for (slot, outcome) in results {
                            outcomes[slot] = Some(outcome);
                        }
                    }
                    // A panic is a bug, but it costs only its own batch.
                    Err(e) => {
                        for slot in slots {
                            outcomes[slot] = Some(Err(format!("internal error in inference: {e}")));
                        }
                    }
                }
            }
        }
    }
    // Every source not yet printed has an outcome by now; should one not, it
    // must not pass for a success.
    for (slot, outcome) in outcomes.iter_mut().enumerate() {
        if outcome.is_none() && printer.remaining[slot] > 0 {
            *outcome = Some(Err("internal error: no result".into()));
        }
    }
    printer.flush(&inputs, &mut outcomes, args.format)?;
    progress.finish_and_clear();

    let failed = printer.failed;
    let summary = Summary { classified: occurrences.len() - failed, failed };
    report(&summary, &stats.lock().unwrap(), started.elapsed());
    Ok(summary)
}

/// The sources to classify: the arguments, then `--sources-file`, narrowed
/// to `--shard`.
fn source_list(args: &Args) -> anyhow::Result<Vec<String>> {
    let mut inputs = args.sources.clone();
    if let Some(path) = &args.sources_file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("cannot read sources from stdin")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("cannot read --sources-file {}", path.display()))?
        };
        inputs.extend(cli::parse_source_list(&text));
    }
    if inputs.is_empty() {
        bail!("no sources to classify");
    }
    let Some(shard) = args.shard().map_err(anyhow::Error::msg)? else { return Ok(inputs) };
    let total = inputs.len();
    let mine: Vec<String> =
        inputs.into_iter().enumerate().filter(|(position, _)| shard.contains(*position)).map(|(_, s)| s).collect();
    info!("shard {}/{}: {} of {total} sources", shard.index, shard.count, mine.len());
    Ok(mine)
}

async fn flatten<T>(task: tokio::task::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    task.await.context("a setup task failed")?
}

fn accept(
    (slot, result): (usize, Result<Vec<u8>, String>),
    pending: &mut VecDeque<(usize, Vec<u8>)>,
    outcomes: &mut [Option<Outcome>],
) {
    match result {
        Ok(pixels) => pending.push_back((slot, pixels)),
        Err(e) => outcomes[slot] = Some(Err(e)),
    }
}

/// What bounds the preparation of images.
#[derive(Clone)]
struct Limits {
    /// The largest image accepted, in bytes.
    bytes: u64,
    /// Decodes at once: they are CPU-bound, and their full-size images are
    /// the largest buffers of the run.
    decoders: Arc<Semaphore>,
    /// Images decoded before the model's input size is known, waiting for it
    /// at full size. Past this many, images wait for the size undecoded.
    early: Arc<Semaphore>,
}

/// Fetches, decodes and resizes one image.
async fn prepare(
    client: &reqwest::Client,
    timeout: Duration,
    source: &Source,
    limits: &Limits,
    mut size: watch::Receiver<Option<(u32, u32)>>,
    stats: &Mutex<Stats>,
) -> Result<Vec<u8>, String> {
    let t = Instant::now();
    let bytes = fetch::fetch(client, timeout, source, limits.bytes)
        .instrument(debug_span!("download", %source))
        .await
        .map_err(|e: FetchError| e.to_string())?;
    {
        let mut stats = stats.lock().unwrap();
        stats.downloads += t.elapsed();
        stats.downloaded_bytes += bytes.len() as u64;
    }
    let span = debug_span!("decode", %source);
    let lost = |_| "the model could not be loaded".to_string();
    let known = *size.borrow();
    let early = if known.is_none() { limits.early.clone().try_acquire_owned().ok() } else { None };
    let (pixels, spent) = match early {
        // The model is not there yet: decode now, resize when it is.
        Some(_early) => {
            let decoder = limits.decoders.acquire().await.map_err(|e| e.to_string())?;
            let decode_span = span.clone();
            let (image, decoding) = blocking(move || decode_span.in_scope(|| preprocess::decode(&bytes))).await?;
            drop(decoder);
            let image = image.map_err(|e| e.to_string())?;
            let (width, height) = size.wait_for(Option::is_some).await.map_err(lost)?.expect("waited for Some");
            let (pixels, resizing) =
                blocking(move || span.in_scope(|| preprocess::resize(image, width, height))).await?;
            (pixels, decoding + resizing)
        }
        None => {
            let (width, height) = size.wait_for(Option::is_some).await.map_err(lost)?.expect("waited for Some");
            let _decoder = limits.decoders.acquire().await.map_err(|e| e.to_string())?;
            blocking(move || span.in_scope(|| preprocess::prepare(&bytes, width, height))).await?
        }
    };
    stats.lock().unwrap().decode += spent;
    pixels.map_err(|e| e.to_string())
}

/// Runs `f` on the blocking pool, and times it.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<(T, Duration), String> {
    let timed = move || {
        let t = Instant::now();
        (f(), t.elapsed())
    };
    tokio::task::spawn_blocking(timed).await.map_err(|e| format!("internal error in decoding: {e}"))
}

/// Classifies one batch and ranks each image's scores.
fn classify(
    model: &Model,
    labels: &Labels,
    batch: Vec<(usize, Vec<u8>)>,
    top_k: usize,
    stats: &Mutex<Stats>,
) -> Vec<(usize, Outcome)> {
    let _span = debug_span!("batch", size = batch.len()).entered();
    let t = Instant::now();
    let images: Vec<&[u8]> = batch.iter().map(|(_, pixels)| pixels.as_slice()).collect();
    let result = model.classify(&images);
    {
        let mut stats = stats.lock().unwrap();
        stats.inference += t.elapsed();
        stats.batches += 1;
    }
    match result {
        Ok(scores) => batch
            .iter()
            .zip(scores)
            .map(|((slot, _), scores)| {
                let predictions = rank::top_k(&scores, top_k)
                    .into_iter()
                    .map(|index| Prediction {
                        index,
                        label: labels.get(index).unwrap_or_default().to_string(),
                        score: scores[index],
                    })
                    .collect();
                (*slot, Ok(predictions))
            })
            .collect(),
        Err(e) => {
            let error = format!("inference failed: {e:#}");
            warn!("{error}");
            batch.iter().map(|(slot, _)| (*slot, Err(error.clone()))).collect()
        }
    }
}

/// Prints records in the order the sources were given, as they complete.
///
/// An outcome is dropped once its last occurrence is printed, so that what is
/// kept does not grow with the length of the list.
struct Printer<'a> {
    occurrences: &'a [usize],
    /// Occurrences of each slot not yet printed.
    remaining: Vec<u32>,
    next: usize,
    failed: usize,
    out: &'a mut (dyn Write + Send),
    progress: &'a indicatif::ProgressBar,
}

impl<'a> Printer<'a> {
    fn new(
        occurrences: &'a [usize],
        slots: usize,
        out: &'a mut (dyn Write + Send),
        progress: &'a indicatif::ProgressBar,
    ) -> Self {
        let mut remaining = vec![0; slots];
        for &slot in occurrences {
            remaining[slot] += 1;
        }
        Printer { occurrences, remaining, next: 0, failed: 0, out, progress }
    }

    fn flush(
        &mut self,
        inputs: &[String],
        outcomes: &mut [Option<Outcome>],
        format: render::Format,
    ) -> std::io::Result<()> {
        let start = self.next;
        while let Some(&slot) = self.occurrences.get(self.next) {
            let Some(outcome) = &outcomes[slot] else { break };
            let record = render::render(format, &inputs[self.next], outcome);
            self.progress.suspend(|| self.out.write_all(record.as_bytes()))?;
            self.failed += outcome.is_err() as usize;
            self.remaining[slot] -= 1;
            if self.remaining[slot] == 0 {
                outcomes[slot] = None;
            }
            self.next += 1;
        }
        if self.next > start {
            self.out.flush()?;
            self.progress.set_position(self.next as u64);
        }
        Ok(())
    }
}

fn report(summary: &Summary, stats: &Stats, wall: Duration) {
    let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    info!(
        classified = summary.classified,
        failed = summary.failed,
        wall = %secs(wall),
        "done: {} of {} sources classified in {}",
        summary.classified,
        summary.classified + summary.failed,
        secs(wall)
    );
    info!(
        model_download = %secs(stats.model_download),
        model_prepare = %secs(stats.model_prepare),
        image_downloads = %secs(stats.downloads),
        image_bytes = stats.downloaded_bytes,
        decode_resize = %secs(stats.decode),
        inference = %secs(stats.inference),
        batches = stats.batches,
        "stage times (image stages summed over images, which overlap)"
    );
}
