//! `GET /metrics`: the server's own counters (requests by route and status,
//! their duration, requests in flight) in a prometheus-client registry, and
//! each engine's [`crate::engine::Metrics`], read at every scrape rather
//! than copied as work happens.

use std::fmt;
use std::sync::atomic::AtomicI64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::engine::Engine;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

type Histograms = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct ServeMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    pub in_flight: Gauge<i64, AtomicI64>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
}

impl ServeMetrics {
    pub fn new(engines: Vec<(String, Engine)>) -> ServeMetrics {
        let mut registry = Registry::with_prefix("classifier");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests answered, by route and status", requests.clone());
        // 5 ms to about 41 s.
        let duration: Histograms = Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's headers to its answer, by route",
            Unit::Seconds,
            duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("http_requests_in_flight", "HTTP requests being handled", in_flight.clone());
        let cache_hits = Counter::default();
        registry.register("result_cache_hits", "Sources answered from the result cache", cache_hits.clone());
        let cache_misses = Counter::default();
        registry.register("result_cache_misses", "Sources classified with the result cache on", cache_misses.clone());
        registry.register_collector(Box::new(Engines(engines)));
        ServeMetrics { registry, requests, duration, in_flight, cache_hits, cache_misses }
    }

    /// One answer to `route` (its pattern, not the path asked for, so that
    /// the labels stay few).
    pub fn answered(&self, route: &str, status: u16, seconds: f64) {
        self.requests.get_or_create(&RequestLabels { route: route.into(), status }).inc();
        self.duration.get_or_create(&RouteLabels { route: route.into() }).observe(seconds);
    }

    /// The text exposition format.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Every engine's counters, labelled by model.
struct Engines(Vec<(String, Engine)>);

impl fmt::Debug for Engines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(name, _)| name)).finish()
    }
}

impl Collector for Engines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshots: Vec<_> =
            self.0.iter().map(|(name, engine)| (name.as_str(), engine, engine.metrics().snapshot())).collect();
        let seconds = Some(&Unit::Seconds);
        macro_rules! each {
            ($name:expr, $help:expr, $unit:expr, $kind:expr, |$engine:ident, $s:ident| $value:expr) => {{
                let mut metric = encoder.encode_descriptor($name, $help, $unit, $kind)?;
                for (model, $engine, $s) in &snapshots {
                    let _ = (&$engine, &$s);
                    let labels = [("model", *model)];
                    $value.encode(metric.encode_family(&labels)?)?;
                }
            }};
        }
        each!("images", "Images classified", None, MetricType::Counter, |e, s| ConstCounter::new(s.images));
        each!("batches", "Batches run by the inference pool", None, MetricType::Counter, |e, s| {
            ConstCounter::new(s.batches)
        });
        each!("queue_depth", "Images waiting for inference now", None, MetricType::Gauge, |e, s| {
            ConstGauge::new(e.queue_depth() as i64)
        });
        each!("queue_wait", "Time images waited for inference, summed", seconds, MetricType::Counter, |e, s| {
            ConstCounter::new(s.queue_wait.as_secs_f64())
        });
        each!(
            "compute",
            "Time the inference pool computed, summed over batches",
            seconds,
            MetricType::Counter,
            |e, s| { ConstCounter::new(s.inference_time.as_secs_f64()) }
        );
        each!(
            "decode",
            "Time spent decoding and resizing, summed over images",
            seconds,
            MetricType::Counter,
            |e, s| { ConstCounter::new(s.decode_time.as_secs_f64()) }
        );
        each!("fetch", "Image downloads completed", None, MetricType::Counter, |e, s| ConstCounter::new(s.downloads));
        each!("fetch_bytes", "Bytes of images downloaded", None, MetricType::Counter, |e, s| {
            ConstCounter::new(s.downloaded_bytes)
        });
        each!("fetch_time", "Time spent downloading images, summed", seconds, MetricType::Counter, |e, s| {
            ConstCounter::new(s.download_time.as_secs_f64())
        });
        each!("model_ready", "1 once the model and its labels are loaded", None, MetricType::Gauge, |e, s| {
            ConstGauge::new(i64::from(e.loaded().is_some()))
        });
        let mut failures = encoder.encode_descriptor(
            "failures",
            "Sources not classified, by kind (fetch outcomes among them: connect, timeout, http_status, denied...)",
            None,
            MetricType::Counter,
        )?;
        for (model, _, s) in &snapshots {
            for (kind, count) in &s.failures {
                let labels = [("model", *model), ("kind", kind.name())];
                ConstCounter::new(*count).encode(failures.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
