//! The agent API of a VM, through the launcher ([`crate::routes::AGENT_CHAT`]): one
//! task per request, its answer as a whole or as a stream of [`AgentEvent`]s read from
//! the runtime's `text/event-stream`.

use clawos_agentd_api::{
    ChatChunk, ChatCompletion, ChatRequest, EVENT_ERROR, EVENT_TOOL_CALL, EVENT_TOOL_RESULT,
    ErrorBody, STREAM_DONE, SessionList, ToolCallEvent, ToolResultEvent, Usage,
};
use clawos_api::ClientError;
use futures_util::StreamExt;

use crate::{LauncherClient, routes};

/// One thing a task's stream says.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// More of the model's answer.
    Text(String),
    /// The model asked for a tool.
    ToolCall(ToolCallEvent),
    /// A tool finished.
    ToolResult(ToolResultEvent),
    /// The answer is complete.
    Finished {
        finish_reason: String,
        usage: Option<Usage>,
        session: Option<String>,
    },
    /// The task failed after the stream began.
    Failed(ErrorBody),
}

/// Why a task's stream could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum AgentStreamError {
    /// The connection broke.
    #[error("the agent's stream broke: {0}")]
    Transport(#[source] reqwest::Error),
    /// A frame was not what the agent API defines.
    #[error("the agent sent a malformed {event} event: {detail}")]
    Malformed { event: String, detail: String },
    /// The stream ended without `[DONE]` or an error event: the task's end is unknown.
    #[error("the agent's stream ended before the task finished")]
    Truncated,
}

/// A task's event stream.
pub struct AgentStream {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    /// The session the task runs in (the answer's header).
    pub session: Option<String>,
    done: bool,
}

impl std::fmt::Debug for AgentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStream")
            .field("session", &self.session)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// One server-sent event: its name (absent for plain `data:` frames) and data.
fn parse_event(block: &str) -> (Option<&str>, String) {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    (event, data.join("\n"))
}

/// Turns one event into what it means; `None` for events that carry nothing (an empty
/// delta, a comment) and for the final `[DONE]`.
fn interpret(event: Option<&str>, data: &str) -> Result<Option<AgentEvent>, AgentStreamError> {
    let malformed = |e: serde_json::Error| AgentStreamError::Malformed {
        event: event.unwrap_or("data").to_owned(),
        detail: e.to_string(),
    };
    Ok(match event {
        Some(EVENT_TOOL_CALL) => Some(AgentEvent::ToolCall(
            serde_json::from_str(data).map_err(malformed)?,
        )),
        Some(EVENT_TOOL_RESULT) => Some(AgentEvent::ToolResult(
            serde_json::from_str(data).map_err(malformed)?,
        )),
        Some(EVENT_ERROR) => Some(AgentEvent::Failed(
            serde_json::from_str(data).map_err(malformed)?,
        )),
        Some(_) => None,
        None if data.trim().is_empty() || data.trim() == STREAM_DONE => None,
        None => {
            // OpenAI-style servers (OpenClaw's gateway among them) report a failure
            // mid-stream as a plain data frame `{"error": {"message", "type"}}`.
            if let Ok(body) = serde_json::from_str::<ErrorBody>(data) {
                return Ok(Some(AgentEvent::Failed(body)));
            }
            let chunk: ChatChunk = serde_json::from_str(data).map_err(malformed)?;
            let Some(choice) = chunk.choices.into_iter().next() else {
                return Ok(None);
            };
            match (choice.finish_reason, choice.delta.content) {
                (Some(reason), _) => Some(AgentEvent::Finished {
                    finish_reason: reason,
                    usage: chunk.usage,
                    session: chunk.session,
                }),
                (None, Some(text)) if !text.is_empty() => Some(AgentEvent::Text(text)),
                _ => None,
            }
        }
    })
}

impl AgentStream {
    /// The next event; `None` once the task finished (`[DONE]`) or failed (after its
    /// [`AgentEvent::Failed`]).
    pub async fn next(&mut self) -> Option<Result<AgentEvent, AgentStreamError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(end) = find_blank_line(&self.buf) {
                let block: Vec<u8> = self.buf.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&block[..end.0]).replace("\r\n", "\n");
                let (event, data) = parse_event(&text);
                if event.is_none() && data.trim() == STREAM_DONE {
                    self.done = true;
                    return None;
                }
                match interpret(event, &data) {
                    Ok(Some(e)) => {
                        if matches!(e, AgentEvent::Failed(_)) {
                            self.done = true;
                        }
                        return Some(Ok(e));
                    }
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                }
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(AgentStreamError::Transport(e)));
                }
                None => {
                    self.done = true;
                    return Some(Err(AgentStreamError::Truncated));
                }
            }
        }
    }
}

/// Where the first event block ends: (end of its text, end including the blank line).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

impl LauncherClient {
    /// Gives the VM's agent a task and waits for its answer.
    pub async fn agent_chat(
        &self,
        vm: &str,
        req: &ChatRequest,
    ) -> Result<ChatCompletion, ClientError> {
        let mut req = req.clone();
        req.stream = false;
        self.http
            .json(self.http.request(routes::AGENT_CHAT, &[vm]).json(&req))
            .await
    }

    /// Gives the VM's agent a task and streams what it does.
    pub async fn agent_chat_stream(
        &self,
        vm: &str,
        req: &ChatRequest,
    ) -> Result<AgentStream, ClientError> {
        let mut req = req.clone();
        req.stream = true;
        let resp = self
            .http
            .send(self.http.request(routes::AGENT_CHAT, &[vm]).json(&req))
            .await?;
        let session = resp
            .headers()
            .get(clawos_agentd_api::SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(AgentStream {
            body: resp.bytes_stream().boxed(),
            buf: Vec::new(),
            session,
            done: false,
        })
    }

    /// Sends a chat request body as is and answers the launcher's response unread
    /// (status, headers, a JSON or event-stream body): for a proxy in front of the
    /// launcher that passes answers through.
    pub async fn agent_chat_raw(
        &self,
        vm: &str,
        body: bytes::Bytes,
    ) -> Result<reqwest::Response, ClientError> {
        self.http
            .send(
                self.http
                    .request(routes::AGENT_CHAT, &[vm])
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body),
            )
            .await
    }

    /// The sessions of the VM's agent.
    pub async fn agent_sessions(&self, vm: &str) -> Result<SessionList, ClientError> {
        self.http
            .json(self.http.request(routes::AGENT_SESSIONS, &[vm]))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_as_the_agent_api_defines_them() {
        let (e, d) = parse_event(
            "event: clawos.tool_call\ndata: {\"id\":\"t1\",\"name\":\"write_file\",\"input\":{\"path\":\"a\"}}",
        );
        match interpret(e, &d).expect("ok") {
            Some(AgentEvent::ToolCall(c)) => assert_eq!(c.name, "write_file"),
            other => panic!("{other:?}"),
        }
        let chunk = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        let frame = format!("data: {chunk}");
        let (e, d) = parse_event(&frame);
        assert_eq!(
            interpret(e, &d).expect("ok"),
            Some(AgentEvent::Text("hi".into()))
        );
        let last = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"session":"s"}"#;
        let frame = format!("data: {last}");
        let (e, d) = parse_event(&frame);
        match interpret(e, &d).expect("ok") {
            Some(AgentEvent::Finished { usage, session, .. }) => {
                assert_eq!(usage.map(|u| u.total_tokens), Some(5));
                assert_eq!(session.as_deref(), Some("s"));
            }
            other => panic!("{other:?}"),
        }
        let (e, d) = parse_event(
            "event: error\ndata: {\"error\":{\"message\":\"budget\",\"type\":\"rate_limit_error\",\"code\":\"rate_limited\"}}",
        );
        assert!(matches!(interpret(e, &d), Ok(Some(AgentEvent::Failed(_)))));
        let (e, d) = parse_event("event: clawos.tool_call\ndata: not json");
        assert!(matches!(
            interpret(e, &d),
            Err(AgentStreamError::Malformed { .. })
        ));
        // OpenClaw's gateway: an OpenAI error object as a plain data frame.
        let (e, d) = parse_event(
            "data: {\"error\":{\"message\":\"upstream timed out\",\"type\":\"api_error\"}}",
        );
        match interpret(e, &d) {
            Ok(Some(AgentEvent::Failed(b))) => assert_eq!(b.error.message, "upstream timed out"),
            other => panic!("{other:?}"),
        }
        let (e, d) = parse_event("data: [DONE]");
        assert_eq!(interpret(e, &d).expect("ok"), None);
    }

    #[test]
    fn event_blocks_split_on_either_line_ending() {
        assert_eq!(find_blank_line(b"data: a\n\ndata: b"), Some((7, 9)));
        assert_eq!(find_blank_line(b"data: a\r\n\r\nx"), Some((7, 11)));
        assert_eq!(find_blank_line(b"data: a\n"), None);
    }
}
