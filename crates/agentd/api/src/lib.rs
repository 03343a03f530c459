//! The agent API that every ClawOS agent runtime serves inside its VM, on guest port
//! [`DEFAULT_PORT`] (reached from the host through vm-launcher's gateway tunnel): an
//! OpenAI-compatible chat-completions endpoint plus ClawOS's tool events and sessions.
//! These are its wire types, shared by `clawos-agentd` (the server), vm-launcher and
//! the CLI, so the two sides cannot drift apart. Serde types only.
//!
//! | route | body → answer |
//! |---|---|
//! | [`HEALTHZ_PATH`] `GET /healthz` | → [`Health`] |
//! | [`CHAT_COMPLETIONS_PATH`] `POST /v1/chat/completions` | [`ChatRequest`] → [`ChatCompletion`], or with `stream: true` an event stream (below) |
//! | [`SESSIONS_PATH`] `GET /v1/sessions` | → [`SessionList`] |
//!
//! One request is one *task*: the runtime takes the last `user` message as the task's
//! input and runs the model's tool-use loop until the model stops asking for tools.
//! A task belongs to a *session* ([`ChatRequest::session`] or the [`SESSION_HEADER`]
//! request header; a new id is made when neither is given) whose transcript is the
//! history the model sees; every answer carries the session id in [`SESSION_HEADER`].
//!
//! The stream (`text/event-stream`) is OpenAI's: `data:` frames each holding a
//! [`ChatChunk`] (the first with `delta.role`, then `delta.content` as the model's text
//! arrives, the last with a `finish_reason` and `usage`), then `data: [DONE]`. ClawOS
//! adds named events for tool activity, [`EVENT_TOOL_CALL`] ([`ToolCallEvent`]) and
//! [`EVENT_TOOL_RESULT`] ([`ToolResultEvent`]). The OpenAI SDKs hand every event to
//! their caller as a chunk, named or not, so these events' data also carry
//! `"choices": []` (which code written for OpenAI's streams skips, as it skips the
//! usage chunk); a request may turn them off altogether with
//! [`ChatRequest::tool_events`] `false` (or the [`TOOL_EVENTS_HEADER`] header `off`). A task that fails after the stream began
//! ends it with [`EVENT_ERROR`] carrying an [`ErrorBody`] and no `[DONE]`, so a client
//! cannot mistake a failed task for a finished one.
//!
//! Errors before a stream begins are an [`ErrorBody`] (OpenAI's error shape) with a
//! 4xx/5xx status; [`ErrorDetail::code`] is one of [`code`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Guest port of the agent API (OpenClaw's gateway port, kept so the host side's
/// gateway tunnel serves either runtime).
pub const DEFAULT_PORT: u16 = 18789;
/// `GET`: liveness, [`Health`].
pub const HEALTHZ_PATH: &str = "/healthz";
/// `POST`: one task, [`ChatRequest`] → [`ChatCompletion`] or an event stream.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";
/// `GET`: the sessions in the workspace, [`SessionList`].
pub const SESSIONS_PATH: &str = "/v1/sessions";
/// Request header naming the session (an alternative to [`ChatRequest::session`]);
/// every chat answer carries it with the session's id.
pub const SESSION_HEADER: &str = "x-clawos-session";
/// Request header: `off` turns the stream's tool events off (as
/// [`ChatRequest::tool_events`] `false` does).
pub const TOOL_EVENTS_HEADER: &str = "x-clawos-tool-events";
/// Largest request body the runtime accepts.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Stream event: the model asked for a tool; data is a [`ToolCallEvent`].
pub const EVENT_TOOL_CALL: &str = "clawos.tool_call";
/// Stream event: a tool finished; data is a [`ToolResultEvent`].
pub const EVENT_TOOL_RESULT: &str = "clawos.tool_result";
/// Stream event: the task failed after the stream began; data is an [`ErrorBody`].
/// The stream then ends without [`STREAM_DONE`].
pub const EVENT_ERROR: &str = "error";
/// The data of the last frame of a stream whose task finished.
pub const STREAM_DONE: &str = "[DONE]";
/// Longest session id.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// Whether `id` is a valid session id: 1 to [`MAX_SESSION_ID_LEN`] characters of
/// `[a-z0-9-]`. Ids name files, so nothing else (no `/`, no `.`) is ever accepted.
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// The model tasks use unless a request names another.
    pub model: String,
    /// The runtime's version.
    pub version: String,
}

/// `POST /v1/chat/completions`: OpenAI's request, of which the runtime reads these
/// fields (others, such as `temperature`, are accepted and ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatRequest {
    /// The model for this task; absent, empty or `default`: the runtime's own. (The
    /// OpenAI SDKs require a value, hence `default`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The last `user` message is the task's input; `system` (and `developer`)
    /// messages are added to the system prompt; earlier `user`/`assistant` messages are
    /// the history of a new session and ignored for an existing one, whose transcript
    /// is its history.
    pub messages: Vec<ChatMessage>,
    /// Answer with an event stream.
    #[serde(default)]
    pub stream: bool,
    /// ClawOS: the session to run in ([`is_valid_session_id`]); created if new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// ClawOS: whether a stream carries the tool events (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_events: Option<bool>,
}

/// One message of a [`ChatRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` (or `tool`, ignored).
    pub role: String,
    /// A string, or OpenAI's list of content parts (the text parts are read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<ChatContent>,
}

impl ChatMessage {
    /// A message with text content.
    pub fn new(role: &str, text: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: Some(ChatContent::Text(text.to_owned())),
        }
    }

    /// The message's text: the string, or its text parts joined by newlines.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(ChatContent::Text(s)) => s.clone(),
            Some(ChatContent::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A message's content, as OpenAI allows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ChatContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a list content; only `text` parts carry text the runtime reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Token counts of a task, summed over its model calls (`prompt_tokens` includes the
/// prompt-cache reads and writes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// The non-stream answer of a finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatCompletion {
    /// `chatcmpl-…`, the task's id (the same in its stream's chunks).
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds when the task started.
    pub created: u64,
    pub model: String,
    /// One choice, whose message is the text of the model's last answer.
    pub choices: Vec<Choice>,
    pub usage: Usage,
    /// The session the task ran in.
    pub session: String,
    /// What the task did.
    pub clawos: TaskReport,
}

/// The one choice of a [`ChatCompletion`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    /// `stop`, `length` (the model ran out of `max_tokens`) or `content_filter` (it
    /// refused).
    pub finish_reason: String,
}

/// The assistant's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    pub content: String,
}

/// ClawOS's account of a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskReport {
    /// Model calls made.
    pub steps: u32,
    /// Every tool the model called, in order.
    pub tool_calls: Vec<ToolCallSummary>,
}

/// One tool call of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ToolCallSummary {
    pub name: String,
    pub input: Value,
    /// Whether the tool succeeded (for `bash`: exit status 0).
    pub ok: bool,
    /// The start of what the tool returned to the model.
    pub output_preview: String,
}

/// One `data:` frame of a stream: OpenAI's `chat.completion.chunk`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// On the last chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// ClawOS: the session (also in the answer's [`SESSION_HEADER`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// The one choice of a [`ChatChunk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// Set on the last chunk; `null` before.
    pub finish_reason: Option<String>,
}

/// What a chunk adds to the answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant`, on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Data of an [`EVENT_TOOL_CALL`] event: the model asked for a tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallEvent {
    /// The model's id of the call (`toolu_…`), shared with its [`ToolResultEvent`].
    pub id: String,
    pub name: String,
    pub input: Value,
}

/// Data of an [`EVENT_TOOL_RESULT`] event: a tool finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolResultEvent {
    pub id: String,
    pub name: String,
    pub ok: bool,
    /// The start of what the tool returned to the model.
    pub output: String,
}

/// `GET /v1/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionList {
    /// Most recently updated first.
    pub sessions: Vec<SessionInfo>,
}

/// One session of a [`SessionList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = AgentSessionInfo))]
pub struct SessionInfo {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last message.
    pub updated: u64,
    /// Messages in the transcript (model messages, tool results included).
    pub messages: u64,
    /// The start of the last task's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_user_message: Option<String>,
}

/// Every error answer, and the data of a stream's [`EVENT_ERROR`]: OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The error of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `rate_limit_error`,
    /// `upstream_error`, `task_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// One of [`code`].
    #[serde(default)]
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(kind: &str, code: &str, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_owned(),
                code: Some(code.to_owned()),
            },
        }
    }
}

/// The machine-readable [`ErrorDetail::code`]s.
pub mod code {
    /// 400: the body is not JSON of the expected shape.
    pub const MALFORMED_REQUEST: &str = "malformed_request";
    /// 400: no `user` message, or it is empty.
    pub const NO_USER_MESSAGE: &str = "no_user_message";
    /// 400: the session id is not `[a-z0-9-]{1,64}` (or body and header disagree).
    pub const BAD_SESSION_ID: &str = "bad_session_id";
    /// 413: the body is over [`super::MAX_REQUEST_BYTES`].
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    /// 404 / 405.
    pub const NOT_FOUND: &str = "not_found";
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 409: a task is already running in the session.
    pub const SESSION_BUSY: &str = "session_busy";
    /// 422: the task made `--max-steps` model calls without finishing.
    pub const STEP_LIMIT: &str = "step_limit";
    /// 422: the task ran for `--max-task-secs` without finishing.
    pub const TIME_LIMIT: &str = "time_limit";
    /// 429: the model endpoint (the inference proxy) refused for a rate or token
    /// budget; the message is its own.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// 502: the model endpoint refused or failed; the message says how.
    pub const MODEL_ERROR: &str = "model_error";
    /// 500: the session's transcript could not be read or written.
    pub const SESSION_ERROR: &str = "session_error";
    /// 503: the runtime is shutting down.
    pub const SHUTTING_DOWN: &str = "shutting_down";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        for ok in ["a", "abc-123", &"x".repeat(64)] {
            assert!(is_valid_session_id(ok), "{ok}");
        }
        for bad in ["", "A", "a/b", "..", "a.b", "a b", "é", &"x".repeat(65)] {
            assert!(!is_valid_session_id(bad), "{bad}");
        }
    }

    #[test]
    fn request_accepts_openai_shapes() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model":"gpt-x","temperature":0.2,"messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null}]}"#,
        )
        .expect("parse");
        assert!(!r.stream);
        assert_eq!(r.messages[0].text(), "be brief");
        assert_eq!(r.messages[1].text(), "a\nb");
        assert_eq!(r.messages[2].text(), "");
    }

    #[test]
    fn chunk_omits_absent_fields() {
        let c = ChatChunk {
            id: "chatcmpl-1".into(),
            object: "chat.completion.chunk".into(),
            created: 1,
            model: "m".into(),
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: Some("hi".into()),
                },
                finish_reason: None,
            }],
            usage: None,
            session: None,
        };
        assert_eq!(
            serde_json::to_string(&c).expect("json"),
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#
        );
    }
}
