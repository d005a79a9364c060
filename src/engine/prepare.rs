//! An image's bytes to the model's input, under the engine's limits: decodes
//! on the blocking pool, as many at once as there are inference workers,
//! holding together at most [`MAX_DECODE_BYTES`] (each counts what its
//! header says it will allocate, and waits while the sum would pass it),
//! and at most twice that many full-size images (not JPEGs decoded fast,
//! which are reduced to the size) waiting for a model whose input size is
//! not yet known.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::debug_span;

use super::error::SourceError;
use super::{Inner, State};
use crate::deadline::Deadline;
use crate::image::{Decoding, MAX_DECODE_BYTES};

/// What bounds the preparation of images.
pub(super) struct Limits {
    /// Decodes at once: they are CPU-bound, and their full-size images are
    /// the largest buffers of a run.
    decoders: Arc<Semaphore>,
    /// Images decoded before the model's input size is known, waiting for it
    /// at full size. Past this many, images wait for the size undecoded.
    early: Arc<Semaphore>,
    /// What decodes hold at once, in MiB: without it, as many decoders as
    /// CPUs could each be allocating the most one decode may, which a
    /// stranger's few huge images would make a server's memory limit.
    memory: Arc<Semaphore>,
}

/// The decodes' memory budget, in MiB: the most one decode may allocate.
const MEMORY_MIB: u32 = (MAX_DECODE_BYTES >> 20) as u32;

impl Limits {
    pub fn new(threads: usize) -> Limits {
        Limits {
            decoders: Arc::new(Semaphore::new(threads)),
            early: Arc::new(Semaphore::new(2 * threads)),
            memory: Arc::new(Semaphore::new(MEMORY_MIB as usize)),
        }
    }
}

/// The MiB of the budget a decode of `bytes` takes: at least one, at most all.
fn memory_mib(bytes: &[u8]) -> u32 {
    let mib = crate::image::decode_memory(bytes).div_ceil(1 << 20);
    u32::try_from(mib).unwrap_or(MEMORY_MIB).clamp(1, MEMORY_MIB)
}

/// Decodes `bytes` (turned as its EXIF orientation says, with
/// `exif_orientation`) and resizes the image to the model's input size: 8-bit
/// RGB, ready for the queue. `name` is for the logs.
pub(super) async fn prepare(
    bytes: Bytes,
    engine: &Inner,
    deadline: Deadline,
    name: &str,
) -> Result<Vec<u8>, SourceError> {
    let Inner { exif_orientation, decoding, ref limits, ref state, ref metrics, .. } = *engine;
    let span = debug_span!("decode", source = name);
    // A JPEG decoded fast is reduced as far as the model's size allows, so
    // it waits for the size: decoded early at full size, it would come out
    // otherwise than the same photo decoded later.
    let early = match known_size(state) {
        None if decoding == Decoding::Exact || !is_jpeg(&bytes) => limits.early.clone().try_acquire_owned().ok(),
        _ => None,
    };
    let (pixels, spent) = match early {
        // The model is not there yet: decode now, resize when it is.
        Some(_early) => {
            let decoder = decoder(limits, deadline).await?;
            // Held until the image is resized: it waits at full size.
            let memory = memory(limits, &bytes, deadline).await?;
            let decode_span = span.clone();
            let decode = move || {
                let _decoder = decoder;
                decode_span.in_scope(|| crate::image::decode(&bytes, exif_orientation))
            };
            let (image, decoding) = blocking(decode).await?;
            let image = image?;
            let (width, height) = input_size(state, deadline).await?;
            let (pixels, resizing) = blocking(move || {
                let _memory = memory;
                span.in_scope(|| crate::image::resize(image, width, height))
            })
            .await?;
            (pixels, decoding + resizing)
        }
        None => {
            let (width, height) = input_size(state, deadline).await?;
            let decoder = decoder(limits, deadline).await?;
            let memory = memory(limits, &bytes, deadline).await?;
            blocking(move || {
                let (_decoder, _memory) = (decoder, memory);
                span.in_scope(|| crate::image::prepare(&bytes, exif_orientation, width, height, decoding))
            })
            .await?
        }
    };
    metrics.decoded(spent);
    Ok(pixels?)
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// A decoder's slot, moved into the decode itself: a caller that goes away
/// leaves the decode running on the blocking pool, which must still count.
async fn decoder(limits: &Limits, deadline: Deadline) -> Result<OwnedSemaphorePermit, SourceError> {
    within(deadline, limits.decoders.clone().acquire_owned()).await?.map_err(|_| SourceError::Unavailable)
}

/// The share of the decodes' memory budget a decode of `bytes` holds, taken
/// once a decoder's slot is: its holders hold slots too, so none waits for
/// a slot while holding memory, and the budget cannot deadlock.
async fn memory(limits: &Limits, bytes: &[u8], deadline: Deadline) -> Result<OwnedSemaphorePermit, SourceError> {
    let mib = memory_mib(bytes);
    within(deadline, limits.memory.clone().acquire_many_owned(mib)).await?.map_err(|_| SourceError::Unavailable)
}

fn size_of(state: &State) -> Option<(u32, u32)> {
    match state {
        State::Loading { input } => *input,
        State::Ready(loaded) => Some((loaded.input.width, loaded.input.height)),
        State::Failed(_) => None,
    }
}

fn known_size(state: &watch::Receiver<State>) -> Option<(u32, u32)> {
    size_of(&state.borrow())
}

/// The model's input size, once known; an error if the model failed.
async fn input_size(state: &watch::Receiver<State>, deadline: Deadline) -> Result<(u32, u32), SourceError> {
    let mut state = state.clone();
    let known = within(deadline, state.wait_for(|s| size_of(s).is_some() || matches!(s, State::Failed(_)))).await?;
    let known = known.map_err(|_| SourceError::Unavailable)?;
    size_of(&known).ok_or(SourceError::Unavailable)
}

/// `f`, unless `deadline` passes first.
pub(super) async fn within<F: Future>(deadline: Deadline, f: F) -> Result<F::Output, SourceError> {
    match deadline.instant() {
        Some(at) => tokio::time::timeout_at(at.into(), f).await.map_err(|_| SourceError::Deadline),
        None => Ok(f.await),
    }
}

/// Runs `f` on the blocking pool, and times it.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<(T, Duration), SourceError> {
    let timed = move || {
        let started = Instant::now();
        (f(), started.elapsed())
    };
    tokio::task::spawn_blocking(timed)
        .await
        .map_err(|e| SourceError::Internal(format!("internal error in decoding: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 54 bytes of a BMP's headers for a 24-bit image of `side` x `side`
    /// pixels, with none of its pixels: the decodes' budget is taken from
    /// the header, before anything is decoded.
    fn bmp_header(side: u32) -> Vec<u8> {
        let mut header = b"BM".to_vec();
        let size = 54 + side * side * 3;
        for field in [size, 0, 54, 40, side, side] {
            header.extend(field.to_le_bytes());
        }
        header.extend(1u16.to_le_bytes());
        header.extend(24u16.to_le_bytes());
        header.extend([0u8; 24]);
        header
    }

    #[tokio::test]
    async fn decodes_hold_together_no_more_memory_than_one_may() {
        let limits = Limits::new(4);
        let (huge, small) = (bmp_header(16_384), bmp_header(100));
        assert_eq!(memory_mib(&huge), MEMORY_MIB);
        assert_eq!(memory_mib(&small), 1);
        assert_eq!(memory_mib(b"not an image"), 1);
        let held = memory(&limits, &huge, Deadline::after(Duration::from_secs(5))).await.unwrap();
        // Even a small decode waits while a huge one holds the budget.
        let waited = memory(&limits, &small, Deadline::after(Duration::from_millis(50))).await;
        assert!(matches!(waited, Err(SourceError::Deadline)), "{waited:?}");
        drop(held);
        // Then small ones share it.
        let smalls = (0..8).map(|_| memory(&limits, &small, Deadline::after(Duration::from_secs(5))));
        let smalls = futures::future::try_join_all(smalls).await.unwrap();
        assert_eq!(smalls.len(), 8);
    }
}
