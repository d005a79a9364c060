//! The Open Inference Protocol v2 (KServe's and Triton's HTTP API), for
//! clients such as `tritonclient.http`: the same engines, image slots,
//! limits, errors, result cache and usage report as `POST /v1/classify`.
//!
//! Every model takes one BYTES input, [`INPUT`], each element one encoded
//! image (JPEG, PNG...), sent after the JSON header in binary (the binary
//! tensor data extension) or base64 in the JSON (KServe's convention). Its
//! one output, [`OUTPUT`], is FP32 `[images, classes]` in class order, or,
//! with the classification extension, the top K of each image as Triton's
//! `"score:index:label"` strings.

use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::errors::ApiError;
use super::routes::{self, App, Served, classify_cached, read_body};
use crate::deadline::Deadline;
use crate::engine::{Input, Request, SourceError, WhenFull};
use crate::model::Format;
use crate::rank::Prediction;

/// The input of every model.
pub const INPUT: &str = "image";
/// The output of every model.
pub const OUTPUT: &str = "scores";
/// A model is served at one version.
const VERSION: &str = "1";
const HEADER_LENGTH: &str = "inference-header-content-length";

/// The routes but inference.
pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(routes::healthz))
        .route("/v2/health/ready", get(routes::readyz))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready))
}

/// Inference, to be put under the API key and the in-flight limit.
pub(super) fn infer_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
}

#[derive(Deserialize)]
struct ModelPath {
    name: String,
    version: Option<String>,
}

fn served(app: &App, path: Result<Path<ModelPath>, PathRejection>) -> Result<&Served, ApiError> {
    let Path(path) = path.map_err(|e| ApiError::bad_request(format!("bad path: {}", e.body_text())))?;
    let served = app.model(Some(&path.name))?;
    match path.version.as_deref() {
        None | Some(VERSION) => Ok(served),
        Some(version) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model {:?} has no version {version:?}: its only version is {VERSION}", served.name),
        )),
    }
}

fn not_ready(served: &Served) -> ApiError {
    ApiError::unavailable(format!("the model {:?} is not ready yet", served.name))
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "classifier",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["classification", "binary_tensor_data"],
    }))
}

async fn model_ready(
    State(app): State<Arc<App>>,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let served = served(&app, path)?;
    if app.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("draining: the server is shutting down"));
    }
    served.engine.loaded().ok_or_else(|| not_ready(served))?;
    Ok(Json(json!({"name": served.name, "ready": true})))
}

/// Known once the model is loaded: its classes make the output's shape.
async fn model_metadata(
    State(app): State<Arc<App>>,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let served = served(&app, path)?;
    let loaded = served.engine.loaded().ok_or_else(|| not_ready(served))?;
    let platform = match loaded.format {
        Format::Tflite => "tflite",
        Format::Onnx => "onnx",
    };
    Ok(Json(json!({
        "name": served.name,
        "versions": [VERSION],
        "platform": platform,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, loaded.classes]}],
    })))
}

/// The request's JSON header. Fields the protocol defines and this server
/// has no use for (`parameters` it does not know) are ignored, as Triton
/// hands unknown parameters to the model.
#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RequestInput>,
    outputs: Option<Vec<RequestOutput>>,
}

#[derive(Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    parameters: Option<Map<String, Value>>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RequestOutput {
    name: String,
    parameters: Option<Map<String, Value>>,
}

/// One output asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Wanted {
    /// The top K of each image, as strings, rather than every score.
    classification: Option<usize>,
    binary: bool,
}

/// An inference request, read.
#[derive(Debug)]
struct Asked {
    id: Option<String>,
    images: Vec<Bytes>,
    outputs: Vec<Wanted>,
}

async fn infer(
    State(app): State<Arc<App>>,
    path: Result<Path<ModelPath>, PathRejection>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let served = served(&app, path)?;
    let (parts, body) = request.into_parts();
    // Refused before the body is read.
    let header_length = header_length(&parts.headers)?;
    let encoding = Encoding::of(&parts.headers)?;
    let loaded = served.engine.loaded().ok_or_else(|| not_ready(served))?;
    let body = read_body(body, &app.limits).await?;
    let body = encoding.decode(body, app.limits.max_body_bytes).await?;
    let asked = parse(body, header_length, app.limits.max_sources)?;
    let request = Request {
        // Every class, ranked: the classification takes the first K, the
        // scores are put back in class order.
        top_k: loaded.classes,
        deadline: Deadline::after(app.limits.request_timeout),
        when_full: WhenFull::Refuse,
    };
    // Through the result cache and the usage report, as /v1/classify's
    // uploads: an image is known by its content.
    let outcomes = futures::future::join_all(asked.images.into_iter().enumerate().map(|(i, bytes)| {
        let app = &app;
        async move {
            let input = Input::Bytes { name: format!("{INPUT}[{i}]"), bytes };
            classify_cached(app, served, input, request).await.0
        }
    }))
    .await;
    // The server's state first: the whole request is to be tried again.
    for outcome in &outcomes {
        if let Err(e) = outcome
            && let e @ (SourceError::Overloaded | SourceError::Unavailable | SourceError::Deadline) = e.as_ref()
        {
            return Err(ApiError::unavailable(e.to_string()));
        }
    }
    let mut ranked = Vec::with_capacity(outcomes.len());
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(predictions) => ranked.push(predictions),
            Err(e) => {
                let status = match e.as_ref() {
                    SourceError::Inference(_) | SourceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::BAD_REQUEST,
                };
                return Err(ApiError::new(status, format!("input {INPUT:?} element {i}: {e}")));
            }
        }
    }
    let answer = Answer::new(&served.name, asked.id.as_deref(), &asked.outputs, &ranked, loaded.classes);
    answer.into_response()
}

/// `Inference-Header-Content-Length`: the JSON header's length when binary
/// tensors follow it.
fn header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else { return Ok(None) };
    let length = value.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok());
    length.map(Some).ok_or_else(|| {
        ApiError::bad_request(format!(
            "bad Inference-Header-Content-Length {:?}: expected the length of the JSON header in bytes",
            String::from_utf8_lossy(value.as_bytes())
        ))
    })
}

/// A compressed request body, as `tritonclient` sends with
/// `request_compression_algorithm`.
enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Result<Encoding, ApiError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(Encoding::Identity) };
        let value = String::from_utf8_lossy(value.as_bytes()).trim().to_ascii_lowercase();
        match value.as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" => Ok(Encoding::Gzip),
            "deflate" => Ok(Encoding::Deflate),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Encoding {value:?}: send gzip, deflate or an uncompressed body"),
            )),
        }
    }

    /// The body as sent, under the same size limit once decompressed.
    async fn decode(self, body: Bytes, limit: usize) -> Result<Bytes, ApiError> {
        let compressed = std::io::Cursor::new(body);
        let reader: Box<dyn Read + Send> = match self {
            Encoding::Identity => return Ok(compressed.into_inner()),
            Encoding::Gzip => Box::new(flate2::read::GzDecoder::new(compressed)),
            // HTTP's "deflate" is the zlib format.
            Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(compressed)),
        };
        let decoded = tokio::task::spawn_blocking(move || {
            let mut out = vec![];
            reader.take(limit as u64 + 1).read_to_end(&mut out).map(|_| out)
        })
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the body could not be decompressed"))?;
        match decoded {
            Ok(out) if out.len() > limit => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("decompressed body larger than the limit of {limit} bytes"),
            )),
            Ok(out) => Ok(Bytes::from(out)),
            Err(e) => Err(ApiError::bad_request(format!("cannot decompress the body: {e}"))),
        }
    }
}

/// Reads the JSON header and the binary tensors after it, if any.
fn parse(body: Bytes, header_length: Option<usize>, max_images: usize) -> Result<Asked, ApiError> {
    let (json, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(ApiError::bad_request(format!(
                "Inference-Header-Content-Length is {n}, but the body has {} bytes",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body, Bytes::new()),
    };
    let request: InferRequest =
        serde_json::from_slice(&json).map_err(|e| ApiError::bad_request(format!("bad JSON: {e}")))?;
    let input = match request.inputs.as_slice() {
        [input] => input,
        inputs => {
            return Err(ApiError::bad_request(format!(
                "{} inputs: the model takes one, {INPUT:?} (BYTES, each element an encoded image)",
                inputs.len()
            )));
        }
    };
    if input.name != INPUT {
        return Err(ApiError::bad_request(format!("unknown input {:?}: the model takes one, {INPUT:?}", input.name)));
    }
    if input.datatype != "BYTES" {
        return Err(ApiError::bad_request(format!(
            "input {INPUT:?} is {}: it must be BYTES, each element an encoded image",
            input.datatype
        )));
    }
    let count = elements(&input.shape)?;
    if count == 0 {
        return Err(ApiError::bad_request(format!("no images: the input {INPUT:?} has no elements")));
    }
    if count > max_images {
        return Err(ApiError::bad_request(format!("too many images: {count}, at most {max_images} in one request")));
    }
    let parameters = input.parameters.clone().unwrap_or_default();
    refuse_shared_memory(&parameters)?;
    let images = match (parameters.get("binary_data_size"), &input.data) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!("input {INPUT:?} has both data and binary_data_size")));
        }
        (Some(size), None) => {
            let size = size
                .as_u64()
                .and_then(|s| usize::try_from(s).ok())
                .ok_or_else(|| ApiError::bad_request(format!("bad binary_data_size {size}: expected a byte count")))?;
            if size > binary.len() {
                return Err(ApiError::bad_request(format!(
                    "input {INPUT:?} has binary_data_size {size}, but {} bytes follow the JSON header \
                     (its length is the Inference-Header-Content-Length header)",
                    binary.len()
                )));
            }
            let tensor = binary.split_to(size);
            byte_elements(tensor, count)?
        }
        (None, Some(data)) => base64_elements(data, count)?,
        (None, None) => {
            return Err(ApiError::bad_request(format!(
                "input {INPUT:?} has no data: send it in \"data\" (base64) or in binary (binary_data_size)"
            )));
        }
    };
    if images.len() != count {
        return Err(ApiError::bad_request(format!(
            "input {INPUT:?} has shape {:?}, {count} elements, but holds {}",
            input.shape,
            images.len()
        )));
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} bytes after the binary tensors: the body is longer than the header and the binary_data_size say",
            binary.len()
        )));
    }
    let parameters = request.parameters.unwrap_or_default();
    let all_binary = flag(&parameters, "binary_data_output")?.unwrap_or(false);
    let outputs = match request.outputs {
        None => vec![Wanted { classification: None, binary: all_binary }],
        Some(outputs) if outputs.is_empty() => vec![Wanted { classification: None, binary: all_binary }],
        Some(outputs) => {
            let mut seen = HashSet::new();
            let mut wanted = vec![];
            for output in outputs {
                if output.name != OUTPUT {
                    return Err(ApiError::bad_request(format!(
                        "unknown output {:?}: the model has one, {OUTPUT:?}",
                        output.name
                    )));
                }
                if !seen.insert(output.name) {
                    return Err(ApiError::bad_request(format!("the output {OUTPUT:?} is asked for twice")));
                }
                let parameters = output.parameters.unwrap_or_default();
                refuse_shared_memory(&parameters)?;
                let classification = match parameters.get("classification") {
                    None => None,
                    Some(k) => match k.as_u64() {
                        Some(0) => None,
                        Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
                        None => {
                            return Err(ApiError::bad_request(format!(
                                "bad classification {k}: expected how many classes, a whole number"
                            )));
                        }
                    },
                };
                let binary = flag(&parameters, "binary_data")?.unwrap_or(all_binary);
                wanted.push(Wanted { classification, binary });
            }
            wanted
        }
    };
    Ok(Asked { id: request.id, images, outputs })
}

/// How many elements a shape holds.
fn elements(shape: &[i64]) -> Result<usize, ApiError> {
    let bad = || ApiError::bad_request(format!("bad shape {shape:?}: expected sizes of 0 or more"));
    shape
        .iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(usize::try_from(dim).map_err(|_| bad())?).ok_or_else(bad))
}

fn flag(parameters: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match parameters.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::bad_request(format!("bad {name} {other}: expected true or false"))),
    }
}

fn refuse_shared_memory(parameters: &Map<String, Value>) -> Result<(), ApiError> {
    if parameters.contains_key("shared_memory_region") {
        return Err(ApiError::bad_request("shared memory is not supported: send the tensors in the request"));
    }
    Ok(())
}

/// A BYTES tensor in binary: each element its length (4 bytes, little
/// endian) then its bytes. Reads at most `count` elements: more is an error
/// of the shape, said by the caller.
fn byte_elements(mut tensor: Bytes, count: usize) -> Result<Vec<Bytes>, ApiError> {
    let mut elements = Vec::with_capacity(count);
    while !tensor.is_empty() && elements.len() <= count {
        let index = elements.len();
        if tensor.len() < 4 {
            return Err(ApiError::bad_request(format!(
                "input {INPUT:?} element {index}: {} bytes left where its 4-byte length was expected",
                tensor.len()
            )));
        }
        let length = u32::from_le_bytes([tensor[0], tensor[1], tensor[2], tensor[3]]) as usize;
        if length > tensor.len() - 4 {
            return Err(ApiError::bad_request(format!(
                "input {INPUT:?} element {index}: its length is {length} bytes, but {} are left",
                tensor.len() - 4
            )));
        }
        let _ = tensor.split_to(4);
        elements.push(tensor.split_to(length));
    }
    Ok(elements)
}

/// BYTES elements in JSON, base64 (nested arrays are flattened, row major).
fn base64_elements(data: &Value, count: usize) -> Result<Vec<Bytes>, ApiError> {
    let mut strings = vec![];
    flatten(data, &mut strings, count)?;
    strings
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT.decode(text).map(Bytes::from).map_err(|e| {
                ApiError::bad_request(format!("input {INPUT:?} element {i}: not base64 ({e}): send each image base64"))
            })
        })
        .collect()
}

fn flatten<'a>(data: &'a Value, out: &mut Vec<&'a str>, count: usize) -> Result<(), ApiError> {
    match data {
        Value::String(s) => out.push(s),
        Value::Array(items) => {
            for item in items {
                // One more than the shape says is enough to say it is wrong.
                if out.len() > count {
                    break;
                }
                flatten(item, out, count)?;
            }
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "input {INPUT:?} element {}: {other} is not a string: send each image base64",
                out.len()
            )));
        }
    }
    Ok(())
}

/// The response's JSON header.
#[derive(Serialize)]
struct Answer<'a> {
    model_name: &'a str,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<Output>,
    /// The binary tensors, in the order of the outputs.
    #[serde(skip)]
    binary: Vec<u8>,
}

#[derive(Serialize)]
struct Output {
    name: &'static str,
    datatype: &'static str,
    shape: [usize; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Data {
    Scores(Vec<f32>),
    Classes(Vec<String>),
}

impl<'a> Answer<'a> {
    /// `ranked`: every class of each image, best first.
    fn new(
        model: &'a str,
        id: Option<&'a str>,
        wanted: &[Wanted],
        ranked: &[Arc<Vec<Prediction>>],
        classes: usize,
    ) -> Answer<'a> {
        let mut answer = Answer { model_name: model, model_version: VERSION, id, outputs: vec![], binary: vec![] };
        for wanted in wanted {
            let (datatype, columns, data) = match wanted.classification {
                Some(k) => {
                    let k = k.min(classes);
                    let strings = ranked.iter().flat_map(|predictions| predictions.iter().take(k).map(classification));
                    ("BYTES", k, Data::Classes(strings.collect()))
                }
                None => {
                    let mut scores = vec![f32::NAN; ranked.len() * classes];
                    for (row, predictions) in scores.chunks_mut(classes.max(1)).zip(ranked) {
                        for p in predictions.iter() {
                            row[p.index] = p.score;
                        }
                    }
                    ("FP32", classes, Data::Scores(scores))
                }
            };
            let shape = [ranked.len(), columns];
            let output = if wanted.binary {
                let start = answer.binary.len();
                match &data {
                    Data::Scores(scores) => scores.iter().for_each(|s| answer.binary.extend(s.to_le_bytes())),
                    Data::Classes(strings) => {
                        for s in strings {
                            answer.binary.extend((s.len() as u32).to_le_bytes());
                            answer.binary.extend(s.as_bytes());
                        }
                    }
                }
                let binary_data_size = answer.binary.len() - start;
                Output { name: OUTPUT, datatype, shape, parameters: Some(BinarySize { binary_data_size }), data: None }
            } else {
                Output { name: OUTPUT, datatype, shape, parameters: None, data: Some(data) }
            };
            answer.outputs.push(output);
        }
        answer
    }

    /// JSON alone, or the JSON header then the binary tensors.
    fn into_response(self) -> Result<Response, ApiError> {
        let json = serde_json::to_vec(&self)
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the answer"))?;
        if self.outputs.iter().all(|o| o.parameters.is_none()) {
            return Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response());
        }
        let length = HeaderValue::from(json.len());
        let mut body = json;
        body.extend(&self.binary);
        let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
        response.headers_mut().insert(HEADER_LENGTH, length);
        Ok(response)
    }
}

/// Triton's classification string: the score as C's `%f` writes it, the
/// class index, and the label when there is one.
fn classification(p: &Prediction) -> String {
    match &p.label {
        Some(label) => format!("{:.6}:{}:{label}", p.score, p.index),
        None => format!("{:.6}:{}", p.score, p.index),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixed(elements: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![];
        for e in elements {
            out.extend((e.len() as u32).to_le_bytes());
            out.extend(*e);
        }
        out
    }

    fn binary_request(header: Value, tensor: &[u8]) -> (Bytes, usize) {
        let header = header.to_string();
        let mut body = header.clone().into_bytes();
        body.extend(tensor);
        (Bytes::from(body), header.len())
    }

    fn error(result: Result<Asked, ApiError>) -> String {
        result.map(|a| format!("{a:?}")).unwrap_err().message
    }

    #[test]
    fn binary_elements_are_read_by_their_length_prefixes() {
        let tensor = prefixed(&[b"first", b"", b"third one"]);
        let header = json!({
            "id": "42",
            "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                        "parameters": {"binary_data_size": tensor.len()}}],
            "outputs": [{"name": "scores", "parameters": {"classification": 2, "binary_data": true}}],
        });
        let (body, length) = binary_request(header, &tensor);
        let asked = parse(body, Some(length), 8).unwrap();
        assert_eq!(asked.images, [&b"first"[..], b"", b"third one"]);
        assert_eq!(asked.id.as_deref(), Some("42"));
        assert_eq!(asked.outputs, [Wanted { classification: Some(2), binary: true }]);
    }

    #[test]
    fn bad_binary_tensors_are_refused_with_where() {
        let header = |size: usize, shape: i64| {
            json!({"inputs": [{"name": "image", "shape": [shape], "datatype": "BYTES",
                               "parameters": {"binary_data_size": size}}]})
        };
        let parse_with = |tensor: &[u8], size: usize, shape: i64| {
            let (body, length) = binary_request(header(size, shape), tensor);
            error(parse(body, Some(length), 8))
        };
        // A length running past the end, a length cut short, too many or too few elements.
        let mut long = prefixed(&[b"abc"]);
        long[0] = 9;
        assert_eq!(
            parse_with(&long, long.len(), 1),
            "input \"image\" element 0: its length is 9 bytes, but 3 are left"
        );
        let mut cut = prefixed(&[b"abc"]);
        cut.extend([1, 0]);
        assert_eq!(
            parse_with(&cut, cut.len(), 2),
            "input \"image\" element 1: 2 bytes left where its 4-byte length was expected"
        );
        let two = prefixed(&[b"a", b"b"]);
        assert_eq!(parse_with(&two, two.len(), 1), "input \"image\" has shape [1], 1 elements, but holds 2");
        assert_eq!(parse_with(&two, two.len(), 3), "input \"image\" has shape [3], 3 elements, but holds 2");
        assert!(parse_with(&two, two.len() + 1, 2).starts_with("input \"image\" has binary_data_size 11, but 10"));
        let (mut body, length) = binary_request(header(two.len(), 2), &two);
        body = Bytes::from([&body[..], b"xy"].concat());
        assert!(error(parse(body, Some(length), 8)).starts_with("2 bytes after the binary tensors"));
        // Without the header length, the binary part is read as JSON.
        let (body, _) = binary_request(header(two.len(), 2), &two);
        assert!(error(parse(body, None, 8)).starts_with("bad JSON: trailing characters"));
    }

    #[test]
    fn json_elements_are_base64_and_may_be_nested() {
        let body = json!({
            "inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES", "data": [["aGVsbG8="], ["aGk"]]}],
            "parameters": {"binary_data_output": true},
            "outputs": [{"name": "scores", "parameters": {"binary_data": false}}],
        });
        let asked = parse(Bytes::from(body.to_string()), None, 8).unwrap();
        assert_eq!(asked.images, [&b"hello"[..], b"hi"]);
        assert_eq!(asked.outputs, [Wanted { classification: None, binary: false }]);
        let body = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]});
        assert!(
            error(parse(Bytes::from(body.to_string()), None, 8)).starts_with("input \"image\" element 0: not base64")
        );
        // No outputs named: every output, binary as the request's parameter says.
        let body = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                          "parameters": {"binary_data_output": true}});
        let asked = parse(Bytes::from(body.to_string()), None, 8).unwrap();
        assert_eq!(asked.outputs, [Wanted { classification: None, binary: true }]);
    }

    #[test]
    fn classification_strings_are_tritons() {
        let p = Prediction { index: 7, label: Some("Turdus migratorius".into()), score: 0.953125 };
        assert_eq!(classification(&p), "0.953125:7:Turdus migratorius");
        assert_eq!(classification(&Prediction { index: 0, label: None, score: 0.5 }), "0.500000:0");
    }

    #[test]
    fn scores_go_back_in_class_order_and_binary_follows_the_header() {
        let ranked = vec![
            vec![
                Prediction { index: 2, label: None, score: 0.75 },
                Prediction { index: 0, label: None, score: 0.25 },
                Prediction { index: 1, label: None, score: 0.0 },
            ],
            vec![
                Prediction { index: 0, label: Some("a".into()), score: 1.0 },
                Prediction { index: 1, label: Some("b".into()), score: 0.0 },
                Prediction { index: 2, label: Some("c".into()), score: 0.0 },
            ],
        ];
        let ranked: Vec<_> = ranked.into_iter().map(Arc::new).collect();
        let wanted = [Wanted { classification: None, binary: false }, Wanted { classification: Some(9), binary: true }];
        let answer = Answer::new("m", Some("x"), &wanted, &ranked, 3);
        let header = serde_json::to_value(&answer).unwrap();
        assert_eq!(header["outputs"][0]["data"], json!([0.25, 0.0, 0.75, 1.0, 0.0, 0.0]));
        assert_eq!(header["outputs"][1]["shape"], json!([2, 3]));
        let expected =
            prefixed(&[b"0.750000:2", b"0.250000:0", b"0.000000:1", b"1.000000:0:a", b"0.000000:1:b", b"0.000000:2:c"]);
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], expected.len());
        assert_eq!(answer.binary, expected);
    }
}
