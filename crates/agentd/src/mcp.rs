//! The runtime's MCP client: the skills the host offers (skill-manager, reached from a
//! VM at guest `127.0.0.1:2083` through the launcher's relay, which attaches the VM's
//! identity) become tools the model can call next to the built-in ones.
//!
//! Streamable HTTP, the part a tool-using client needs: `initialize` (keeping the
//! server's `Mcp-Session-Id`), `notifications/initialized`, `tools/list` and
//! `tools/call`, each a POST whose answer is JSON or a server-sent event stream; a
//! session the server has forgotten (404) is started again once. Hand-written on hyper
//! like the model client: the binary is static and ships in every VM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::llm::{Endpoint, EndpointError, SseParser, Unreachable};

/// The protocol version this client speaks.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
/// Most of an answer read (a tool's result is capped far below this by the host).
const MAX_ANSWER: usize = 4 << 20;
/// How long listing the tools may take (once per task).
pub const LIST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one tool call may take (skills have their own, shorter limits on the host;
/// the task's deadline applies too).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Pages of tools read at most (a server paging without end is cut there).
const MAX_TOOL_PAGES: usize = 8;

/// What went wrong talking to the MCP server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("cannot reach the MCP server at {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the MCP server at {authority} did not accept the connection within 10 s")]
    ConnectTimeout { authority: String },
    #[error("MCP connection: {0}")]
    Http(#[from] hyper::Error),
    #[error("the MCP server did not answer {method} within {} s", .limit.as_secs())]
    Timeout { method: String, limit: Duration },
    #[error("the MCP server answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the MCP server refused {method}: {message} (code {code})")]
    Rpc {
        method: String,
        code: i64,
        message: String,
    },
    #[error("the MCP server's answer to {method} is not one: {detail}")]
    Protocol { method: String, detail: String },
}

/// A tool the server offers.
#[derive(Debug, Clone, PartialEq)]
pub struct McpTool {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

/// The result of a tool call: its text, and whether the tool said it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpResult {
    pub is_error: bool,
    pub text: String,
}

/// One POST's answer.
struct Answer {
    status: StatusCode,
    session: Option<String>,
    message: Option<Value>,
    body_text: String,
}

/// An initialized session: the server's id for it (none when the server keeps no
/// sessions) and the protocol version it agreed to.
#[derive(Debug, Clone)]
struct Session {
    id: Option<String>,
    version: String,
}

/// Client for one MCP server. Tasks share it; the lock is held only to start a
/// session, never across a request, so one slow tool call holds up no other task.
#[derive(Debug)]
pub struct McpClient {
    endpoint: Endpoint,
    session: Mutex<Option<Session>>,
    next_id: AtomicU64,
}

impl McpClient {
    /// A client for `url` (`http://host:port/path`); nothing is sent yet.
    pub fn new(url: &str) -> Result<Self, EndpointError> {
        Ok(Self {
            endpoint: Endpoint::parse(url)?,
            session: Mutex::new(None),
            next_id: AtomicU64::new(1),
        })
    }

    /// The tools the server offers this agent now (every page, names once).
    pub async fn list_tools(&self) -> Result<Vec<McpTool>, McpError> {
        let mut tools: Vec<McpTool> = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_TOOL_PAGES {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let result = self.request("tools/list", params, LIST_TIMEOUT).await?;
            let page = result
                .get("tools")
                .and_then(Value::as_array)
                .ok_or_else(|| McpError::Protocol {
                    method: "tools/list".into(),
                    detail: "no tools array".into(),
                })?;
            for t in page {
                let Some(name) = t.get("name").and_then(Value::as_str) else {
                    continue;
                };
                if tools.iter().any(|have| have.name == name) {
                    continue;
                }
                // The Messages API takes object schemas only.
                let mut input_schema = t
                    .get("inputSchema")
                    .filter(|s| s.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({}));
                input_schema["type"] = json!("object");
                tools.push(McpTool {
                    name: name.to_owned(),
                    description: t
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    input_schema,
                });
            }
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(tools)
    }

    /// Calls tool `name` with `arguments` (a JSON object).
    pub async fn call_tool(&self, name: &str, arguments: &Value) -> Result<McpResult, McpError> {
        let result = self
            .request(
                "tools/call",
                json!({"name": name, "arguments": arguments}),
                CALL_TIMEOUT,
            )
            .await?;
        let mut text = String::new();
        for block in result
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let piece = match block.get("type").and_then(Value::as_str) {
                Some("text") => block
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                Some(other) => format!("[{other} content not shown]"),
                None => continue,
            };
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&piece);
        }
        if text.is_empty()
            && let Some(s) = result.get("structuredContent")
        {
            text = s.to_string();
        }
        Ok(McpResult {
            is_error: result
                .get("isError")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            text,
        })
    }

    /// Sends request `method` in the current session (starting one if needed, and once
    /// more if the server has forgotten it) and returns its `result`; the whole
    /// exchange, a session's start included, within `limit`.
    async fn request(
        &self,
        method: &str,
        params: Value,
        limit: Duration,
    ) -> Result<Value, McpError> {
        let exchange = async {
            for attempt in 0..2 {
                let session = self.session().await?;
                let answer = self
                    .post(&self.message(method, params.clone()), Some(&session))
                    .await?;
                // 404 to a request in a session, without a JSON-RPC answer: the server
                // has forgotten the session (a 404 carrying one is the method's).
                if answer.status == StatusCode::NOT_FOUND
                    && session.id.is_some()
                    && answer.message.is_none()
                    && attempt == 0
                {
                    let mut held = self.session.lock().await;
                    if held.as_ref().map(|s| &s.id) == Some(&session.id) {
                        *held = None;
                    }
                    continue;
                }
                return result_of(method, answer);
            }
            Err(McpError::Protocol {
                method: method.into(),
                detail: "the server forgot the session it had just started".into(),
            })
        };
        tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(McpError::Timeout {
                    method: method.into(),
                    limit,
                })
            })
    }

    /// The current session, started if there is none (one start at a time).
    async fn session(&self) -> Result<Session, McpError> {
        let mut held = self.session.lock().await;
        if let Some(s) = held.as_ref() {
            return Ok(s.clone());
        }
        let s = self.initialize().await?;
        *held = Some(s.clone());
        Ok(s)
    }

    /// Starts a session: `initialize`, then `notifications/initialized`.
    async fn initialize(&self) -> Result<Session, McpError> {
        let init = self.message(
            "initialize",
            json!({
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "clawos-agentd", "version": env!("CARGO_PKG_VERSION")},
            }),
        );
        let answer = self.post(&init, None).await?;
        let id = answer.session.clone();
        let result = result_of("initialize", answer)?;
        let session = Session {
            id,
            version: result
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(PROTOCOL_VERSION)
                .to_owned(),
        };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let answer = self.post(&note, Some(&session)).await?;
        if !answer.status.is_success() {
            return Err(McpError::Status {
                status: answer.status.as_u16(),
                body: crate::truncate(&answer.body_text, 300),
            });
        }
        Ok(session)
    }

    fn message(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
    }

    /// POSTs one JSON-RPC message; reads the answer up to the response to it.
    async fn post(&self, message: &Value, session: Option<&Session>) -> Result<Answer, McpError> {
        let authority = &self.endpoint.authority;
        let mut sender = crate::llm::open(authority).await.map_err(|e| match e {
            Unreachable::Timeout => McpError::ConnectTimeout {
                authority: authority.clone(),
            },
            Unreachable::Io(source) => McpError::Connect {
                authority: authority.clone(),
                source,
            },
            Unreachable::Http(e) => McpError::Http(e),
        })?;
        let path = if self.endpoint.path.is_empty() {
            "/"
        } else {
            self.endpoint.path.as_str()
        };
        let mut req = Request::post(path)
            .header(header::HOST, authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .header(
                "mcp-protocol-version",
                session.map_or(PROTOCOL_VERSION, |s| s.version.as_str()),
            );
        if let Some(id) = session.and_then(|s| s.id.as_deref()) {
            req = req.header("mcp-session-id", id);
        }
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let req = req
            .body(Full::new(Bytes::from(message.to_string())))
            .map_err(|e| McpError::Protocol {
                method: method.clone(),
                detail: format!("cannot build the request: {e}"),
            })?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let want_id = message.get("id").cloned();
        let mut body = resp.into_body();
        let mut raw = Vec::new();
        let mut read = 0usize;
        let mut parser = SseParser::default();
        let mut found = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            read += data.len();
            if read > MAX_ANSWER {
                return Err(McpError::Protocol {
                    method,
                    detail: format!("the answer is over {MAX_ANSWER} bytes"),
                });
            }
            if is_sse && status.is_success() {
                let events = parser.feed(&data).map_err(|e| McpError::Protocol {
                    method: method.clone(),
                    detail: e.to_string(),
                })?;
                for (_, data) in events {
                    // Our answer: our id, and not a request of the server's own
                    // (those carry a method, and ids from another space).
                    if let Ok(v) = serde_json::from_str::<Value>(&data)
                        && want_id.is_some()
                        && v.get("id") == want_id.as_ref()
                        && v.get("method").is_none()
                    {
                        found = Some(v);
                    }
                }
                if found.is_some() {
                    // The stream may stay open for more; the answer is all we need.
                    break;
                }
            } else {
                raw.extend_from_slice(&data);
            }
        }
        let body_text = String::from_utf8_lossy(&raw).into_owned();
        let message = match found {
            Some(v) => Some(v),
            None if !is_sse && status.is_success() && !raw.is_empty() => Some(
                serde_json::from_slice(&raw).map_err(|e| McpError::Protocol {
                    method: method.clone(),
                    detail: format!("not JSON: {e}"),
                })?,
            ),
            None => None,
        };
        Ok(Answer {
            status,
            session,
            message,
            body_text,
        })
    }
}

/// The `result` of a JSON-RPC answer, or why there is none.
fn result_of(method: &str, answer: Answer) -> Result<Value, McpError> {
    let rpc_error = answer
        .message
        .as_ref()
        .is_some_and(|m| m.get("error").is_some());
    if !answer.status.is_success() && !rpc_error {
        return Err(McpError::Status {
            status: answer.status.as_u16(),
            body: crate::truncate(&answer.body_text, 300),
        });
    }
    let Some(message) = answer.message else {
        return Err(McpError::Protocol {
            method: method.into(),
            detail: "no response to the request".into(),
        });
    };
    if let Some(e) = message.get("error") {
        return Err(McpError::Rpc {
            method: method.into(),
            code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message")
                .to_owned(),
        });
    }
    message
        .get("result")
        .cloned()
        .ok_or_else(|| McpError::Protocol {
            method: method.into(),
            detail: "neither result nor error".into(),
        })
}

/// Whether `name` can be a Messages API tool name (`^[a-zA-Z0-9_-]{1,64}$`).
pub fn is_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    /// A scripted MCP server on loopback: answers each POST with the next of
    /// `answers` (status, extra headers, content type, body; `{id}` in the body is
    /// replaced by the request's id), and records the requests' bodies and session ids.
    async fn server(
        answers: Vec<(u16, &'static str, &'static str, &'static str)>,
    ) -> (
        String,
        tokio::sync::mpsc::UnboundedReceiver<(Value, Option<String>)>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/mcp", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for (status, headers, ctype, body) in answers {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let mut r = BufReader::new(conn);
                let (mut len, mut session) = (0usize, None);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("mcp-session-id:") {
                        session = Some(line[15..].trim().to_owned());
                    }
                }
                let mut buf = vec![0u8; len];
                let _ = r.read_exact(&mut buf).await;
                let request: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
                let id = request.get("id").map(Value::to_string).unwrap_or_default();
                let _ = tx.send((request, session));
                let body = body.replace("{id}", &id);
                let mut conn = r.into_inner();
                let _ = conn
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\n{headers}content-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        (url, rx)
    }

    const INIT: (u16, &str, &str, &str) = (
        200,
        "mcp-session-id: s-1\r\n",
        "application/json",
        r#"{"jsonrpc":"2.0","id":{id},"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"t","version":"1"}}}"#,
    );
    const ACCEPTED: (u16, &str, &str, &str) = (202, "", "application/json", "");

    #[tokio::test]
    async fn sse_answers_are_picked_out_and_a_forgotten_session_is_started_again() {
        let (url, mut seen) = server(vec![
            INIT,
            ACCEPTED,
            // tools/list over SSE: a notification, a request of the server's own that
            // reuses our id, then the answer.
            (
                200,
                "",
                "text/event-stream",
                "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\n\n\
                 data: {\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"ping\"}\n\n\
                 data: {\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{\"tools\":[{\"name\":\"web-search\",\"inputSchema\":{\"properties\":{}}},{\"name\":\"web-search\"}]}}\n\n",
            ),
            // tools/call: the session is gone; a new one, then the answer.
            (404, "", "text/plain", "Not Found: Session not found"),
            INIT,
            ACCEPTED,
            (
                200,
                "",
                "application/json",
                r#"{"jsonrpc":"2.0","id":{id},"result":{"content":[{"type":"text","text":"found"}],"isError":false}}"#,
            ),
        ])
        .await;
        let c = McpClient::new(&url).expect("url");
        let tools = c.list_tools().await.expect("list");
        assert_eq!(tools.len(), 1, "names once: {tools:?}");
        assert_eq!(
            tools[0].input_schema["type"], "object",
            "object schemas only"
        );
        let r = c
            .call_tool("web-search", &json!({"query": "x"}))
            .await
            .expect("call");
        assert_eq!(
            r,
            McpResult {
                is_error: false,
                text: "found".into()
            }
        );
        let mut methods = Vec::new();
        while let Ok((req, session)) = seen.try_recv() {
            methods.push((
                req["method"].as_str().unwrap_or_default().to_owned(),
                session,
            ));
        }
        let s = Some("s-1".to_owned());
        assert_eq!(
            methods,
            vec![
                ("initialize".into(), None),
                ("notifications/initialized".into(), s.clone()),
                ("tools/list".into(), s.clone()),
                ("tools/call".into(), s.clone()),
                ("initialize".into(), None),
                ("notifications/initialized".into(), s.clone()),
                ("tools/call".into(), s),
            ]
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_costs_the_call_its_limit_not_the_task() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/mcp", listener.local_addr().expect("addr"));
        // Accepts, reads, says nothing.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                held.push(c);
            }
        });
        let c = McpClient::new(&url).expect("url");
        let started = std::time::Instant::now();
        let e = c
            .request("tools/list", json!({}), Duration::from_millis(300))
            .await
            .expect_err("no answer");
        assert!(matches!(e, McpError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn tool_names_the_messages_api_takes() {
        assert!(is_tool_name("web-search"));
        assert!(is_tool_name("a_b-9"));
        assert!(!is_tool_name(""));
        assert!(!is_tool_name("has space"));
        assert!(!is_tool_name("dot.ted"));
        assert!(!is_tool_name(&"x".repeat(65)));
    }

    #[test]
    fn errors_and_results_are_told_apart() {
        let ok = Answer {
            status: StatusCode::OK,
            session: None,
            message: Some(json!({"jsonrpc":"2.0","id":1,"result":{"tools":[]}})),
            body_text: String::new(),
        };
        assert_eq!(
            result_of("tools/list", ok).expect("result"),
            json!({"tools":[]})
        );
        let refused = Answer {
            status: StatusCode::OK,
            session: None,
            message: Some(
                json!({"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"no tool named \"x\""}}),
            ),
            body_text: String::new(),
        };
        let e = result_of("tools/call", refused).expect_err("error");
        assert!(e.to_string().contains("no tool named"), "{e}");
        let unauthorized = Answer {
            status: StatusCode::UNAUTHORIZED,
            session: None,
            message: None,
            body_text: "agent token refused".into(),
        };
        let e = result_of("tools/list", unauthorized).expect_err("error");
        assert!(e.to_string().contains("401"), "{e}");
    }
}
