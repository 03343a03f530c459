//! The model: one call of the Anthropic Messages API with `"stream": true`, over plain
//! HTTP/1.1 (in a VM, to the guest's relay, which carries it to the host's inference
//! proxy; the proxy holds the real credential). The answer's server-sent events are
//! assembled into the assistant message while its text is handed on as it arrives.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;

/// `anthropic-version` of every call.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Most of an error answer's body read (error bodies are small; this bounds a
/// misbehaving endpoint).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Longest server-sent-event line accepted (a whole answer is far smaller).
const MAX_SSE_LINE: usize = 8 << 20;
/// How long connecting to the endpoint may take (loopback; anything longer means the
/// relay is wedged).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A base URL the runtime can call: `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`, to connect to and for the `Host` header.
    pub authority: String,
    /// The URL's own path, without a trailing `/` (empty for none).
    pub path: String,
    /// The path of the Messages API under the base.
    pub messages_path: String,
}

/// A `--llm-url` the runtime cannot use.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "only plain http:// URLs are supported (the model is reached through the guest's relay, which adds TLS on the host)"
    )]
    NotHttp,
    #[error("no host in the URL")]
    NoHost,
    #[error("query strings and fragments are not supported in the URL")]
    Query,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, EndpointError> {
        let rest = url.strip_prefix("http://").ok_or(EndpointError::NotHttp)?;
        if rest.contains(['?', '#']) {
            return Err(EndpointError::Query);
        }
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.starts_with(':') || authority.contains('@') {
            return Err(EndpointError::NoHost);
        }
        let has_port = match authority.rfind(':') {
            // `[::1]` has colons but no port unless one follows the bracket.
            Some(i) => !authority[i..].contains(']'),
            None => false,
        };
        let authority = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            authority,
            path: prefix.to_owned(),
            messages_path: format!("{prefix}/v1/messages"),
        })
    }
}

/// Why a connection to an endpoint could not be opened.
#[derive(Debug)]
pub(crate) enum Unreachable {
    /// Nothing accepted it within [`CONNECT_TIMEOUT`].
    Timeout,
    Io(std::io::Error),
    Http(hyper::Error),
}

/// Opens one plain HTTP/1.1 connection to `authority` (the guest's relays are on
/// loopback; nothing accepting within [`CONNECT_TIMEOUT`] means one is wedged). Its
/// driver ends once the request and its answer are dropped.
pub(crate) async fn open(
    authority: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, Unreachable> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| Unreachable::Timeout)?
        .map_err(Unreachable::Io)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Unreachable::Http)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Token counts the model reported for one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
}

impl TokenUsage {
    fn update(&mut self, u: &Value) {
        let get = |k: &str| u.get(k).and_then(Value::as_u64);
        if let Some(n) = get("input_tokens") {
            self.input = n;
        }
        if let Some(n) = get("output_tokens") {
            self.output = n;
        }
        if let Some(n) = get("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
        if let Some(n) = get("cache_read_input_tokens") {
            self.cache_read = n;
        }
    }

    /// Input tokens of every kind.
    pub fn prompt(&self) -> u64 {
        self.input + self.cache_creation + self.cache_read
    }
}

/// The assistant's answer to one call.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTurn {
    /// The content blocks, as the Messages API will want them back.
    pub content: Vec<Value>,
    /// `end_turn`, `tool_use`, `max_tokens`, …; `None` if the endpoint sent none.
    pub stop_reason: Option<String>,
    pub usage: TokenUsage,
}

/// A model call that produced no answer. The messages are what the operator sees (the
/// task's error), so the endpoint's own words are kept verbatim.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot reach the model endpoint at {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the model endpoint at {authority}: connecting timed out")]
    ConnectTimeout { authority: String },
    #[error("the model call failed in HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("model call refused ({status} {kind}): {message}{}", request_suffix(.request_id))]
    Refused {
        status: u16,
        /// The error's type or code from the body (`rate_limited`,
        /// `overloaded_error`, …), else the status's reason.
        kind: String,
        message: String,
        request_id: Option<String>,
    },
    #[error("the model's stream reported an error ({kind}): {message}")]
    Stream { kind: String, message: String },
    #[error("the model's answer could not be understood: {0}")]
    Protocol(String),
}

fn request_suffix(id: &Option<String>) -> String {
    id.as_ref()
        .map(|id| format!(" (request {id})"))
        .unwrap_or_default()
}

impl ModelError {
    /// The HTTP status the endpoint refused with, if it did.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one endpoint. Every call opens its own connection: calls are minutes
/// apart and the endpoint is on loopback, so a pool would only cost memory.
#[derive(Debug, Clone)]
pub struct LlmClient {
    endpoint: Endpoint,
    api_key: Option<String>,
}

impl LlmClient {
    pub fn new(endpoint: Endpoint, api_key: Option<String>) -> Self {
        Self { endpoint, api_key }
    }

    /// Makes one streaming call with `body` (a Messages API request with
    /// `"stream": true`) and assembles the answer; `on_text` gets each piece of text as
    /// it arrives.
    pub async fn call(
        &self,
        body: Vec<u8>,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<ModelTurn, ModelError> {
        let authority = &self.endpoint.authority;
        let mut sender = open(authority).await.map_err(|e| match e {
            Unreachable::Timeout => ModelError::ConnectTimeout {
                authority: authority.clone(),
            },
            Unreachable::Io(source) => ModelError::Connect {
                authority: authority.clone(),
                source,
            },
            Unreachable::Http(e) => ModelError::Http(e),
        })?;
        let mut req = Request::post(&self.endpoint.messages_path)
            .header(header::HOST, authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream")
            .header("anthropic-version", ANTHROPIC_VERSION);
        if let Some(key) = &self.api_key {
            req = req.header("x-api-key", key.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ModelError::Protocol(format!("cannot build the request: {e}")))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let mut body = resp.into_body();
        if !status.is_success() {
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() >= MAX_ERROR_BODY {
                        buf.truncate(MAX_ERROR_BODY);
                        break;
                    }
                }
            }
            return Err(refusal(status, &buf, retry_after.as_deref()));
        }
        if is_json {
            // An endpoint that ignored `stream`: the whole message at once.
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > MAX_SSE_LINE {
                        return Err(ModelError::Protocol("the answer is too large".into()));
                    }
                }
            }
            return whole_message(&buf, on_text);
        }
        let mut parser = SseParser::default();
        let mut asm = Assembler::default();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            for (event, data) in parser.feed(&data)? {
                asm.on_event(&event, &data, on_text)?;
                if asm.finished {
                    return asm.finish();
                }
            }
        }
        Err(ModelError::Protocol(
            "the stream ended before message_stop".into(),
        ))
    }
}

/// The error of a non-2xx answer: Anthropic's `{"type":"error","error":{"type",
/// "message"}}`, ClawOS's `{"error":{"code","message","request_id"}}` or OpenAI's
/// `{"error":{"message","type","code"}}`; anything else is quoted.
pub fn refusal(status: StatusCode, body: &[u8], retry_after: Option<&str>) -> ModelError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let s = |v: Option<&Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let reason = status.canonical_reason().unwrap_or("error").to_owned();
    let (kind, message, request_id) = match err {
        Some(e) if e.is_object() => (
            s(Some(e), "code")
                .or_else(|| s(Some(e), "type"))
                .unwrap_or(reason),
            s(Some(e), "message").unwrap_or_else(|| "(no message)".into()),
            s(Some(e), "request_id").or_else(|| s(parsed.as_ref(), "request_id")),
        ),
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let message = if text.is_empty() {
                "(empty body)".to_owned()
            } else {
                crate::truncate(text, 500)
            };
            (reason, message, None)
        }
    };
    let message = match retry_after {
        Some(secs) => format!("{message} (retry after {secs} s)"),
        None => message,
    };
    ModelError::Refused {
        status: status.as_u16(),
        kind,
        message,
        request_id,
    }
}

fn whole_message(
    buf: &[u8],
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<ModelTurn, ModelError> {
    let v: Value = serde_json::from_slice(buf)
        .map_err(|e| ModelError::Protocol(format!("the answer is not JSON: {e}")))?;
    let content = v
        .get("content")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| ModelError::Protocol("the answer has no content".into()))?;
    for b in &content {
        if let Some(t) = b.get("text").and_then(Value::as_str) {
            on_text(t);
        }
    }
    let mut usage = TokenUsage::default();
    if let Some(u) = v.get("usage") {
        usage.update(u);
    }
    Ok(ModelTurn {
        content,
        stop_reason: v
            .get("stop_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        usage,
    })
}

/// Splits a byte stream into server-sent events (`event:` name, joined `data:` lines).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Adds bytes; returns the events they completed, as (name, data); the name is
    /// `message` when the event had none.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(String, String)>, ModelError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let line = &self.buf[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = String::from_utf8_lossy(line).into_owned();
            start = end + 1;
            if line.is_empty() {
                if self.has_data {
                    let name = if self.event.is_empty() {
                        "message".to_owned()
                    } else {
                        std::mem::take(&mut self.event)
                    };
                    out.push((name, std::mem::take(&mut self.data)));
                }
                self.event.clear();
                self.data.clear();
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "event" => self.event = value.to_owned(),
                "data" => {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_SSE_LINE || self.data.len() > MAX_SSE_LINE {
            return Err(ModelError::Protocol(
                "a server-sent event is over 8 MiB".into(),
            ));
        }
        Ok(out)
    }
}

/// One content block being streamed.
#[derive(Debug)]
struct Block {
    value: Value,
    /// `input_json_delta` pieces of a `tool_use` (or server tool) block.
    partial_json: String,
}

/// Builds the assistant message from the stream's events.
#[derive(Debug, Default)]
struct Assembler {
    blocks: Vec<Option<Block>>,
    stop_reason: Option<String>,
    usage: TokenUsage,
    started: bool,
    finished: bool,
}

fn protocol(what: &str, data: &str) -> ModelError {
    ModelError::Protocol(format!("{what}: {}", crate::truncate(data, 200)))
}

impl Assembler {
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), ModelError> {
        if event == "ping" {
            return Ok(());
        }
        let v: Value =
            serde_json::from_str(data).map_err(|_| protocol("an event is not JSON", data))?;
        // The data's `type` names the event too; trust it over the `event:` line.
        let kind = v.get("type").and_then(Value::as_str).unwrap_or(event);
        match kind {
            "message_start" => {
                self.started = true;
                if let Some(u) = v.pointer("/message/usage") {
                    self.usage.update(u);
                }
            }
            "content_block_start" => {
                let index = block_index(&v, data)?;
                let value = v
                    .get("content_block")
                    .filter(|b| b.is_object())
                    .cloned()
                    .ok_or_else(|| protocol("content_block_start without a block", data))?;
                if let Some(t) = value.get("text").and_then(Value::as_str)
                    && !t.is_empty()
                {
                    on_text(t);
                }
                if self.blocks.len() <= index {
                    self.blocks.resize_with(index + 1, || None);
                }
                self.blocks[index] = Some(Block {
                    value,
                    partial_json: String::new(),
                });
            }
            "content_block_delta" => {
                let index = block_index(&v, data)?;
                let block = self
                    .blocks
                    .get_mut(index)
                    .and_then(Option::as_mut)
                    .ok_or_else(|| protocol("a delta for a block never started", data))?;
                let delta = v
                    .get("delta")
                    .ok_or_else(|| protocol("content_block_delta without a delta", data))?;
                let field = |k: &str| delta.get(k).and_then(Value::as_str).unwrap_or("");
                match delta.get("type").and_then(Value::as_str).unwrap_or("") {
                    "text_delta" => {
                        let t = field("text");
                        append(&mut block.value, "text", t);
                        if !t.is_empty() {
                            on_text(t);
                        }
                    }
                    "input_json_delta" => block.partial_json.push_str(field("partial_json")),
                    "thinking_delta" => append(&mut block.value, "thinking", field("thinking")),
                    "signature_delta" => {
                        if let Some(o) = block.value.as_object_mut() {
                            o.insert("signature".into(), json!(field("signature")));
                        }
                    }
                    "citations_delta" => {
                        if let (Some(o), Some(c)) =
                            (block.value.as_object_mut(), delta.get("citation"))
                        {
                            let list = o.entry("citations").or_insert_with(|| json!([]));
                            if let Some(list) = list.as_array_mut() {
                                list.push(c.clone());
                            }
                        }
                    }
                    // Unknown deltas: newer API features this runtime does not use.
                    _ => {}
                }
            }
            "content_block_stop" => {
                let index = block_index(&v, data)?;
                if let Some(Some(block)) = self.blocks.get_mut(index)
                    && !block.partial_json.is_empty()
                {
                    let input: Value = serde_json::from_str(&block.partial_json).map_err(|e| {
                        ModelError::Protocol(format!("a tool call's input is not JSON: {e}"))
                    })?;
                    if let Some(o) = block.value.as_object_mut() {
                        o.insert("input".into(), input);
                    }
                    block.partial_json.clear();
                }
            }
            "message_delta" => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(r.to_owned());
                }
                if let Some(u) = v.get("usage") {
                    self.usage.update(u);
                }
            }
            "message_stop" => self.finished = true,
            "error" => {
                let e = v.get("error");
                let s = |k: &str| {
                    e.and_then(|e| e.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                return Err(ModelError::Stream {
                    kind: s("type"),
                    message: s("message"),
                });
            }
            // Events added to the API later are skipped, as Anthropic asks of clients.
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> Result<ModelTurn, ModelError> {
        if !self.started {
            return Err(ModelError::Protocol(
                "the stream had no message_start".into(),
            ));
        }
        Ok(ModelTurn {
            content: self
                .blocks
                .into_iter()
                .flatten()
                .map(|mut b| {
                    // A tool call whose input never arrived has the empty input it
                    // started with.
                    if b.value.get("type").and_then(Value::as_str) == Some("tool_use")
                        && b.value.get("input").is_none()
                        && let Some(o) = b.value.as_object_mut()
                    {
                        o.insert("input".into(), Value::Object(Map::new()));
                    }
                    b.value
                })
                .collect(),
            stop_reason: self.stop_reason,
            usage: self.usage,
        })
    }
}

fn block_index(v: &Value, data: &str) -> Result<usize, ModelError> {
    v.get("index")
        .and_then(Value::as_u64)
        .and_then(|i| usize::try_from(i).ok())
        .filter(|&i| i < 1024)
        .ok_or_else(|| protocol("a content block event without a sane index", data))
}

fn append(block: &mut Value, key: &str, text: &str) {
    if let Some(o) = block.as_object_mut() {
        let cur = o.entry(key).or_insert_with(|| json!(""));
        if let Some(s) = cur.as_str() {
            *cur = Value::String(format!("{s}{text}"));
        }
    }
}

#[cfg(test)]
mod tests;
