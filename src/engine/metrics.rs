//! What the engine has done, counted in one place: the command line's
//! summary reads it at the end of a run, a metrics endpoint at any time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::error::ErrorKind;

/// Counters and summed times, updated without locks as work completes.
#[derive(Debug, Default)]
pub struct Metrics {
    images: AtomicU64,
    batches: AtomicU64,
    downloads: AtomicU64,
    download_nanos: AtomicU64,
    downloaded_bytes: AtomicU64,
    decode_nanos: AtomicU64,
    queue_wait_nanos: AtomicU64,
    inference_nanos: AtomicU64,
    /// Jobs dropped unrun: their deadline passed, or their caller left.
    expired: AtomicU64,
    abandoned: AtomicU64,
    model_download_nanos: AtomicU64,
    model_prepare_nanos: AtomicU64,
    failures: [AtomicU64; ErrorKind::ALL.len()],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Images classified.
    pub images: u64,
    /// Batches run by the inference pool.
    pub batches: u64,
    pub downloads: u64,
    /// Time spent downloading or reading images, summed over images.
    pub download_time: Duration,
    pub downloaded_bytes: u64,
    /// Time spent decoding and resizing, summed over images.
    pub decode_time: Duration,
    /// Time images waited in the inference queue, summed.
    pub queue_wait: Duration,
    /// Time the inference pool computed, summed over batches.
    pub inference_time: Duration,
    /// Jobs dropped before they ran because their deadline had passed.
    pub expired: u64,
    /// Jobs dropped before they ran because their caller had gone away.
    pub abandoned: u64,
    pub model_download: Duration,
    pub model_prepare: Duration,
    /// Failed sources by kind, in the order of [`ErrorKind::ALL`].
    pub failures: Vec<(ErrorKind, u64)>,
}

fn add(counter: &AtomicU64, duration: Duration) {
    counter.fetch_add(duration.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Metrics {
    pub(super) fn downloaded(&self, bytes: usize, took: Duration) {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        self.downloaded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        add(&self.download_nanos, took);
    }

    pub(super) fn decoded(&self, took: Duration) {
        add(&self.decode_nanos, took);
    }

    pub(super) fn batch(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// One image classified: counted before its caller hears of it, so that
    /// what a caller reads afterwards includes it.
    pub(super) fn classified(&self, queue_wait: Duration, took: Duration) {
        self.images.fetch_add(1, Ordering::Relaxed);
        add(&self.queue_wait_nanos, queue_wait);
        add(&self.inference_nanos, took);
    }

    pub(super) fn dropped(&self, expired: bool) {
        let counter = if expired { &self.expired } else { &self.abandoned };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn failed(&self, kind: ErrorKind) {
        self.failures[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn model_loaded(&self, download: Duration, prepare: Duration) {
        add(&self.model_download_nanos, download);
        add(&self.model_prepare_nanos, prepare);
    }

    pub fn snapshot(&self) -> Snapshot {
        let time = |counter: &AtomicU64| Duration::from_nanos(get(counter));
        Snapshot {
            images: get(&self.images),
            batches: get(&self.batches),
            downloads: get(&self.downloads),
            download_time: time(&self.download_nanos),
            downloaded_bytes: get(&self.downloaded_bytes),
            decode_time: time(&self.decode_nanos),
            queue_wait: time(&self.queue_wait_nanos),
            inference_time: time(&self.inference_nanos),
            expired: get(&self.expired),
            abandoned: get(&self.abandoned),
            model_download: time(&self.model_download_nanos),
            model_prepare: time(&self.model_prepare_nanos),
            failures: ErrorKind::ALL.iter().map(|&kind| (kind, get(&self.failures[kind.index()]))).collect(),
        }
    }
}
