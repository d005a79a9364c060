//! The inference pool: threads of the engine's own, each keeping one
//! session of the model (its tract states) from one image to the next, fed
//! from one bounded queue.
//!
//! A caller either waits for room in the queue or is told at once that it
//! is full ([`WhenFull`]). A job whose deadline has passed, or whose caller
//! has gone away (its reply channel closed), is dropped when a worker takes
//! it, before it runs.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::error::SourceError;
use super::metrics::Metrics;
use crate::deadline::Deadline;
use crate::model::Model;

/// What a caller does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait for room, up to the job's deadline: the command line, which
    /// has all its images to get through.
    Wait,
    /// Fail at once with [`SourceError::Overloaded`]: a server, which
    /// answers 503 rather than letting its queue grow.
    Refuse,
}

type Reply = Result<Vec<f32>, SourceError>;

struct Job {
    /// 8-bit RGB at the model's input size.
    pixels: Vec<u8>,
    deadline: Deadline,
    queued: Instant,
    reply: oneshot::Sender<Reply>,
    /// The job's place in the queue, given back when a worker takes it.
    _room: OwnedSemaphorePermit,
}

/// The way into the pool. It exists before the model does, so that images
/// prepared while the model loads wait in it.
pub(super) struct Queue {
    jobs: mpsc::UnboundedSender<Job>,
    room: Arc<Semaphore>,
    capacity: usize,
}

/// The other end of the queue, for the workers once the model is ready.
pub(super) struct Jobs {
    jobs: mpsc::UnboundedReceiver<Job>,
    room: Arc<Semaphore>,
}

impl Queue {
    /// A queue holding at most `capacity` jobs that no worker has taken.
    pub fn new(capacity: usize) -> (Queue, Jobs) {
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity = capacity.max(1);
        let room = Arc::new(Semaphore::new(capacity));
        (Queue { jobs: tx, room: room.clone(), capacity }, Jobs { jobs: rx, room })
    }

    /// Queues `pixels` for inference; the receiver gets the scores.
    pub async fn submit(
        &self,
        pixels: Vec<u8>,
        deadline: Deadline,
        when_full: WhenFull,
    ) -> Result<oneshot::Receiver<Reply>, SourceError> {
        let room = match when_full {
            WhenFull::Refuse => self.room.clone().try_acquire_owned().map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => SourceError::Overloaded,
                tokio::sync::TryAcquireError::Closed => SourceError::Unavailable,
            })?,
            WhenFull::Wait => {
                let room = self.room.clone().acquire_owned();
                let room = match deadline.instant() {
                    Some(at) => tokio::time::timeout_at(at.into(), room).await.map_err(|_| SourceError::Deadline)?,
                    None => room.await,
                };
                room.map_err(|_| SourceError::Unavailable)?
            }
        };
        let (reply, answer) = oneshot::channel();
        let job = Job { pixels, deadline, queued: Instant::now(), reply, _room: room };
        self.jobs.send(job).map_err(|_| SourceError::Unavailable)?;
        Ok(answer)
    }

    /// Whether a caller that will not wait would be refused now.
    pub fn is_full(&self) -> bool {
        self.room.available_permits() == 0
    }

    /// Jobs waiting for a worker now (none once the queue is closed).
    pub fn waiting(&self) -> usize {
        if self.room.is_closed() { 0 } else { self.capacity.saturating_sub(self.room.available_permits()) }
    }

    /// What closes the queue when its jobs can never run (the model did not
    /// load): callers waiting for room then fail at once.
    pub fn closer(&self) -> Closer {
        Closer(self.room.clone())
    }
}

pub(super) struct Closer(Arc<Semaphore>);

impl Closer {
    pub fn close(&self) {
        self.0.close();
    }
}

/// What the workers share.
struct Shared {
    jobs: Mutex<mpsc::UnboundedReceiver<Job>>,
    /// Workers waiting for a job, to share a crowd among them.
    idle: AtomicUsize,
    batch_size: usize,
    metrics: Arc<Metrics>,
}

/// Starts `threads` workers on `model`, taking jobs from `jobs`, at most
/// `batch_size` at a time. They stop when the queue's sender is dropped
/// (the engine is gone) and every job taken is done.
pub(super) fn start(
    model: Arc<Model>,
    jobs: Jobs,
    threads: usize,
    batch_size: usize,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    // Kept open: the workers give back each job's room as they take it.
    drop(jobs.room);
    let shared = Arc::new(Shared {
        jobs: Mutex::new(jobs.jobs),
        idle: AtomicUsize::new(0),
        batch_size: batch_size.max(1),
        metrics,
    });
    for i in 0..threads.max(1) {
        let (shared, model) = (shared.clone(), model.clone());
        std::thread::Builder::new().name(format!("inference-{i}")).spawn(move || work(&shared, &model))?;
    }
    Ok(())
}

fn work(shared: &Shared, model: &Model) {
    let mut session = None;
    while let Some(batch) = take(shared) {
        run(shared, model, &mut session, batch);
    }
}

/// The next jobs for this worker: what is waiting, shared among the idle
/// workers (a lone image starts at once, a crowd is split rather than
/// queued behind one worker), at most a batch. None once the queue is
/// closed and empty.
fn take(shared: &Shared) -> Option<Vec<Taken>> {
    shared.idle.fetch_add(1, Ordering::SeqCst);
    let mut jobs = shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
    let first = jobs.blocking_recv();
    shared.idle.fetch_sub(1, Ordering::SeqCst);
    let first = first?;
    let others_idle = shared.idle.load(Ordering::SeqCst);
    let share = (1 + jobs.len()).div_ceil(1 + others_idle).min(shared.batch_size);
    let mut batch = Vec::with_capacity(share);
    batch.push(first);
    while batch.len() < share
        && let Ok(job) = jobs.try_recv()
    {
        batch.push(job);
    }
    // Out of the queue: their room is free for the next callers.
    Some(
        batch
            .into_iter()
            .map(|Job { pixels, deadline, queued, reply, _room }| Taken { pixels, deadline, queued, reply })
            .collect(),
    )
}

/// A job a worker has taken off the queue.
struct Taken {
    pixels: Vec<u8>,
    deadline: Deadline,
    queued: Instant,
    reply: oneshot::Sender<Reply>,
}

fn run(shared: &Shared, model: &Model, session: &mut Option<crate::model::Session>, batch: Vec<Taken>) {
    let _span = tracing::debug_span!("batch", size = batch.len()).entered();
    let mut ran = false;
    for Taken { pixels, deadline, queued, reply } in batch {
        if reply.is_closed() {
            shared.metrics.dropped(false);
            continue;
        }
        if deadline.expired() {
            shared.metrics.dropped(true);
            let _ = reply.send(Err(SourceError::Deadline));
            continue;
        }
        if !ran {
            shared.metrics.batch();
            ran = true;
        }
        let started = Instant::now();
        let scores = classify(model, session, &pixels);
        if scores.is_ok() {
            shared.metrics.classified(started.saturating_duration_since(queued), started.elapsed());
        }
        let _ = reply.send(scores);
    }
}

/// Scores one image on this worker's session, made on first use and made
/// anew after a failed run or a panic, either of which may have left its
/// states half-run.
fn classify(model: &Model, session: &mut Option<crate::model::Session>, pixels: &[u8]) -> Reply {
    let wanted = model.input().image_bytes();
    if pixels.len() != wanted {
        return Err(SourceError::Inference(format!(
            "inference failed: image of {} bytes, the model wants {wanted}",
            pixels.len()
        )));
    }
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let session = match session {
            Some(session) => session,
            None => session.insert(model.session()?),
        };
        session.classify(pixels)
    }));
    match outcome {
        Ok(Ok(scores)) => Ok(scores),
        Ok(Err(e)) => {
            *session = None;
            let error = format!("inference failed: {e:#}");
            tracing::warn!("{error}");
            Err(SourceError::Inference(error))
        }
        // A bug, shown by the panic hook; it costs only this image.
        Err(payload) => {
            *session = None;
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(SourceError::Inference(format!("internal error in inference: {message}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn mock() -> Arc<Model> {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mock_model.tflite")).unwrap();
        Arc::new(Model::from_bytes(&bytes, 1).unwrap())
    }

    const RED: [u8; 3] = [255, 0, 0];

    fn red() -> Vec<u8> {
        RED.repeat(64)
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_or_makes_the_caller_wait() {
        let (queue, jobs) = Queue::new(2);
        // No workers yet: the model is still loading, and jobs wait.
        let first = queue.submit(red(), Deadline::NEVER, WhenFull::Refuse).await.unwrap();
        let _second = queue.submit(red(), Deadline::NEVER, WhenFull::Refuse).await.unwrap();
        let refused = queue.submit(red(), Deadline::NEVER, WhenFull::Refuse).await.unwrap_err();
        assert!(matches!(refused, SourceError::Overloaded), "{refused}");
        assert_eq!(queue.waiting(), 2);
        // A waiting caller waits, up to its deadline.
        let soon = Deadline::after(Duration::from_millis(50));
        let late = queue.submit(red(), soon, WhenFull::Wait).await.unwrap_err();
        assert!(matches!(late, SourceError::Deadline), "{late}");
        let waiting = tokio::spawn(async move {
            let answer = queue.submit(red(), Deadline::NEVER, WhenFull::Wait).await.unwrap();
            answer.await.unwrap()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a caller went past a full queue");
        // The workers make room; every job is answered.
        start(mock(), jobs, 1, 4, Arc::default()).unwrap();
        let scores = waiting.await.unwrap().unwrap();
        assert_eq!(crate::rank::top_k(&scores, 1), [0]);
        assert_eq!(crate::rank::top_k(&first.await.unwrap().unwrap(), 1), [0]);
    }

    #[tokio::test]
    async fn a_job_whose_deadline_passed_or_whose_caller_left_is_not_run() {
        let (queue, jobs) = Queue::new(8);
        let metrics = Arc::new(Metrics::default());
        let expired = queue.submit(red(), Deadline::after(Duration::from_millis(20)), WhenFull::Wait).await.unwrap();
        let gone = queue.submit(red(), Deadline::NEVER, WhenFull::Wait).await.unwrap();
        drop(gone);
        let kept = queue.submit(red(), Deadline::NEVER, WhenFull::Wait).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        start(mock(), jobs, 1, 8, metrics.clone()).unwrap();
        assert!(matches!(expired.await.unwrap(), Err(SourceError::Deadline)));
        assert!(kept.await.unwrap().is_ok());
        let seen = metrics.snapshot();
        assert_eq!((seen.images, seen.expired, seen.abandoned), (1, 1, 1), "{seen:?}");
    }

    #[tokio::test]
    async fn a_closed_queue_fails_its_callers() {
        let (queue, jobs) = Queue::new(1);
        let queued = queue.submit(red(), Deadline::NEVER, WhenFull::Wait).await.unwrap();
        queue.closer().close();
        drop(jobs);
        assert!(queued.await.is_err(), "a job the model will never run was kept");
        let refused = queue.submit(red(), Deadline::NEVER, WhenFull::Wait).await.unwrap_err();
        assert!(matches!(refused, SourceError::Unavailable), "{refused}");
    }

    #[tokio::test]
    async fn a_bad_image_fails_alone_and_workers_keep_their_session() {
        let (queue, jobs) = Queue::new(8);
        start(mock(), jobs, 2, 4, Arc::default()).unwrap();
        let bad = queue.submit(vec![0; 10], Deadline::NEVER, WhenFull::Wait).await.unwrap();
        let err = bad.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "inference failed: image of 10 bytes, the model wants 192");
        for _ in 0..6 {
            let good = queue.submit(red(), Deadline::NEVER, WhenFull::Wait).await.unwrap();
            let scores = good.await.unwrap().unwrap();
            assert!((scores[0] - 0.7175).abs() < 0.01, "{scores:?}");
        }
    }
}
