//! `GET /v1/usage`: the sources asked most over a sliding window (3 days by
//! default), each with its number of requests, failures and processing
//! time (min, max, mean), as the service this replaces reported.
//!
//! Memory is bounded whatever strangers send: the window is cut into
//! [`STEPS`] time steps, and each step tracks at most [`TRACKED`] sources
//! with the Space-Saving algorithm (Metwally et al.): a new source past that
//! takes the place of the least asked one and inherits its count, so the
//! heaviest sources are always kept and a count is over by at most what it
//! inherited. The report says whether any count is such an estimate.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Steps of the sliding window: it slides by a 24th of its length.
pub const STEPS: u64 = 24;
/// Sources tracked in each step.
pub const TRACKED: usize = 256;
/// A longer URL is cut to this many bytes in the report.
const MAX_SOURCE_BYTES: usize = 512;

pub struct Usage {
    started: Instant,
    window: Duration,
    steps: Mutex<VecDeque<Step>>,
}

struct Step {
    index: u64,
    sources: HashMap<String, Tally>,
    estimated: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    requests: u64,
    failures: u64,
    /// Requests whose time is in the sums below: a source that took the
    /// place of another inherits its count, not its times.
    timed: u64,
    total: f64,
    min: f64,
    max: f64,
}

impl Tally {
    fn add(&mut self, took: f64, failed: bool) {
        self.requests += 1;
        self.failures += u64::from(failed);
        self.min = if self.timed == 0 { took } else { self.min.min(took) };
        self.max = self.max.max(took);
        self.total += took;
        self.timed += 1;
    }

    fn merge(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.failures += other.failures;
        if other.timed > 0 {
            self.min = if self.timed == 0 { other.min } else { self.min.min(other.min) };
            self.max = self.max.max(other.max);
            self.total += other.total;
            self.timed += other.timed;
        }
    }
}

/// The report, most asked first.
#[derive(Debug, Serialize)]
pub struct Report {
    pub window_seconds: f64,
    /// False when a count was estimated: more distinct sources were asked
    /// in a step than it tracks.
    pub exact: bool,
    pub sources: Vec<SourceUsage>,
}

#[derive(Debug, Serialize)]
pub struct SourceUsage {
    /// The URL, or `sha256:HEX` of an upload's content.
    pub source: String,
    pub requests: u64,
    pub failures: u64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// A source as given, cut to a bounded length.
pub fn cut(mut text: String) -> String {
    if text.len() > MAX_SOURCE_BYTES {
        let mut end = MAX_SOURCE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Usage {
    pub fn new(window: Duration) -> Usage {
        Usage { started: Instant::now(), window, steps: Mutex::new(VecDeque::new()) }
    }

    pub fn record(&self, source: String, took: Duration, failed: bool) {
        self.record_at(Instant::now(), source, took, failed);
    }

    pub fn report(&self, top: usize) -> Report {
        self.report_at(Instant::now(), top)
    }

    fn step_of(&self, at: Instant) -> u64 {
        let step = (self.window.as_secs_f64() / STEPS as f64).max(1e-3);
        (at.saturating_duration_since(self.started).as_secs_f64() / step) as u64
    }

    /// Whether step `index` is still in the window at step `now`.
    fn in_window(index: u64, now: u64) -> bool {
        index + STEPS > now
    }

    fn record_at(&self, at: Instant, source: String, took: Duration, failed: bool) {
        let now = self.step_of(at);
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        while steps.front().is_some_and(|s| !Usage::in_window(s.index, now)) {
            steps.pop_front();
        }
        if steps.back().is_none_or(|s| s.index != now) {
            steps.push_back(Step { index: now, sources: HashMap::new(), estimated: false });
        }
        let step = steps.back_mut().expect("pushed above");
        let took = took.as_secs_f64() * 1e3;
        if let Some(tally) = step.sources.get_mut(&source) {
            tally.add(took, failed);
            return;
        }
        let mut tally = Tally::default();
        if step.sources.len() >= TRACKED {
            let least = step.sources.iter().min_by_key(|(_, t)| t.requests).map(|(s, t)| (s.clone(), t.requests));
            if let Some((least, requests)) = least {
                step.sources.remove(&least);
                tally.requests = requests;
                step.estimated = true;
            }
        }
        tally.add(took, failed);
        step.sources.insert(source, tally);
    }

    fn report_at(&self, at: Instant, top: usize) -> Report {
        let now = self.step_of(at);
        let steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let mut merged: HashMap<&str, Tally> = HashMap::new();
        let mut exact = true;
        for step in steps.iter().filter(|s| Usage::in_window(s.index, now)) {
            exact &= !step.estimated;
            for (source, tally) in &step.sources {
                merged.entry(source).or_default().merge(tally);
            }
        }
        let mut sources: Vec<SourceUsage> = merged
            .into_iter()
            .map(|(source, t)| {
                let mean = if t.timed == 0 { 0.0 } else { t.total / t.timed as f64 };
                SourceUsage {
                    source: source.to_string(),
                    requests: t.requests,
                    failures: t.failures,
                    min_ms: round(t.min),
                    max_ms: round(t.max),
                    mean_ms: round(mean),
                }
            })
            .collect();
        sources.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.source.cmp(&b.source)));
        sources.truncate(top);
        Report { window_seconds: self.window.as_secs_f64(), exact, sources }
    }
}

/// Milliseconds to the microsecond.
fn round(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn counts_and_times_are_per_source_most_asked_first() {
        let usage = Usage::new(Duration::from_secs(3600));
        let at = usage.started;
        for (source, ms, failed) in
            [("a", 10, false), ("b", 5, false), ("a", 30, true), ("a", 20, false), ("b", 7, false)]
        {
            usage.record_at(at, source.into(), MS * ms, failed);
        }
        usage.record_at(at, "c".into(), MS * 2, false);
        let report = usage.report_at(at, 2);
        assert!(report.exact);
        let rows: Vec<(&str, u64, u64, f64, f64, f64)> = report
            .sources
            .iter()
            .map(|s| (s.source.as_str(), s.requests, s.failures, s.min_ms, s.max_ms, s.mean_ms))
            .collect();
        assert_eq!(rows, [("a", 3, 1, 10.0, 30.0, 20.0), ("b", 2, 0, 5.0, 7.0, 6.0)]);
    }

    #[test]
    fn requests_older_than_the_window_are_forgotten() {
        let window = Duration::from_secs(24 * 60);
        let usage = Usage::new(window);
        let at = usage.started;
        usage.record_at(at, "old".into(), MS, false);
        usage.record_at(at + window / 2, "new".into(), MS, false);
        usage.record_at(at + window / 2, "old".into(), MS, false);
        assert_eq!(usage.report_at(at + window / 2, 10).sources[0].requests, 2);
        // One step past the window, the first request has left it.
        let later = at + window + window / 24;
        let report = usage.report_at(later, 10);
        let rows: Vec<(&str, u64)> = report.sources.iter().map(|s| (s.source.as_str(), s.requests)).collect();
        assert_eq!(rows, [("new", 1), ("old", 1)]);
        assert!(usage.report_at(at + window * 3, 10).sources.is_empty());
    }

    #[test]
    fn memory_stays_bounded_and_heavy_sources_are_kept() {
        let usage = Usage::new(Duration::from_secs(3600));
        let at = usage.started;
        // Space-Saving keeps every source asked more than once in
        // TRACKED requests: "heavy" is one in ten of 22 000.
        for round in 0..2000 {
            usage.record_at(at, "heavy".into(), MS, false);
            for n in 0..10 {
                usage.record_at(at, format!("once-{round}-{n}"), MS, false);
            }
        }
        assert!(usage.steps.lock().unwrap().iter().all(|s| s.sources.len() <= TRACKED));
        let report = usage.report_at(at, 2);
        assert!(!report.exact);
        assert_eq!(report.sources[0].source, "heavy");
        // An estimate, never under the truth, and over it by at most N / TRACKED.
        let (truth, bound) = (2000, 22_000 / TRACKED as u64 + 1);
        assert!((truth..=truth + bound).contains(&report.sources[0].requests), "{:?}", report.sources[0]);
        assert!(report.sources[1].requests <= bound, "{:?}", report.sources[1]);
    }

    #[test]
    fn long_urls_are_cut() {
        let long = format!("https://h/{}", "x".repeat(600));
        let source = cut(long.clone());
        assert!(source.len() == MAX_SOURCE_BYTES && long.starts_with(&source), "{source}");
        // Never inside a character.
        assert_eq!(cut("é".repeat(300)).len(), MAX_SOURCE_BYTES);
        assert_eq!(cut("aé".repeat(200)).len(), MAX_SOURCE_BYTES - 1);
    }
}
