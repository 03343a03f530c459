//! The agent API of a running VM, reached through the launcher: each request is passed
//! to the VM's agent runtime (guest port 18789, over the VM's vsock) and its answer,
//! streamed or not, is passed back. The orchestrator, the control plane and
//! `clawos agent` all drive every runtime this one way.
//!
//! Before each request the guest agent is asked which runtime it runs
//! ([`Op::Runtime`](clawos_guest_protocol::frames::Op::Runtime)). A runtime with a
//! per-boot gateway token gets it as `Authorization: Bearer` (it is never logged and
//! never answered). The built-in runtime (`clawos-agentd`) speaks the agent API itself
//! and gets each request unchanged; a guest too old to know the operation runs it.
//! OpenClaw's gateway gets the request adapted ([`adapt_openclaw_request`]): its agent
//! as the model (the LLM was chosen at the VM's start), the ClawOS session as its
//! session key; its answer gets the session back in [`SESSION_HEADER`], and a non-stream
//! answer the fields the agent API defines ([`complete_openclaw_answer`]). OpenClaw
//! keeps its sessions in its own state and does not list them.

use std::fmt;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use clawos_agentd_api::{SESSION_HEADER, TOOL_EVENTS_HEADER};
use clawos_guest_protocol::frames::{GATEWAY_PORT, RuntimeInfo};
use clawos_service::http::ErrorResponse;
use http_body_util::BodyExt;
use serde_json::{Map, Value};

use crate::LauncherError;
use crate::http::AppState;
use crate::vsock::{GuestClient, VsockError};

/// Largest request the launcher passes on (the runtime's own limit).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest non-stream answer of OpenClaw the launcher completes (it is read whole).
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
/// The built-in runtime's name.
pub const BUILTIN_RUNTIME: &str = "clawos-agentd";
/// OpenClaw's name, as its image and its guest report it.
pub const OPENCLAW: &str = "openclaw";
/// The `model` OpenClaw's gateway requires: it picks OpenClaw's agent, not the LLM.
pub const OPENCLAW_MODEL: &str = "openclaw/default";
/// The request header carrying OpenClaw's session key.
pub const OPENCLAW_SESSION_HEADER: &str = "x-openclaw-session-key";

/// Why the agent could not be asked.
fn unreachable(vm: &str, detail: impl fmt::Display) -> ErrorResponse {
    ErrorResponse::new(
        StatusCode::BAD_GATEWAY,
        clawos_api::code::UNAVAILABLE,
        format!(
            "the agent runtime of VM {vm} did not answer on guest port {GATEWAY_PORT}: {detail}"
        ),
    )
}

/// A runtime's per-boot gateway token: shown to nothing but the runtime.
struct GatewayToken(String);

impl fmt::Debug for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayToken(<redacted>)")
    }
}

/// The agent runtime a VM runs, as its guest agent reports it.
#[derive(Debug)]
struct Runtime {
    name: String,
    version: String,
    token: Option<GatewayToken>,
}

impl Runtime {
    /// What a guest that predates [`Op::Runtime`](clawos_guest_protocol::frames::Op)
    /// runs: the built-in runtime, without a token.
    fn unreported() -> Self {
        Self {
            name: BUILTIN_RUNTIME.to_owned(),
            version: "unreported".to_owned(),
            token: None,
        }
    }

    fn reported(info: RuntimeInfo) -> Self {
        Self {
            name: info.name,
            version: info.version,
            token: info.gateway_token.map(GatewayToken),
        }
    }

    fn is_openclaw(&self) -> bool {
        self.name == OPENCLAW
    }
}

/// Asks the guest which runtime it runs. An error answer is a guest that does not know
/// the question (the built-in runtime); no answer at all is a broken control channel.
///
/// `signed` is the runtime the VM's signed image names (`None`: the built-in one). For
/// such a VM the guest must answer, and name that runtime: falling back to the built-in
/// runtime would send the caller's request to OpenClaw unadapted and without its token.
async fn runtime_of(
    vm: &str,
    guest: &GuestClient,
    signed: Option<&str>,
) -> Result<Runtime, ErrorResponse> {
    let refused = |detail: String| {
        ErrorResponse::new(
            StatusCode::BAD_GATEWAY,
            clawos_api::code::UNAVAILABLE,
            format!("the guest agent of VM {vm} did not say which agent runtime it runs: {detail}"),
        )
    };
    match (guest.runtime().await, signed) {
        (Ok(info), Some(name)) if info.name != name => Err(refused(format!(
            "it reports {:?}, its image runs {name:?}",
            info.name
        ))),
        (Ok(info), _) => Ok(Runtime::reported(info)),
        (Err(e), Some(name)) => Err(refused(format!("{e} (its image runs {name})"))),
        (Err(VsockError::Guest(message)), None) => {
            tracing::debug!(vm, guest = %message, "guest does not report its agent runtime; taking the built-in one");
            Ok(Runtime::unreported())
        }
        (Err(e), None) => Err(refused(e.to_string())),
    }
}

/// Why a request cannot be adapted to OpenClaw's gateway (400 each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdaptError {
    /// The body is not a JSON object, or a field has the wrong type.
    #[error("malformed agent request: {0}")]
    Malformed(String),
    /// The task names a model: an OpenClaw VM's LLM is fixed at its start.
    #[error(
        "the model of an openclaw VM is chosen at start (clawos vm start --model); \
         leave --model out of the task (it asked for {0:?})"
    )]
    Model(String),
    /// The session id is not one the agent API accepts.
    #[error("invalid session id {0:?}: 1-64 characters of a-z 0-9 -")]
    BadSession(String),
    /// The body's `session` and the session header name different sessions.
    #[error("the body's session {body:?} and the x-clawos-session header {header:?} differ")]
    SessionsDiffer { body: String, header: String },
}

impl From<AdaptError> for LauncherError {
    fn from(e: AdaptError) -> Self {
        Self::Invalid(e.to_string())
    }
}

/// A chat request as OpenClaw's gateway takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapted {
    /// The body to send.
    pub body: Vec<u8>,
    /// The session: its key for OpenClaw, and what the answer's [`SESSION_HEADER`] says.
    pub session: String,
}

/// Whether `model` leaves the choice to the runtime (the agent API's "absent, empty or
/// `default`", or OpenClaw's own agent).
fn model_is_the_runtimes(model: Option<&Value>) -> Result<bool, AdaptError> {
    match model {
        None | Some(Value::Null) => Ok(true),
        Some(Value::String(m)) => Ok(matches!(m.as_str(), "" | "default" | OPENCLAW_MODEL)),
        Some(other) => Err(AdaptError::Malformed(format!(
            "model must be a string, not {other}"
        ))),
    }
}

/// Adapts an agent-API chat request to OpenClaw's gateway: a `model` other than the
/// runtime's own is refused, then set to [`OPENCLAW_MODEL`]; the session — the body's
/// `session` or the `x-clawos-session` header (`header_session`), else a new one from
/// `new_session` — becomes the body's `user` (and the caller's
/// [`OPENCLAW_SESSION_HEADER`]); the agent API's own fields (`session`, `tool_events`)
/// are taken out.
pub fn adapt_openclaw_request(
    body: &[u8],
    header_session: Option<&str>,
    new_session: impl FnOnce() -> String,
) -> Result<Adapted, AdaptError> {
    let mut req: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(AdaptError::Malformed(
                "the body is not a JSON object".into(),
            ));
        }
        Err(e) => return Err(AdaptError::Malformed(e.to_string())),
    };
    if !model_is_the_runtimes(req.get("model"))? {
        let asked = req.get("model").and_then(Value::as_str).unwrap_or_default();
        return Err(AdaptError::Model(asked.to_owned()));
    }
    let body_session = match req.remove("session") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(AdaptError::Malformed(format!(
                "session must be a string, not {other}"
            )));
        }
    };
    let session = match (body_session, header_session) {
        (Some(b), Some(h)) if b != h => {
            return Err(AdaptError::SessionsDiffer {
                body: b,
                header: h.to_owned(),
            });
        }
        (Some(s), _) => s,
        (None, Some(h)) => h.to_owned(),
        (None, None) => new_session(),
    };
    if !clawos_agentd_api::is_valid_session_id(&session) {
        return Err(AdaptError::BadSession(session));
    }
    req.remove("tool_events");
    req.insert("model".into(), OPENCLAW_MODEL.into());
    req.insert("user".into(), session.clone().into());
    let body = serde_json::to_vec(&Value::Object(req))
        .map_err(|e| AdaptError::Malformed(e.to_string()))?;
    Ok(Adapted { body, session })
}

/// Completes OpenClaw's non-stream answer to what the agent API defines (a
/// `ChatCompletion`): the `session` it ran in, an empty `clawos` report (OpenClaw does
/// not report its steps), zero `usage` when it gives none, a missing message text as
/// empty. `None` when the body is not a JSON object (it is then passed as it is).
pub fn complete_openclaw_answer(body: &[u8], session: &str) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    answer.insert("session".into(), session.into());
    // The launcher's report, not one the gateway may have sent.
    answer.insert(
        "clawos".into(),
        serde_json::json!({ "steps": 0, "tool_calls": [] }),
    );
    if answer.get("usage").is_none_or(Value::is_null) {
        answer.insert(
            "usage".into(),
            serde_json::json!({ "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 }),
        );
    }
    answer
        .entry("object")
        .or_insert_with(|| "chat.completion".into());
    answer
        .entry("model")
        .or_insert_with(|| OPENCLAW_MODEL.into());
    if let Some(Value::Array(choices)) = answer.get_mut("choices") {
        for c in choices {
            if let Some(Value::Object(m)) = c.get_mut("message")
                && m.get("content").is_none_or(Value::is_null)
            {
                m.insert("content".into(), "".into());
            }
        }
    }
    serde_json::to_vec(&Value::Object(answer)).ok()
}

/// A new session id, shaped as the built-in runtime makes them (16 hex digits).
fn new_session_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut buf = [0u8; 8];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(n).ok() != Some(buf.len()) {
        // Unique, if not unpredictable: a session id is a name, not a secret.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mix = nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        buf = mix.to_le_bytes();
    }
    hex::encode(buf)
}

/// Which agent-API call is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Chat,
    Sessions,
}

impl Call {
    fn method(self) -> Method {
        match self {
            Self::Chat => Method::POST,
            Self::Sessions => Method::GET,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Chat => clawos_agentd_api::CHAT_COMPLETIONS_PATH,
            Self::Sessions => clawos_agentd_api::SESSIONS_PATH,
        }
    }
}

/// What goes to the runtime for one call.
#[derive(Debug)]
struct Prepared {
    headers: HeaderMap,
    body: axum::body::Bytes,
    /// The session the launcher chose (OpenClaw), answered back in [`SESSION_HEADER`].
    session: Option<String>,
}

/// The request `runtime` gets for `call`, from the client's `headers` and `body`.
fn prepare(
    vm: &str,
    runtime: &Runtime,
    call: Call,
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> Result<Prepared, LauncherError> {
    let mut out = HeaderMap::new();
    out.insert(header::HOST, HeaderValue::from_static("127.0.0.1"));
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(GatewayToken(t)) = &runtime.token {
        let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
            LauncherError::Internal(format!(
                "the gateway token VM {vm}'s guest reported is not a valid header value"
            ))
        })?;
        v.set_sensitive(true);
        out.insert(header::AUTHORIZATION, v);
    }
    if !runtime.is_openclaw() {
        for name in [SESSION_HEADER, TOOL_EVENTS_HEADER] {
            if let Some(v) = headers.get(name) {
                out.insert(HeaderName::from_static(name), v.clone());
            }
        }
        return Ok(Prepared {
            headers: out,
            body,
            session: None,
        });
    }
    if call == Call::Sessions {
        return Err(LauncherError::Conflict(format!(
            "VM {vm} runs the openclaw agent runtime, which keeps its sessions in its own \
             state under /workspace/.openclaw and does not list them through the agent API"
        )));
    }
    let header_session = match headers.get(SESSION_HEADER) {
        Some(v) => Some(v.to_str().map_err(|_| {
            AdaptError::BadSession(String::from_utf8_lossy(v.as_bytes()).into_owned())
        })?),
        None => None,
    };
    let adapted = adapt_openclaw_request(&body, header_session, new_session_id)?;
    let key = HeaderValue::from_str(&adapted.session)
        .map_err(|_| AdaptError::BadSession(adapted.session.clone()))?;
    out.insert(HeaderName::from_static(OPENCLAW_SESSION_HEADER), key);
    Ok(Prepared {
        headers: out,
        body: adapted.body.into(),
        session: Some(adapted.session),
    })
}

/// Sends one request to the VM's runtime and gives back its response as it streams.
async fn pass(
    l: &AppState,
    vm: &str,
    call: Call,
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ErrorResponse> {
    let guest = l.guest(vm, "talk to the agent of")?;
    let signed = l.get(vm).ok().and_then(|v| v.agent_runtime);
    let runtime = runtime_of(vm, &guest, signed.as_deref()).await?;
    let prepared = prepare(vm, &runtime, call, headers, body).inspect_err(|e| {
        tracing::info!(vm, runtime = %runtime.name, request = call.path(), error = %e, "agent request refused");
    })?;
    let (reader, writer) = guest
        .connect(GATEWAY_PORT)
        .await
        .map_err(|e| unreachable(vm, e))?;
    let io = hyper_util::rt::TokioIo::new(tokio::io::join(reader, writer));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(vm, e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(call.method())
        .uri(call.path())
        .body(http_body_util::Full::new(prepared.body))
        .map_err(|e| ErrorResponse::internal(e.to_string()))?;
    *req.headers_mut() = prepared.headers;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(vm, e))?;
    let (parts, incoming) = resp.into_parts();
    let session = match &prepared.session {
        Some(s) => HeaderValue::from_str(s).ok(),
        None => parts.headers.get(SESSION_HEADER).cloned(),
    };
    tracing::info!(
        vm,
        runtime = %runtime.name,
        version = %runtime.version,
        request = call.path(),
        status = parts.status.as_u16(),
        session = session.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
        "agent request"
    );
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = match &prepared.session {
        // OpenClaw's whole answer, completed to the agent API's.
        Some(s) if runtime.is_openclaw() && parts.status.is_success() && json => {
            let bytes = http_body_util::Limited::new(incoming, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(vm, e))?
                .to_bytes();
            match complete_openclaw_answer(&bytes, s) {
                Some(completed) => Body::from(completed),
                None => Body::from(bytes),
            }
        }
        _ => Body::new(incoming),
    };
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(v) = session {
        out.headers_mut().insert(SESSION_HEADER, v);
    }
    out.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(out)
}

/// `POST /v1/vms/{name}/agent/chat/completions`.
pub async fn chat(
    State(l): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ErrorResponse> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(LauncherError::Invalid(format!(
            "agent request of {} bytes is over the {MAX_REQUEST_BYTES}-byte limit",
            body.len()
        ))
        .into());
    }
    pass(&l, &name, Call::Chat, &headers, body).await
}

/// `GET /v1/vms/{name}/agent/sessions`.
pub async fn sessions(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ErrorResponse> {
    pass(
        &l,
        &name,
        Call::Sessions,
        &HeaderMap::new(),
        axum::body::Bytes::new(),
    )
    .await
}

#[cfg(test)]
mod tests;
