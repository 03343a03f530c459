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
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::llm::{Endpoint, EndpointError, SseParser};

/// The protocol version this client speaks.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
/// Most of an answer read (a tool's result is capped far below this by the host).
const MAX_ANSWER: usize = 4 << 20;
/// How long connecting may take (loopback to the guest's relay).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long listing the tools may take (once per task).
pub const LIST_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Client for one MCP server.
#[derive(Debug)]
pub struct McpClient {
    endpoint: Endpoint,
    /// The server's session id once initialized (`Some(None)`: initialized, and the
    /// server keeps no sessions).
    session: Mutex<Option<Option<String>>>,
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

    /// The tools the server offers this agent now.
    pub async fn list_tools(&self) -> Result<Vec<McpTool>, McpError> {
        let result = self.request("tools/list", json!({})).await?;
        let tools = result
            .get("tools")
            .and_then(Value::as_array)
            .ok_or_else(|| McpError::Protocol {
                method: "tools/list".into(),
                detail: "no tools array".into(),
            })?;
        Ok(tools
            .iter()
            .filter_map(|t| {
                Some(McpTool {
                    name: t.get("name")?.as_str()?.to_owned(),
                    description: t
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    input_schema: t
                        .get("inputSchema")
                        .filter(|s| s.is_object())
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object"})),
                })
            })
            .collect())
    }

    /// Calls tool `name` with `arguments` (a JSON object).
    pub async fn call_tool(&self, name: &str, arguments: &Value) -> Result<McpResult, McpError> {
        let result = self
            .request("tools/call", json!({"name": name, "arguments": arguments}))
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
    /// more if the server has forgotten it) and returns its `result`.
    async fn request(&self, method: &str, params: Value) -> Result<Value, McpError> {
        let mut session = self.session.lock().await;
        for attempt in 0..2 {
            let id = match session.as_ref() {
                Some(id) => id.clone(),
                None => {
                    let id = self.initialize().await?;
                    *session = Some(id.clone());
                    id
                }
            };
            let answer = self
                .post(&self.message(method, params.clone()), id.as_deref())
                .await?;
            if answer.status == StatusCode::NOT_FOUND && id.is_some() && attempt == 0 {
                *session = None;
                continue;
            }
            return result_of(method, answer);
        }
        Err(McpError::Protocol {
            method: method.into(),
            detail: "the server forgot the session it had just started".into(),
        })
    }

    /// Starts a session: `initialize`, then `notifications/initialized`.
    async fn initialize(&self) -> Result<Option<String>, McpError> {
        let init = self.message(
            "initialize",
            json!({
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "clawos-agentd", "version": env!("CARGO_PKG_VERSION")},
            }),
        );
        let answer = self.post(&init, None).await?;
        let session = answer.session.clone();
        result_of("initialize", answer)?;
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let answer = self.post(&note, session.as_deref()).await?;
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
    async fn post(&self, message: &Value, session: Option<&str>) -> Result<Answer, McpError> {
        let authority = &self.endpoint.authority;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
            .await
            .map_err(|_| McpError::ConnectTimeout {
                authority: authority.clone(),
            })?
            .map_err(|source| McpError::Connect {
                authority: authority.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = if self.endpoint.path.is_empty() {
            "/"
        } else {
            self.endpoint.path.as_str()
        };
        let mut req = Request::post(path)
            .header(header::HOST, authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .header("mcp-protocol-version", PROTOCOL_VERSION);
        if let Some(s) = session {
            req = req.header("mcp-session-id", s);
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
        let mut parser = SseParser::default();
        let mut found = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            if raw.len() + data.len() > MAX_ANSWER {
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
                    if let Ok(v) = serde_json::from_str::<Value>(&data)
                        && want_id.is_some()
                        && v.get("id") == want_id.as_ref()
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
    if !answer.status.is_success() {
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
