//! classifier: downloads a TFLite image classifier, its labels and images
//! concurrently, and prints the top predictions for each image.
//!
//! The modules are the stages, in the order data flows through them:
//! [`input`] (sources, the source policy, fetching, the download cache) →
//! [`image`] (decode, resize) → [`engine`] (the bounded queue and the
//! inference pool) → [`model`] → [`rank`] → [`render`]; [`labels`] reads
//! the label map. [`engine::Engine`] ties them together for every front
//! end; [`cli`] is the command line's, [`serve`] the HTTP service's.

pub mod cli;
pub mod deadline;
pub mod engine;
pub mod image;
pub mod input;
pub mod labels;
pub mod model;
pub mod rank;
pub mod render;
pub mod serve;

/// Starts glibc's allocator in the state it settles into after its first
/// large frees: blocks up to 32 MiB come from the heap, and up to 64 MiB
/// freed at the top of each heap is kept for reuse rather than given back at
/// once. By default each large block is mapped afresh and unmapped when
/// freed, so every copy of the model's weights while it is prepared, and
/// every activation of the first inferences, pays a page fault per 4 KiB; on
/// this kind of virtual machine those faults were most of a cold
/// preparation's time (see BENCHMARKS.md). Call it once, at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    // SAFETY: mallopt only sets parameters of the allocator, under its lock.
    unsafe {
        // Setting either threshold turns glibc's adaptive ones off: the trim
        // threshold alone would leave every large block mapped afresh.
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1 {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}
