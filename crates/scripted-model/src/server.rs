//! The HTTP side: routes, the real API's request checks and error shapes, the
//! credential check, and the record of what arrived.

use std::convert::Infallible;
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::script::{NO_MORE_TURNS, Script, Turn, kind};
use crate::{Error, wire};

/// The largest request body accepted: the real Messages API's limit (32 MB).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A configured stand-in, ready to be served by [`router`] or [`serve`].
#[derive(Debug, Clone)]
pub struct ScriptedModel {
    script: Arc<Script>,
    api_key: Option<String>,
    record: Option<Arc<Recorder>>,
}

impl ScriptedModel {
    /// Plays `script` to anyone: no credential is checked and nothing is recorded.
    pub fn new(script: Script) -> Self {
        Self {
            script: Arc::new(script),
            api_key: None,
            record: None,
        }
    }

    /// Accepts only requests carrying `key` (in `x-api-key`, or when that is absent as
    /// `Authorization: Bearer`, as recent official SDKs send it), answering others 401
    /// as the real API does (so a test sees which credential a client or proxy
    /// forwards).
    /// An empty key is refused: it would read as "any key" to whoever configured it.
    pub fn api_key(mut self, key: impl Into<String>) -> Result<Self, Error> {
        let key = key.into();
        if key.is_empty() {
            return Err(Error::EmptyApiKey);
        }
        self.api_key = Some(key);
        Ok(self)
    }

    /// Appends one JSON line per request to `path` (created, or made, readable by its
    /// owner only: the lines hold the credentials that arrived). The line format is in
    /// the crate docs, under "The record".
    pub fn record_to(mut self, path: &Path) -> Result<Self, Error> {
        self.record = Some(Arc::new(Recorder::open(path)?));
        Ok(self)
    }

    /// The script played.
    pub fn script(&self) -> &Script {
        &self.script
    }
}

/// The record file; one `write` per line under a lock, so lines stay whole.
#[derive(Debug)]
struct Recorder {
    path: PathBuf,
    file: Mutex<File>,
}

impl Recorder {
    fn open(path: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let fail = |source| Error::Record {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(fail)?;
        // An existing file keeps its mode on open; the credentials in it must not.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    fn append(&self, line: &Value) -> std::io::Result<()> {
        let mut text = line.to_string();
        text.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(text.as_bytes())?;
        f.flush()
    }
}

#[derive(Debug)]
struct Inner {
    model: ScriptedModel,
    /// Numbers `msg_…` and `request-id`s.
    next_id: AtomicU64,
}

/// The routes: `POST /v1/messages`, `POST /v1/messages/count_tokens`, `GET /healthz`;
/// anything else is answered in the API's error shape (404 `not_found_error`, 405 for
/// a known path with the wrong method).
pub fn router(model: ScriptedModel) -> Router {
    let state = Arc::new(Inner {
        model,
        next_id: AtomicU64::new(1),
    });
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `model` on `listener` until `shutdown` resolves, then lets requests in
/// flight (streams included) finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: ScriptedModel,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Like the real API's servers: each small SSE write goes out at once.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(model))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An answer in the API's error shape,
/// `{"type": "error", "error": {"type": ..., "message": ...}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"type": "error", "error": {"type": self.kind, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

fn api_error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        kind,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn unauthorized() -> ApiError {
    api_error(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid x-api-key",
    )
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The turn a request selects: the number of assistant messages already in it. It
/// depends on the request alone, so every conversation plays the script from its
/// start, parallel conversations do not disturb each other, and a client that resumes
/// a saved transcript gets the turn that follows it.
fn turn_index(req: &Value) -> Option<usize> {
    req["messages"].as_array().map(|ms| {
        ms.iter()
            .filter(|m| m["role"].as_str() == Some("assistant"))
            .count()
    })
}

/// Whether the request's headers carry the accepted key (always, when none is set):
/// in `x-api-key`, or, when that header is absent, as `Authorization: Bearer <key>`,
/// which is how recent official SDKs send an API key. A present `x-api-key` decides
/// alone, so a wrong one is never rescued by a right bearer.
fn authorized(model: &ScriptedModel, headers: &HeaderMap) -> bool {
    let Some(want) = &model.api_key else {
        return true;
    };
    let got = match headers.get("x-api-key") {
        Some(v) => v.as_bytes(),
        None => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default(),
    };
    // Constant time, out of habit: it costs nothing.
    got.len() == want.len()
        && got
            .iter()
            .zip(want.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The blocks of the user's turn since the last assistant message (the API joins
/// consecutive user messages into one turn, and clients use that: OpenClaw sends the
/// tool results, then a user message of its own context).
fn user_turn_blocks(req: &Value) -> Vec<&Value> {
    let Some(ms) = req["messages"].as_array() else {
        return Vec::new();
    };
    let mut turn: Vec<&Value> = ms
        .iter()
        .rev()
        .take_while(|m| m["role"].as_str() == Some("user"))
        .collect();
    turn.reverse();
    turn.into_iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .collect()
}

/// The text of each `tool_result` block in the user's turn (what the client sends
/// back after running the tools of the previous turn).
fn last_tool_results(body: &Value) -> Vec<String> {
    user_turn_blocks(body)
        .into_iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        .map(|b| match b.get("content") {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        })
        .collect()
}

/// Writes the record line for a request, if recording; a request that cannot be
/// recorded is failed (500) rather than answered, so a test reading the record never
/// misses a request silently.
fn record(
    inner: &Inner,
    path: &str,
    headers: &HeaderMap,
    body: Option<&Value>,
    turn: Option<usize>,
) -> Result<(), ApiError> {
    let Some(rec) = &inner.model.record else {
        return Ok(());
    };
    let body = body.unwrap_or(&Value::Null);
    let betas: Vec<String> = headers
        .get_all("anthropic-beta")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let line = json!({
        "path": path,
        "x_api_key": header_str(headers, "x-api-key"),
        "authorization": header_str(headers, "authorization"),
        "anthropic_version": header_str(headers, "anthropic-version"),
        "anthropic_beta": betas,
        "model": body.get("model").and_then(Value::as_str),
        "stream": body.get("stream").and_then(Value::as_bool),
        "turn": turn,
        "messages": body.get("messages").and_then(Value::as_array).map(Vec::len),
        "tools": body.get("tools").and_then(Value::as_array).map(|tools| {
            tools
                .iter()
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .collect::<Vec<_>>()
        }),
        "tool_results": last_tool_results(body),
    });
    rec.append(&line).map_err(|e| {
        tracing::error!(path = %rec.path.display(), error = %e, "cannot record a request");
        api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            format!("the scripted model cannot record the request: {e}"),
        )
    })
}

/// The body as JSON, or the API's answer to one that is not (too large, not JSON,
/// not an object).
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("Request exceeds the maximum allowed number of bytes ({MAX_BODY_BYTES})"),
            )
        } else {
            invalid(format!("cannot read the request body: {e}"))
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("The request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid(format!(
            "The request body must be a JSON object, not {}",
            kind(&v)
        )));
    }
    Ok(v)
}

/// The real API's checks on a Messages request that matter to a client: `model`,
/// `max_tokens` (unless counting tokens), a non-empty `messages` of user and assistant
/// messages with content, and a boolean `stream`. Messages are those of the real API
/// where it has one, so a client's error handling is exercised as it will be.
fn check_request(req: &Value, needs_max_tokens: bool) -> Result<(), ApiError> {
    match req.get("model") {
        Some(Value::String(_)) => {}
        None => return Err(invalid("model: Field required")),
        Some(_) => return Err(invalid("model: Input should be a valid string")),
    }
    if needs_max_tokens {
        match req.get("max_tokens") {
            None => return Err(invalid("max_tokens: Field required")),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => {}
                Some(_) => {
                    return Err(invalid(
                        "max_tokens: Input should be greater than or equal to 1",
                    ));
                }
                None => return Err(invalid("max_tokens: Input should be a valid integer")),
            },
        }
    }
    let messages = match req.get("messages") {
        Some(Value::Array(ms)) => ms,
        None => return Err(invalid("messages: Field required")),
        Some(_) => return Err(invalid("messages: Input should be a valid list")),
    };
    if messages.is_empty() {
        return Err(invalid("messages: at least one message is required"));
    }
    for (i, m) in messages.iter().enumerate() {
        match m["role"].as_str() {
            Some("user" | "assistant") => {}
            _ => {
                return Err(invalid(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )));
            }
        }
        match m.get("content") {
            Some(Value::String(_) | Value::Array(_)) => {}
            None => return Err(invalid(format!("messages.{i}.content: Field required"))),
            Some(_) => {
                return Err(invalid(format!(
                    "messages.{i}.content: Input should be a valid string or list"
                )));
            }
        }
    }
    match req.get("stream") {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err(invalid("stream: Input should be a valid boolean")),
    }
}

/// Whether the user's turn since the last assistant message carries a `tool_result`.
fn last_user_has_tool_result(req: &Value) -> bool {
    user_turn_blocks(req)
        .iter()
        .any(|b| b["type"].as_str() == Some("tool_result"))
}

async fn messages(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse_body(body);
    let index = req.as_ref().ok().and_then(turn_index);
    record(&inner, "/v1/messages", &headers, req.as_ref().ok(), index)?;
    if !authorized(&inner.model, &headers) {
        tracing::info!("401: wrong or missing API key");
        return Err(unauthorized());
    }
    let req = req?;
    check_request(&req, true)?;
    let index = index.unwrap_or(0);
    let past_end;
    let turn = match inner.model.script.turn(index) {
        Some(t) => t,
        None => {
            past_end = Turn {
                text: Some(NO_MORE_TURNS.into()),
                ..Turn::default()
            };
            &past_end
        }
    };
    if turn.expect_tool_result && !last_user_has_tool_result(&req) {
        tracing::info!(
            turn = index,
            "400: no tool_result where the script expects one"
        );
        return Err(invalid(format!(
            "turn {} of the script expects a tool_result block in the last user message, and there is none: the client did not send back the result of the tool call",
            index + 1
        )));
    }
    if !turn.delay.is_zero() {
        tokio::time::sleep(turn.delay).await;
    }
    let n = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("msg_scripted_{n:06}");
    let model = req["model"].as_str().unwrap_or_default();
    let answer = wire::Answer {
        id: &id,
        model,
        turn_index: index,
        input_tokens: wire::input_tokens(&req),
    };
    let stream = req["stream"].as_bool() == Some(true);
    tracing::info!(turn = index, stream, model, "answering");
    let request_id = format!("req_scripted_{n:06}");
    if !stream {
        let mut r = axum::Json(wire::message(&answer, turn)).into_response();
        if let Ok(v) = request_id.parse() {
            r.headers_mut().insert("request-id", v);
        }
        return Ok(r);
    }
    let frames = wire::stream_frames(&answer, turn)
        .into_iter()
        .map(|f| Ok::<_, Infallible>(Bytes::from(f)));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("request-id", request_id)
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .map_err(|e| {
            api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                format!("cannot build the stream: {e}"),
            )
        })
}

async fn count_tokens(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse_body(body);
    let path = "/v1/messages/count_tokens";
    record(&inner, path, &headers, req.as_ref().ok(), None)?;
    if !authorized(&inner.model, &headers) {
        return Err(unauthorized());
    }
    let req = req?;
    check_request(&req, false)?;
    Ok(axum::Json(json!({"input_tokens": wire::input_tokens(&req)})).into_response())
}

async fn not_found(State(inner): State<Arc<Inner>>, uri: Uri, headers: HeaderMap) -> ApiError {
    if let Err(e) = record(&inner, uri.path(), &headers, None, None) {
        return e;
    }
    api_error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("Not found: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("Method {method} not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{last_tool_results, last_user_has_tool_result};

    #[test]
    fn a_tool_result_counts_anywhere_in_the_user_turn() {
        let result = json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]});
        let context = json!({"role": "user", "content": [{"type": "text", "text": "context"}]});
        let call = json!({"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "write", "input": {}}]});
        let task = json!({"role": "user", "content": "do it"});
        // OpenClaw's shape: results, then its own context message, in one user turn.
        assert!(last_user_has_tool_result(
            &json!({"messages": [task, call, result, context]})
        ));
        assert!(last_user_has_tool_result(
            &json!({"messages": [task, call, result]})
        ));
        // A result from an earlier turn does not answer this one.
        let answer = json!({"role": "assistant", "content": [{"type": "text", "text": "done"}]});
        assert!(!last_user_has_tool_result(
            &json!({"messages": [task, call, result, answer, context]})
        ));
        assert!(!last_user_has_tool_result(&json!({"messages": [task]})));
    }

    #[test]
    fn the_record_has_the_results_of_the_whole_user_turn() {
        let call = json!({"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]});
        let blocks = json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]});
        let plain = json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "u", "content": "c"}]});
        let context = json!({"role": "user", "content": [{"type": "text", "text": "context"}]});
        assert_eq!(
            last_tool_results(&json!({"messages": [call, blocks, plain, context]})),
            ["a\nb", "c"]
        );
        let answer = json!({"role": "assistant", "content": "done"});
        assert!(
            last_tool_results(&json!({"messages": [call, blocks, answer, context]})).is_empty()
        );
    }
}
