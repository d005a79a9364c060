//! `classifier serve`: the HTTP API on the same engine as the command line.
//! One [`Engine`] per model, loaded once and shared by every request; image
//! URLs are fetched under [`crate::input::SourcePolicy::PUBLIC_ONLY`] (and
//! the ranges the operator opens), the models and labels by the trusted
//! client as the command line does.
//!
//! - `args`: clap's types; `settings`: resolved once into plain settings.
//! - `routes`: what each route takes and answers; `errors`: the
//!   `{"error": ...}` answers; `metrics`: `GET /metrics`; `oip`: the Open
//!   Inference Protocol v2 (`/v2/...`) on the same engines.
//!
//! Connections are served by hyper directly rather than `axum::serve`, for
//! the header read timeout (a slow client cannot hold a connection) and a
//! graceful shutdown bounded by the drain timeout.

mod access;
pub mod args;
mod cache;
mod errors;
mod identity;
mod metrics;
mod oip;
mod page;
mod routes;
pub mod settings;
mod usage;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

pub use args::ServeArgs;
pub use errors::{ApiError, RETRY_AFTER_SECS};
pub use settings::{Access, Limits, ModelSettings, ServeSettings};

use crate::engine::Engine;
use crate::input::Fetcher;
use routes::{App, Served};

/// Starts every model's engine and builds the router over them.
fn app(settings: &ServeSettings) -> anyhow::Result<(Router, Arc<App>)> {
    let fetcher = Fetcher::new(settings.fetch.clone())?;
    let models: Vec<Served> = settings
        .models
        .iter()
        .map(|m| Served {
            name: m.name.clone(),
            engine: Engine::start(m.engine.clone(), fetcher.clone()),
            input: m.engine.model_input,
        })
        .collect();
    let metrics = metrics::ServeMetrics::new(models.iter().map(|m| (m.name.clone(), m.engine.clone())).collect());
    let app = Arc::new(App {
        models,
        limits: settings.limits.clone(),
        downloads: Arc::new(Semaphore::new(settings.limits.concurrency)),
        images: Arc::new(Semaphore::new(2 * settings.limits.concurrency)),
        draining: Default::default(),
        metrics,
        cache: cache::ResultCache::new(settings.limits.cache_entries, settings.limits.cache_ttl),
        usage: usage::Usage::new(settings.limits.usage_window),
        usage_top: settings.limits.usage_top,
        // One limit over classify and infer.
        in_flight: Arc::new(Semaphore::new(settings.limits.max_in_flight)),
    });
    let in_flight = || middleware::from_fn_with_state(app.clone(), admit);
    // Outside the in-flight limit: a request without the key takes no slot.
    let api_key = settings.access.api_key.clone().map(Arc::new);
    let keyed = || middleware::from_fn_with_state(api_key.clone(), access::require_key);
    let router = Router::new()
        .route("/", get(page::page))
        .route("/v1/classify", post(routes::classify).route_layer(in_flight()).route_layer(keyed()))
        .route("/v1/models", get(routes::models))
        .route("/v1/usage", get(routes::usage).route_layer(keyed()))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .merge(oip::infer_routes().route_layer(in_flight()).route_layer(keyed()))
        .merge(oip::routes())
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), count))
        // The body is read under the server's own limit (routes::read_body).
        .layer(DefaultBodyLimit::disable())
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }))
        .with_state(app.clone());
    // Outermost, so that a preflight is answered before the key is asked
    // for, and refusals carry the headers a page needs to read them.
    let router = match access::cors(&settings.access.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    Ok((router, app))
}

/// Past the in-flight limit a request is refused at once, not queued. Its
/// body is read and dropped first (within [`SHED_DRAIN`] and the body
/// limit, a chunk at a time): a client that sends its whole body before it
/// reads would otherwise meet a reset connection, not the 503 and its
/// `Retry-After`.
async fn admit(State(app): State<Arc<App>>, request: axum::extract::Request, next: Next) -> Response {
    match app.in_flight.clone().try_acquire_owned() {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(_) => {
            routes::discard_body(request.into_body(), app.limits.max_body_bytes, SHED_DRAIN).await;
            ApiError::unavailable("overloaded: too many requests in flight").into_response()
        }
    }
}

/// How long a refused request's body is read before the refusal is sent.
const SHED_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Counts every answer by route and status, with its duration.
async fn count(State(app): State<Arc<App>>, request: axum::extract::Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let started = Instant::now();
    app.metrics.in_flight.inc();
    let response = next.run(request).await;
    app.metrics.in_flight.dec();
    app.metrics.answered(&route, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// Serves `settings` on `listener` until `shutdown` completes: then
/// readiness turns 503, no connection is accepted, and requests in flight
/// have the drain timeout to finish. An error means a model could not be
/// loaded (the server stops: an orchestrator will show it) or the server
/// could not start.
pub async fn serve(
    listener: TcpListener,
    settings: &ServeSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (router, app) = app(settings)?;
    let addr = listener.local_addr().context("the listening socket")?;
    info!(%addr, models = settings.models.len(), "listening");
    let loading = {
        let app = app.clone();
        async move {
            for m in &app.models {
                let loaded = m.engine.ready().await.with_context(|| format!("model {:?}", m.name))?;
                info!(model = %m.name, classes = loaded.classes, "ready");
            }
            // Keep serving once everything is loaded.
            std::future::pending::<anyhow::Result<()>>().await
        }
    };
    tokio::pin!(loading, shutdown);
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(settings.limits.header_timeout);
    let outcome = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: the next accept may work.
                        warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = TowerToHyperService::new(router.clone());
                let connection = http.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, "connection: {e}");
                    }
                });
            }
            failed = &mut loading => break failed,
            () = &mut shutdown => break Ok(()),
        }
    };
    app.draining.store(true, Ordering::SeqCst);
    drop(listener);
    let drain = settings.limits.drain_timeout;
    info!("shutting down: requests in flight have {} s to finish", drain.as_secs_f64());
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!("requests still in flight after {} s were cut", drain.as_secs_f64());
    }
    if let Err(e) = &outcome {
        error!("{e:#}");
    }
    outcome
}

/// SIGTERM (what Kubernetes and docker stop send) or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    info!("signal received");
}

/// The SHA-256 of `bytes`: of API keys (compared as digests) and of uploads
/// (their identity).
fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
