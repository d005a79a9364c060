//! The command line's batch run: every source through the engine, the
//! records printed in the order the sources were given.
//!
//! The engine starts loading the model and the labels, and every image is
//! handed to it at once (at most `--concurrency` in flight), so downloads
//! and decodes begin while the model is still on its way. Nothing is printed
//! until the model and labels are loaded: should they fail, stdout stays
//! empty. Then each record is printed as soon as it and all before it are
//! done.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use super::settings::Settings;
use crate::deadline::Deadline;
use crate::engine::{Engine, Input, Request, SourceError, WhenFull};
use crate::input::{Expanded, Fetcher, Source};
use crate::render::{self, Outcome};

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
    let inputs = &settings.sources;
    if inputs.is_empty() {
        info!("this shard has no sources");
        return Ok(Summary::default());
    }
    let fetcher = Fetcher::new(settings.fetch.clone())?;
    let list = SourceList::new(inputs);
    let engine = Engine::start(settings.engine.clone(), fetcher);

    let (done_tx, mut done_rx) = mpsc::channel::<(usize, Outcome)>(settings.concurrency);
    let request = Request { top_k: settings.top_k, deadline: Deadline::NEVER, when_full: WhenFull::Wait };
    let producer =
        AbortOnDrop(tokio::spawn(produce(engine.clone(), list.unique.clone(), settings.concurrency, request, done_tx)));

    engine.ready().await?;
    let mut outcomes = list.outcomes;
    let progress = super::progress::bar(list.occurrences.len(), 10, !settings.progress);
    let mut printer = Printer::new(&list.occurrences, outcomes.len(), out, &progress, settings.format);
    let mut printed = printer.flush(inputs, &mut outcomes);
    while printed.is_ok()
        && let Some((slot, outcome)) = done_rx.recv().await
    {
        outcomes[slot] = Some(outcome);
        printed = printer.flush(inputs, &mut outcomes);
    }
    drop(producer);
    progress.finish_and_clear();
    // As ripgrep does: `classifier ... | head -1` is not an error.
    if printed.closed()? {
        tracing::debug!("stdout was closed; stopping");
        return Ok(Summary { classified: 0, failed: 0, stdout_closed: true });
    }
    // Every source has an outcome by now; should one not, it must not pass
    // for a success.
    for (slot, outcome) in outcomes.iter_mut().enumerate() {
        if outcome.is_none() && printer.remaining[slot] > 0 {
            *outcome = Some(Err(SourceError::Internal("internal error: no result".into())));
        }
    }
    let stdout_closed = printer.flush(inputs, &mut outcomes).closed()?;
    let failed = printer.failed;
    let summary = Summary { classified: list.occurrences.len() - failed, failed, stdout_closed };
    report(&summary, &engine, started.elapsed());
    Ok(summary)
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

/// The sources as given, and the distinct ones to classify: a source given
/// twice is fetched once and reported twice.
struct SourceList {
    /// The slot of each source as given.
    occurrences: Vec<usize>,
    /// The distinct sources, with their slot.
    unique: Vec<(usize, Source)>,
    /// Each slot's outcome: known at once for a source that does not parse.
    outcomes: Vec<Option<Outcome>>,
}

impl SourceList {
    fn new(inputs: &[Expanded]) -> SourceList {
        let mut unique = vec![];
        let mut index: HashMap<Source, usize> = HashMap::new();
        let mut outcomes: Vec<Option<Outcome>> = vec![];
        let occurrences = inputs
            .iter()
            .map(|input| match input {
                Expanded::Source(input) => Source::parse(input).map_err(|e| e.reason),
                Expanded::Failed { reason, .. } => Err(reason.clone()),
            })
            .zip(inputs)
            .map(|(parsed, input)| match parsed {
                Ok(source) => *index.entry(source.clone()).or_insert_with(|| {
                    outcomes.push(None);
                    unique.push((outcomes.len() - 1, source));
                    outcomes.len() - 1
                }),
                Err(reason) => {
                    warn!(source = %input.source(), "{reason}");
                    outcomes.push(Some(Err(SourceError::Invalid(reason))));
                    outcomes.len() - 1
                }
            })
            .collect();
        SourceList { occurrences, unique, outcomes }
    }
}

/// Hands every source to the engine, at most `concurrency` at once until
/// they are queued for inference, each its own task: a download keeps
/// streaming (and its time limit stays honest) while others wait for room
/// in the queue. The records, small, wait in `done` for the printer.
async fn produce(
    engine: Engine,
    sources: Vec<(usize, Source)>,
    concurrency: usize,
    request: Request,
    done: mpsc::Sender<(usize, Outcome)>,
) {
    let in_flight = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for (slot, source) in sources {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let (engine, done) = (engine.clone(), done.clone());
        tasks.spawn(async move {
            let name = source.to_string();
            // The slot bounds the images being downloaded and decoded: it is
            // free again once the image waits for inference.
            let queued = engine.submit(Input::Source(source), request).await;
            drop(permit);
            let outcome = match queued {
                Ok(queued) => queued.predictions().await,
                Err(e) => Err(e),
            };
            if let Err(e) = &outcome {
                warn!(source = %name, "{e}");
            }
            let _ = done.send((slot, outcome)).await;
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while let Some(joined) = tasks.join_next().await {
        // A panic is a bug; its source is reported as having no result.
        if let Err(e) = joined
            && e.is_panic()
        {
            tracing::error!("internal error: a task panicked: {e}");
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
    format: render::Format,
}

impl<'a> Printer<'a> {
    fn new(
        occurrences: &'a [usize],
        slots: usize,
        out: &'a mut (dyn Write + Send),
        progress: &'a indicatif::ProgressBar,
        format: render::Format,
    ) -> Self {
        let mut remaining = vec![0; slots];
        for &slot in occurrences {
            remaining[slot] += 1;
        }
        Printer { occurrences, remaining, next: 0, failed: 0, out, progress, format }
    }

    fn flush(&mut self, inputs: &[Expanded], outcomes: &mut [Option<Outcome>]) -> std::io::Result<()> {
        let start = self.next;
        while let Some(&slot) = self.occurrences.get(self.next) {
            let Some(outcome) = &outcomes[slot] else { break };
            let record = render::render(self.format, inputs[self.next].source(), outcome);
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
