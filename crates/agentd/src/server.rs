//! The agent API over HTTP/1.1: routing, the OpenAI-compatible chat endpoint (JSON or
//! an event stream), the session listing. Wire types are `clawos_agentd_api`'s.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use clawos_agentd_api::{
    self as api, AssistantMessage, ChatChunk, ChatCompletion, ChatRequest, Choice, ChunkChoice,
    Delta, ErrorBody, Health, SessionList, TaskReport, code,
};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::agent::{Agent, TaskError, TaskEvent, TaskOutcome, TaskSpec};
use crate::session::SessionError;
use crate::{log, random_hex, unix_now};

/// Frames of a streaming answer buffered ahead of a slow client.
const STREAM_BUFFER: usize = 64;

/// An answer's body: all at once, or frames from a channel (an event stream).
#[derive(Debug)]
pub enum OutBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct State {
    pub agent: Agent,
    /// Becomes `true` when the runtime shuts down; running tasks stop.
    pub shutdown: watch::Receiver<bool>,
    /// Held by every running task, so shutdown can wait for them to be gone.
    pub tasks_alive: mpsc::Sender<()>,
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<OutBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(OutBody::Full(Some(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            429 => "rate_limit_error",
            502 => "upstream_error",
            422 => "task_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        Self {
            status,
            body: ErrorBody::new(kind, code, message),
        }
    }

    fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn response(&self) -> Response<OutBody> {
        json_response(self.status, &self.body)
    }
}

impl From<&TaskError> for ApiError {
    fn from(e: &TaskError) -> Self {
        let msg = e.to_string();
        match e {
            TaskError::Model(m) if m.status() == Some(429) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, code::RATE_LIMITED, msg)
            }
            TaskError::Model(_) => Self::new(StatusCode::BAD_GATEWAY, code::MODEL_ERROR, msg),
            TaskError::StepLimit { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, code::STEP_LIMIT, msg)
            }
            TaskError::TimeLimit { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, code::TIME_LIMIT, msg)
            }
            TaskError::Session(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, code::SESSION_ERROR, msg)
            }
            TaskError::Shutdown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, code::SHUTTING_DOWN, msg)
            }
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::BadId(_) => Self::bad_request(code::BAD_SESSION_ID, e.to_string()),
            SessionError::Busy { .. } => {
                Self::new(StatusCode::CONFLICT, code::SESSION_BUSY, e.to_string())
            }
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code::SESSION_ERROR,
                e.to_string(),
            ),
        }
    }
}

/// Answers one request.
pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<OutBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = match (method.clone(), path.as_str()) {
        (Method::GET, api::HEALTHZ_PATH) => json_response(
            StatusCode::OK,
            &Health {
                status: "ok".into(),
                model: state.agent.config.model.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
        ),
        (Method::GET, api::SESSIONS_PATH) => match state.agent.sessions.list() {
            Ok(sessions) => json_response(StatusCode::OK, &SessionList { sessions }),
            Err(e) => ApiError::from(e).response(),
        },
        (Method::POST, api::CHAT_COMPLETIONS_PATH) => match chat(&state, req).await {
            Ok(r) => r,
            Err((e, session)) => {
                let mut r = e.response();
                if let Some(id) = session.and_then(|s| HeaderValue::from_str(&s).ok()) {
                    r.headers_mut().insert(api::SESSION_HEADER, id);
                }
                r
            }
        },
        (_, api::HEALTHZ_PATH | api::SESSIONS_PATH | api::CHAT_COMPLETIONS_PATH) => {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                code::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            )
            .response()
        }
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!(
                "no route {path}: the routes are GET /healthz, POST /v1/chat/completions, GET /v1/sessions"
            ),
        )
        .response(),
    };
    if path != api::HEALTHZ_PATH {
        log!(
            "http {method} {path} status={} ms={}",
            resp.status().as_u16(),
            started.elapsed().as_millis()
        );
    }
    resp
}

/// Reads a body of at most [`api::MAX_REQUEST_BYTES`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::BODY_TOO_LARGE,
            format!("request body over {} bytes (1 MiB)", api::MAX_REQUEST_BYTES),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > api::MAX_REQUEST_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), api::MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(
            code::MALFORMED_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
    }
}

type ChatError = (ApiError, Option<String>);

/// `POST /v1/chat/completions`: checks the request, takes the session and starts the
/// task, which runs to its end even if the client goes away (its work and transcript
/// are the point; a client can pick the result up from the session).
async fn chat(state: &Arc<State>, req: Request<Incoming>) -> Result<Response<OutBody>, ChatError> {
    let header_session = match req.headers().get(api::SESSION_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map(|s| s.trim().to_owned()).map_err(|_| {
            (
                ApiError::bad_request(
                    code::BAD_SESSION_ID,
                    "the x-clawos-session header is not text",
                ),
                None,
            )
        })?),
    };
    let tool_events_header = req
        .headers()
        .get(api::TOOL_EVENTS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| !v.trim().eq_ignore_ascii_case("off"));
    let body = read_body(req).await.map_err(|e| (e, None))?;
    let chat: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        let message = if e.is_data() {
            format!("not a chat completion request: {e}")
        } else {
            format!("malformed JSON: {e}")
        };
        (
            ApiError::bad_request(code::MALFORMED_REQUEST, message),
            None,
        )
    })?;
    let header_given = header_session.is_some();
    let id = match (chat.session.clone(), header_session) {
        (Some(a), Some(b)) if a != b => {
            return Err((
                ApiError::bad_request(
                    code::BAD_SESSION_ID,
                    format!(
                        "the body's session {a:?} and the x-clawos-session header {b:?} differ"
                    ),
                ),
                None,
            ));
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => random_hex(8),
    };
    if !api::is_valid_session_id(&id) {
        return Err((SessionError::BadId(id).into(), None));
    }
    // Errors name the session only if the client did: a generated id names nothing yet.
    let named = chat.session.is_some() || header_given;
    let err = |e: ApiError| (e, named.then(|| id.clone()));
    let Some(last_user) = chat.messages.iter().rposition(|m| m.role == "user") else {
        return Err(err(ApiError::bad_request(
            code::NO_USER_MESSAGE,
            "no user message: the task's input is the last message with role \"user\"",
        )));
    };
    let input = chat.messages[last_user].text();
    if input.trim().is_empty() {
        return Err(err(ApiError::bad_request(
            code::NO_USER_MESSAGE,
            "the last user message is empty",
        )));
    }
    let system: Vec<String> = chat
        .messages
        .iter()
        .filter(|m| m.role == "system" || m.role == "developer")
        .map(|m| m.text())
        .filter(|t| !t.trim().is_empty())
        .collect();
    let history = chat.messages[..last_user]
        .iter()
        .filter(|m| m.role == "user" || m.role == "assistant")
        .map(|m| (m.role.clone(), m.text()))
        .collect();
    let model = chat
        .model
        .clone()
        .filter(|m| !m.trim().is_empty() && m != "default")
        .unwrap_or_else(|| state.agent.config.model.clone());
    if *state.shutdown.borrow() {
        return Err(err(ApiError::from(&TaskError::Shutdown)));
    }
    let mut session = state
        .agent
        .sessions
        .acquire(&id)
        .map_err(|e| err(e.into()))?;
    let task_id = format!("chatcmpl-{}", random_hex(12));
    let spec = TaskSpec {
        input,
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        history,
        model: model.clone(),
        task_id: task_id.clone(),
    };
    log!(
        "task start session={id} task={task_id} model={model} stream={} new_session={}",
        chat.stream,
        session.is_new()
    );
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let task_state = Arc::clone(state);
    let alive = state.tasks_alive.clone();
    let sid = id.clone();
    let tid = task_id.clone();
    let task = tokio::spawn(async move {
        let _alive = alive;
        let started = Instant::now();
        let mut shutdown = task_state.shutdown.clone();
        let result = tokio::select! {
            r = task_state.agent.run_task(&mut session, spec, &events_tx) => r,
            _ = shutdown.wait_for(|down| *down) => Err(TaskError::Shutdown),
        };
        // The session's lock goes before the result is delivered, so a client may
        // continue the session as soon as it has the answer.
        drop(session);
        match &result {
            Ok(o) => log!(
                "task done session={sid} task={tid} steps={} tool_calls={} tokens={} ms={}",
                o.steps,
                o.tool_calls.len(),
                o.usage.total_tokens,
                started.elapsed().as_millis()
            ),
            Err(e) => log!(
                "task failed session={sid} task={tid} ms={}: {e}",
                started.elapsed().as_millis()
            ),
        }
        result
    });
    let created = unix_now();
    let meta = Meta {
        task_id,
        created,
        model,
        session: id.clone(),
    };
    let mut resp = if chat.stream {
        let tool_events = chat.tool_events.or(tool_events_header).unwrap_or(true);
        let (body_tx, body_rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(forward_stream(meta, events_rx, task, body_tx, tool_events));
        let mut r = Response::new(OutBody::Stream(body_rx));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        drop(events_rx);
        match task.await {
            Ok(Ok(outcome)) => json_response(StatusCode::OK, &completion(&meta, outcome)),
            Ok(Err(e)) => ApiError::from(&e).response(),
            Err(e) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code::SESSION_ERROR,
                format!("the task ended abnormally: {e}"),
            )
            .response(),
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(api::SESSION_HEADER, v);
    }
    Ok(resp)
}

/// What every chunk of a task's answer repeats.
#[derive(Debug, Clone)]
struct Meta {
    task_id: String,
    created: u64,
    model: String,
    session: String,
}

fn completion(meta: &Meta, o: TaskOutcome) -> ChatCompletion {
    ChatCompletion {
        id: meta.task_id.clone(),
        object: "chat.completion".into(),
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: o.text,
            },
            finish_reason: o.finish_reason,
        }],
        usage: o.usage,
        session: meta.session.clone(),
        clawos: TaskReport {
            steps: o.steps,
            tool_calls: o.tool_calls,
        },
    }
}

fn chunk(meta: &Meta, delta: Delta, finish: Option<String>) -> ChatChunk {
    ChatChunk {
        id: meta.task_id.clone(),
        object: "chat.completion.chunk".into(),
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish,
        }],
        usage: None,
        session: Some(meta.session.clone()),
    }
}

/// One server-sent event; `event: None` is a plain `data:` frame.
fn sse<T: Serialize>(event: Option<&str>, data: &T) -> Bytes {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    Bytes::from(match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    })
}

/// A tool event's data, plus `"choices": []`: the OpenAI SDKs hand every event of a
/// stream to the caller as a chunk, named or not, and code written for OpenAI's own
/// streams already skips chunks with empty `choices` (its usage chunk has them).
fn tool_event<T: Serialize>(event: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(event).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("choices".into(), serde_json::Value::Array(Vec::new()));
    }
    v
}

/// Turns a task's events into the event stream, then its end: the last chunk and
/// `[DONE]`, or an `error` event. A client that went away stops only the writing.
async fn forward_stream(
    meta: Meta,
    mut events: mpsc::UnboundedReceiver<TaskEvent>,
    task: tokio::task::JoinHandle<Result<TaskOutcome, TaskError>>,
    body: mpsc::Sender<Bytes>,
    tool_events: bool,
) {
    let mut open = true;
    let mut send = async |frame: Bytes| {
        if open && body.send(frame).await.is_err() {
            open = false;
        }
    };
    send(sse(
        None,
        &chunk(
            &meta,
            Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            None,
        ),
    ))
    .await;
    while let Some(ev) = events.recv().await {
        let frame = match ev {
            TaskEvent::Text(t) => sse(
                None,
                &chunk(
                    &meta,
                    Delta {
                        role: None,
                        content: Some(t),
                    },
                    None,
                ),
            ),
            TaskEvent::ToolCall(c) if tool_events => {
                sse(Some(api::EVENT_TOOL_CALL), &tool_event(&c))
            }
            TaskEvent::ToolResult(r) if tool_events => {
                sse(Some(api::EVENT_TOOL_RESULT), &tool_event(&r))
            }
            _ => continue,
        };
        send(frame).await;
    }
    match task.await {
        Ok(Ok(outcome)) => {
            let mut last = chunk(&meta, Delta::default(), Some(outcome.finish_reason));
            last.usage = Some(outcome.usage);
            send(sse(None, &last)).await;
            send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
        Ok(Err(e)) => send(sse(Some(api::EVENT_ERROR), &ApiError::from(&e).body)).await,
        Err(e) => {
            let err = ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code::SESSION_ERROR,
                format!("the task ended abnormally: {e}"),
            );
            send(sse(Some(api::EVENT_ERROR), &err.body)).await;
        }
    }
}
