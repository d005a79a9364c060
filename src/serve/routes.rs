//! The routes: what each takes and answers. `POST /v1/classify` reads the
//! whole body (under the size and time limits) before anything else, then
//! hands every source to its model's engine at once and answers the records
//! in request order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::cache::{self, ResultCache};
use super::errors::ApiError;
use super::identity::Identity;
use super::metrics::ServeMetrics;
use super::settings::Limits;
use super::usage::{self, Usage};
use crate::deadline::Deadline;
use crate::engine::{Engine, Input, Request, SourceError, WhenFull};
use crate::input::Source;
use crate::render::{Outcome, Record};

/// The name a raw image body goes by in its record.
pub const UPLOAD_NAME: &str = "upload";

pub struct Served {
    pub name: String,
    pub engine: Engine,
    /// The input size known before the model loads (the default model's).
    pub input: Option<(u32, u32)>,
}

/// What every request shares.
pub struct App {
    /// The default first.
    pub models: Vec<Served>,
    pub limits: Limits,
    /// Images downloading, over all requests (`--concurrency`).
    pub downloads: Arc<Semaphore>,
    /// Images downloaded or uploaded and not yet queued for inference, over
    /// all requests (twice `--concurrency`): a download's slot is free once
    /// its body is in, so that images waiting for a decoder do not stop the
    /// next downloads.
    pub images: Arc<Semaphore>,
    pub draining: AtomicBool,
    pub metrics: ServeMetrics,
    pub cache: ResultCache,
    pub usage: Usage,
    /// Sources in a usage report when the request does not say.
    pub usage_top: usize,
    /// Requests to classify or infer being answered, over both protocols.
    pub in_flight: Arc<Semaphore>,
}

impl App {
    pub(super) fn model(&self, name: Option<&str>) -> Result<&Served, ApiError> {
        match name {
            None => Ok(&self.models[0]),
            Some(name) => self.models.iter().find(|m| m.name == name).ok_or_else(|| {
                let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("unknown model {name:?}; the models are {}", names.join(", ")),
                )
            }),
        }
    }
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        return ApiError::unavailable("draining: the server is shutting down").into_response();
    }
    let loading: Vec<&str> =
        app.models.iter().filter(|m| m.engine.loaded().is_none()).map(|m| m.name.as_str()).collect();
    if !loading.is_empty() {
        return ApiError::unavailable(format!("not ready: loading {}", loading.join(", "))).into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let models: Vec<Value> = app
        .models
        .iter()
        .map(|m| {
            let loaded = m.engine.loaded();
            let input = loaded.as_ref().map(|l| (l.input.width, l.input.height)).or(m.input);
            json!({
                "name": m.name,
                "classes": loaded.as_ref().map(|l| l.classes),
                "input": input.map(|(width, height)| json!({"width": width, "height": height})),
                "ready": loaded.is_some(),
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    match app.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics").into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    top: Option<usize>,
}

pub async fn usage(
    State(app): State<Arc<App>>,
    query: Result<axum::extract::Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<usage::Report>, ApiError> {
    let query = query.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let top = match query.top {
        None => app.usage_top,
        Some(top) if (1..=usage::TRACKED).contains(&top) => top,
        Some(top) => return Err(ApiError::bad_request(format!("bad top {top}: expected 1 to {}", usage::TRACKED))),
    };
    Ok(Json(app.usage.report(top)))
}

/// The routes' contract, written once here and checked against the router
/// by the tests.
pub const OPENAPI: &str = include_str!("openapi.json");

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {method} {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} does not take {method}", uri.path()))
}

/// A classify request, whatever its body.
struct Asked {
    inputs: Vec<(String, Result<Input, String>)>,
    top_k: Option<usize>,
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBody {
    sources: Option<Vec<String>>,
    top_k: Option<Value>,
    model: Option<String>,
}

pub async fn classify(State(app): State<Arc<App>>, request: axum::extract::Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let query: HashMap<String, String> = axum::extract::Query::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let kind = content_type(&parts.headers);
    // Refused before its body is read.
    let supported = matches!(kind.as_str(), "application/json" | "multipart/form-data" | "application/octet-stream")
        || kind.starts_with("image/");
    if !supported {
        let given = if kind.is_empty() { "none".to_string() } else { kind };
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported content type ({given}): send application/json, multipart/form-data, image/* or application/octet-stream"
            ),
        ));
    }
    let bytes = read_body(body, &app.limits).await?;
    let mut asked = match kind.as_str() {
        "application/json" => from_json(&bytes)?,
        "multipart/form-data" => {
            let request = axum::extract::Request::from_parts(parts.clone(), Body::from(bytes));
            from_multipart(request).await?
        }
        _ => {
            if bytes.is_empty() {
                return Err(ApiError::bad_request("no sources: the body is empty; send the image as the body"));
            }
            let input = Input::Bytes { name: UPLOAD_NAME.into(), bytes };
            Asked { inputs: vec![(UPLOAD_NAME.into(), Ok(input))], top_k: None, model: None }
        }
    };
    if asked.top_k.is_none()
        && let Some(top_k) = query.get("top_k")
    {
        asked.top_k = Some(parse_top_k(top_k)?);
    }
    if asked.model.is_none() {
        asked.model = query.get("model").cloned();
    }
    if asked.inputs.is_empty() {
        return Err(ApiError::bad_request("no sources: give at least one URL in \"sources\", or one file"));
    }
    if asked.inputs.len() > app.limits.max_sources {
        return Err(ApiError::bad_request(format!(
            "too many sources: {}, at most {} in one request",
            asked.inputs.len(),
            app.limits.max_sources
        )));
    }
    let served = app.model(asked.model.as_deref())?;
    if served.engine.loaded().is_none() {
        return Err(ApiError::unavailable(format!("the model {:?} is not ready yet", served.name)));
    }
    let request = Request {
        top_k: asked.top_k.unwrap_or(app.limits.top_k),
        deadline: Deadline::after(app.limits.request_timeout),
        when_full: WhenFull::Refuse,
    };
    let outcomes: Vec<(cache::Shared, bool)> = futures::future::join_all(asked.inputs.iter().map(|(given, input)| {
        let (app, served) = (&app, served);
        async move {
            match input {
                Ok(input) => classify_cached(app, served, input.clone(), request).await,
                Err(reason) => {
                    app.usage.record(usage::cut(given.clone()), std::time::Duration::ZERO, true);
                    (Err(Arc::new(SourceError::Invalid(reason.clone()))), false)
                }
            }
        }
    }))
    .await;
    // A full queue or a model gone is the server's state, not the source's:
    // the whole request is to be tried again.
    for (outcome, _) in &outcomes {
        if let Err(e) = outcome
            && matches!(e.as_ref(), SourceError::Overloaded | SourceError::Unavailable)
        {
            return Err(ApiError::unavailable(e.to_string()));
        }
    }
    let results: Vec<Record> = asked
        .inputs
        .iter()
        .zip(&outcomes)
        .map(|((source, _), (outcome, cached))| {
            let outcome = outcome.as_ref().map(|p| p.as_slice()).map_err(|e| e.as_ref());
            Record::of(source, outcome, *cached)
        })
        .collect();
    Ok(Json(Answer { model: &served.name, results }).into_response())
}

/// A typed answer keeps the records' fields in the command line's order.
#[derive(Serialize)]
struct Answer<'a> {
    model: &'a str,
    results: Vec<Record<'a>>,
}

/// One image through the result cache (by model, source and `top_k`),
/// counted in the usage report, from its identity's hash to its outcome
/// (a cached answer takes microseconds), and in the cache's metrics; and
/// whether it came from the cache.
pub(super) async fn classify_cached(
    app: &App,
    served: &Served,
    input: Input,
    request: Request,
) -> (cache::Shared, bool) {
    let started = std::time::Instant::now();
    let identity = Identity::of(&input);
    let key = cache::Key::new(&served.name, &identity, request.top_k);
    let classify = classify_one(app, &served.engine, input, request);
    let (outcome, cached) = app.cache.get_or_classify(key, classify).await;
    app.usage.record(usage::cut(identity.name()), started.elapsed(), outcome.is_err());
    if app.cache.is_on() {
        let counter = if cached { &app.metrics.cache_hits } else { &app.metrics.cache_misses };
        counter.inc();
    }
    (outcome, cached)
}

/// One image: it holds one of the server's image slots until it is queued
/// for inference (or fails), and one of its download slots while its body
/// comes in, as the command line's `--concurrency` does.
pub(super) async fn classify_one(app: &App, engine: &Engine, input: Input, request: Request) -> Outcome {
    let counted = |e: SourceError| {
        engine.failed(&e);
        e
    };
    let image = slot(&app.images, request.deadline).await.map_err(counted)?;
    let input = match input {
        Input::Source(source) => {
            let download = slot(&app.downloads, request.deadline).await.map_err(counted)?;
            let bytes = engine.fetch(&source, request).await?;
            drop(download);
            Input::Bytes { name: source.to_string(), bytes }
        }
        bytes @ Input::Bytes { .. } => bytes,
    };
    let queued = engine.submit(input, request).await;
    drop(image);
    queued?.predictions().await
}

async fn slot(slots: &Arc<Semaphore>, deadline: Deadline) -> Result<OwnedSemaphorePermit, SourceError> {
    let slot = slots.clone().acquire_owned();
    let slot = match deadline.instant() {
        Some(at) => tokio::time::timeout_at(at.into(), slot).await.map_err(|_| SourceError::Deadline)?,
        None => slot.await,
    };
    slot.map_err(|_| SourceError::Unavailable)
}

/// The media type, lowercase, without its parameters.
fn content_type(headers: &HeaderMap) -> String {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Reads and drops up to `limit` bytes of `body` within `within`, holding
/// one chunk at a time.
pub(super) async fn discard_body(body: Body, limit: usize, within: std::time::Duration) {
    use futures::StreamExt;
    let mut chunks = body.into_data_stream();
    let _ = tokio::time::timeout(within, async {
        let mut read = 0;
        while let Some(Ok(chunk)) = chunks.next().await {
            read += chunk.len();
            if read > limit {
                break;
            }
        }
    })
    .await;
}

pub(super) async fn read_body(body: Body, limits: &Limits) -> Result<Bytes, ApiError> {
    let limit = limits.max_body_bytes;
    let read = tokio::time::timeout(limits.body_timeout, Limited::new(body, limit).collect()).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body was not received within {} s", limits.body_timeout.as_secs_f64()),
        )
    })?;
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("body larger than the limit of {limit} bytes")))
        }
        Err(e) => Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
    }
}

fn parse_top_k(text: &str) -> Result<usize, ApiError> {
    match text.trim().parse::<usize>() {
        Ok(k) if k >= 1 => Ok(k),
        _ => Err(bad_top_k(text)),
    }
}

fn bad_top_k(given: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("bad top_k {given}: expected a whole number, 1 or more"))
}

fn from_json(bytes: &[u8]) -> Result<Asked, ApiError> {
    let body: JsonBody = serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("bad JSON: {e}")))?;
    let top_k = match body.top_k {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k) if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            _ => return Err(bad_top_k(n)),
        },
        Some(other) => return Err(bad_top_k(other)),
    };
    let inputs = body
        .sources
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let input = Source::parse(&s).map(Input::Source).map_err(|e| e.reason);
            (s, input)
        })
        .collect();
    Ok(Asked { inputs, top_k, model: body.model })
}

async fn from_multipart(request: axum::extract::Request) -> Result<Asked, ApiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request(format!("bad multipart body: {}", e.body_text()))
    };
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request(format!("bad multipart body: {}", e.body_text())))?;
    let mut asked = Asked { inputs: vec![], top_k: None, model: None };
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        match field.file_name().map(str::to_string) {
            Some(file_name) => {
                let bytes = field.bytes().await.map_err(bad)?;
                asked.inputs.push((file_name.clone(), Ok(Input::Bytes { name: file_name, bytes })));
            }
            None if name == "top_k" => asked.top_k = Some(parse_top_k(&field.text().await.map_err(bad)?)?),
            None if name == "model" => asked.model = Some(field.text().await.map_err(bad)?.trim().to_string()),
            None => {
                return Err(ApiError::bad_request(format!(
                    "unexpected field {name:?}: send images as file parts, and only the fields top_k and model"
                )));
            }
        }
    }
    Ok(asked)
}
