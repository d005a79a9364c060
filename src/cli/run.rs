//! The command line's batch run: every source through the engine, the
//! records printed in the order the sources were given.
//!
//! The sources are expanded (folders walked) on a thread of their own as the
//! run takes them. The engine starts loading the model and the labels, and
//! every image is handed to it at once (at most `--concurrency` in flight),
//! so downloads and decodes begin while the model is still on its way.
//! Nothing is printed until the model and labels are loaded: should they
//! fail, stdout stays empty. Then each record is printed as soon as it and
//! all before it are done.
//!
//! At most [`REORDER_WINDOW`] records are begun ahead of the first one not
//! yet printed, so what a run holds does not grow with its list: a slow
//! image holds up those after it once the window is full, never memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{ErrorKind, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use super::settings::{Settings, Sources};
use crate::deadline::Deadline;
use crate::engine::{Engine, Input, Request, SourceError, WhenFull};
use crate::input::{Expanded, Fetcher, Source};
use crate::render::{self, Outcome};

/// Most records begun and not yet printed. A record waiting its turn is a
/// few hundred bytes (its images are bounded by `--concurrency` and the
/// inference queue); the window is wide enough that a slow download rarely
/// stalls the others.
pub const REORDER_WINDOW: usize = 4096;

/// How a run ended, when it could run at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub classified: usize,
    pub failed: usize,
    /// Whoever read stdout closed it: the run stopped there, quietly.
    pub stdout_closed: bool,
}

/// Runs the classifier as `settings` say, writing records to `out`. An
/// error means the run could not start (no model or labels).
pub async fn run(settings: &Settings, out: &mut (dyn Write + Send)) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut records = expand(settings.sources.clone())?;
    let Some(first) = records.recv().await else {
        info!("this shard has no sources");
        return Ok(Summary::default());
    };
    let fetcher = Fetcher::new(settings.fetch.clone())?;
    let engine = Engine::start(settings.engine.clone(), fetcher);

    let window = Arc::new(Semaphore::new(REORDER_WINDOW));
    let begun = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let request = Request { top_k: settings.top_k, deadline: Deadline::NEVER, when_full: WhenFull::Wait };
    let producer = Producer {
        engine: engine.clone(),
        repeated: repeated(&settings.sources.inputs),
        window: window.clone(),
        concurrency: settings.concurrency,
        request,
        done: done_tx,
        begun: begun.clone(),
    };
    let producer = AbortOnDrop(tokio::spawn(producer.run(first, records)));

    engine.ready().await?;
    let progress = super::progress::bar(begun.load(Ordering::Relaxed), 10, !settings.progress);
    let mut printer = Printer::new(out, &progress, settings.format, &window);
    let mut printed = Ok(());
    while printed.is_ok()
        && let Some(done) = done_rx.recv().await
    {
        printer.add(done);
        progress.set_length(begun.load(Ordering::Relaxed) as u64);
        printed = printer.flush();
    }
    drop(producer);
    progress.finish_and_clear();
    // As ripgrep does: `classifier ... | head -1` is not an error.
    if printed.closed()? {
        tracing::debug!("stdout was closed; stopping");
        return Ok(Summary { classified: 0, failed: 0, stdout_closed: true });
    }
    // Every record begun has been printed by now; should one not have been,
    // it must not pass for a success.
    let missing = begun.load(Ordering::Relaxed).saturating_sub(printer.next);
    if missing > 0 {
        tracing::error!("internal error: {missing} sources have no result");
    }
    let failed = printer.failed + missing;
    let summary = Summary { classified: printer.next - printer.failed, failed, stdout_closed: false };
    report(&summary, &engine, started.elapsed());
    Ok(summary)
}

/// Expands the sources on a thread of its own (a walk waits on the file
/// system), as fast as the run takes them, narrowed to the shard.
fn expand(sources: Sources) -> anyhow::Result<mpsc::Receiver<Expanded>> {
    let (tx, rx) = mpsc::channel(256);
    let walk = move || {
        let (mut total, mut mine) = (0, 0);
        for (position, expanded) in crate::input::expand(sources.inputs, sources.expand).enumerate() {
            total += 1;
            if sources.shard.is_some_and(|shard| !shard.contains(position)) {
                continue;
            }
            mine += 1;
            // The run has stopped.
            if tx.blocking_send(expanded).is_err() {
                return;
            }
        }
        if let Some(shard) = sources.shard {
            info!("shard {}/{}: {mine} of {total} sources", shard.index, shard.count);
        }
    };
    std::thread::Builder::new().name("sources".into()).spawn(walk).map_err(|e| anyhow::anyhow!("cannot start: {e}"))?;
    Ok(rx)
}

/// Aborts its task when dropped, so that no early return leaves work running.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

trait BrokenPipe {
    fn closed(self) -> anyhow::Result<bool>;
}

impl BrokenPipe for std::io::Result<()> {
    /// Whether the reader closed the pipe, which is no error at the end of
    /// a run any more than earlier.
    fn closed(self) -> anyhow::Result<bool> {
        match self {
            Ok(()) => Ok(false),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(true),
            Err(e) => Err(anyhow::Error::new(e).context("cannot write the results")),
        }
    }
}

/// The sources given more than once as arguments or lines of the list: each
/// is classified once and its record repeated. Files found in folders or by
/// patterns are not compared, so that what is kept is bounded by the list
/// given, not by what it expands to.
fn repeated(inputs: &[String]) -> HashSet<Source> {
    let mut seen = HashSet::new();
    inputs.iter().filter_map(|input| Source::parse(input).ok()).filter(|source| !seen.insert(source.clone())).collect()
}

/// What the printer is told of one record.
enum Done {
    /// Record `n` and its outcome; `keep` if later records repeat it.
    Record { n: usize, source: String, outcome: Outcome, keep: bool },
    /// Record `n` is record `of` again, as `source`.
    Repeat { n: usize, source: String, of: usize },
}

/// Hands every record's source to the engine, each its own task: at most
/// `concurrency` downloading at once, and at most as many again downloaded
/// and waiting to be decoded and queued for inference. A download keeps
/// streaming (and its time limit stays honest) while others wait for room
/// in the queue; images waiting for a decoder do not hold the connections'
/// slots, so the downloads go on while both CPUs decode.
struct Producer {
    engine: Engine,
    repeated: HashSet<Source>,
    window: Arc<Semaphore>,
    concurrency: usize,
    request: Request,
    done: mpsc::UnboundedSender<Done>,
    /// Records begun so far.
    begun: Arc<AtomicUsize>,
}

impl Producer {
    async fn run(self, first: Expanded, mut records: mpsc::Receiver<Expanded>) {
        let downloads = Arc::new(Semaphore::new(self.concurrency));
        let unqueued = Arc::new(Semaphore::new(2 * self.concurrency));
        let mut first_of: HashMap<Source, usize> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut next = Some(first);
        for n in 0.. {
            let Some(expanded) = (match next.take() {
                Some(expanded) => Some(expanded),
                None => records.recv().await,
            }) else {
                break;
            };
            let Ok(slot) = self.window.acquire().await else { break };
            slot.forget();
            self.begun.store(n + 1, Ordering::Relaxed);
            let given = matches!(expanded, Expanded::Given(_));
            let (name, parsed) = match expanded {
                Expanded::Given(name) | Expanded::Found(name) => {
                    let parsed = Source::parse(&name).map_err(|e| e.reason);
                    (name, parsed)
                }
                Expanded::Failed { source, reason } => (source, Err(reason)),
            };
            let source = match parsed {
                Ok(source) => source,
                Err(reason) => {
                    warn!(source = %name, "{reason}");
                    let outcome = Err(SourceError::Invalid(reason));
                    let _ = self.done.send(Done::Record { n, source: name, outcome, keep: false });
                    continue;
                }
            };
            let keep = given && self.repeated.contains(&source);
            if keep {
                if let Some(&of) = first_of.get(&source) {
                    let _ = self.done.send(Done::Repeat { n, source: name, of });
                    continue;
                }
                first_of.insert(source.clone(), n);
            }
            let Ok(unqueued) = unqueued.clone().acquire_owned().await else { break };
            let Ok(download) = downloads.clone().acquire_owned().await else { break };
            let (engine, request) = (self.engine.clone(), self.request);
            let reply = Reply { n, source: name, keep, done: Some(self.done.clone()) };
            tasks.spawn(async move {
                let fetched = engine.fetch(&source, request).await;
                drop(download);
                let queued = match fetched {
                    Ok(bytes) => engine.submit(Input::Bytes { name: source.to_string(), bytes }, request).await,
                    Err(e) => Err(e),
                };
                // Free again once the image waits for inference.
                drop(unqueued);
                let outcome = match queued {
                    Ok(queued) => queued.predictions().await,
                    Err(e) => Err(e),
                };
                reply.send(outcome);
            });
            // Reap finished tasks as we go so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined
                && e.is_panic()
            {
                tracing::error!("internal error: a task panicked: {e}");
            }
        }
    }
}

/// Where a record's outcome goes. A task that ends without sending one (a
/// panic: a bug) sends an internal error instead, so that no record goes
/// missing and none passes for a success.
struct Reply {
    n: usize,
    source: String,
    keep: bool,
    done: Option<mpsc::UnboundedSender<Done>>,
}

impl Reply {
    fn send(mut self, outcome: Outcome) {
        if let Err(e) = &outcome {
            warn!(source = %self.source, "{e}");
        }
        self.deliver(outcome);
    }

    fn deliver(&mut self, outcome: Outcome) {
        if let Some(done) = self.done.take() {
            let source = std::mem::take(&mut self.source);
            let _ = done.send(Done::Record { n: self.n, source, outcome, keep: self.keep });
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.deliver(Err(SourceError::Internal("internal error: no result".into())));
    }
}

/// Prints records in the order the sources were given, as they complete.
struct Printer<'a> {
    /// Records done, waiting for those before them.
    waiting: BTreeMap<usize, Done>,
    /// The outcomes of records that later ones repeat.
    kept: HashMap<usize, Outcome>,
    /// The next record to print.
    next: usize,
    failed: usize,
    out: &'a mut (dyn Write + Send),
    progress: &'a indicatif::ProgressBar,
    format: render::Format,
    window: &'a Semaphore,
}

impl<'a> Printer<'a> {
    fn new(
        out: &'a mut (dyn Write + Send),
        progress: &'a indicatif::ProgressBar,
        format: render::Format,
        window: &'a Semaphore,
    ) -> Self {
        Printer { waiting: BTreeMap::new(), kept: HashMap::new(), next: 0, failed: 0, out, progress, format, window }
    }

    fn add(&mut self, done: Done) {
        let (Done::Record { n, .. } | Done::Repeat { n, .. }) = done;
        self.waiting.insert(n, done);
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let start = self.next;
        while let Some(done) = self.waiting.remove(&self.next) {
            match done {
                Done::Record { source, outcome, keep, .. } => {
                    self.print(&source, &outcome)?;
                    if keep {
                        self.kept.insert(self.next, outcome);
                    }
                }
                Done::Repeat { source, of, .. } => {
                    let missing = Err(SourceError::Internal("internal error: no result".into()));
                    let outcome = self.kept.remove(&of).unwrap_or(missing);
                    self.print(&source, &outcome)?;
                    self.kept.insert(of, outcome);
                }
            }
            self.next += 1;
            self.window.add_permits(1);
        }
        if self.next > start {
            self.out.flush()?;
            self.progress.set_position(self.next as u64);
        }
        Ok(())
    }

    fn print(&mut self, source: &str, outcome: &Outcome) -> std::io::Result<()> {
        let record = render::render(self.format, source, outcome);
        self.progress.suspend(|| self.out.write_all(record.as_bytes()))?;
        self.failed += outcome.is_err() as usize;
        Ok(())
    }
}

fn report(summary: &Summary, engine: &Engine, wall: Duration) {
    let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    let stats = engine.metrics().snapshot();
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
        image_downloads = %secs(stats.download_time),
        image_bytes = stats.downloaded_bytes,
        decode_resize = %secs(stats.decode_time),
        queue_wait = %secs(stats.queue_wait),
        inference = %secs(stats.inference_time),
        batches = stats.batches,
        "stage times (image stages summed over images, which overlap)"
    );
}
