//! A local stand-in for the Anthropic API (the only thing tests cannot reach): real
//! wire format — JSON messages, and SSE with the real event sequence and `usage` — and
//! a record of which credentials arrived (model `fail-500` answers 500); likewise OpenAI chat completions (JSON, and
//! SSE chunks with the `include_usage` chunk and `[DONE]`). Model `fail-midstream` drops the connection
//! in the middle of a stream; model `claude-delay-<ms>` answers after `<ms>` milliseconds. A request
//! declaring a `web_search_*` server tool is answered as if one search ran (`usage.server_tool_use`).
//! [`redirector`] is a hostile upstream that answers every request with a redirect.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every `x-api-key` value received.
    pub api_keys: Vec<String>,
    /// Every `authorization` value received.
    pub authorizations: Vec<String>,
    pub requests: usize,
    /// Every `anthropic-beta` value received.
    pub betas: Vec<String>,
    /// `POST /v1/messages/count_tokens` requests (not in `requests`).
    pub count_tokens: usize,
    /// The body of the last messages or chat-completions request.
    pub last_body: Value,
}

#[derive(Debug)]
struct Upstream {
    key: String,
    seen: Mutex<Seen>,
}

/// Words in the prompt: the fake's input token count.
fn input_tokens(body: &Value) -> u64 {
    body["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    m["content"]
                        .as_str()
                        .map_or(1, |c| c.split_whitespace().count() as u64)
                })
                .sum()
        })
        .unwrap_or(0)
}

const WORDS: [&str; 4] = ["Hello", " from", " fake", " claude"];

/// `usage.server_tool_use` for a request: one web search when it declares the tool.
fn server_tool_use(req: &Value) -> Option<Value> {
    let searches = req["tools"].as_array().is_some_and(|ts| {
        ts.iter().any(|t| {
            t["type"]
                .as_str()
                .is_some_and(|ty| ty.starts_with("web_search"))
        })
    });
    searches.then(|| json!({"web_search_requests": 1}))
}

async fn messages(State(u): State<Arc<Upstream>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    {
        let mut s = u.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.requests += 1;
        s.api_keys.push(key.clone());
        if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            s.authorizations.push(a.to_owned());
        }
        for b in headers.get_all("anthropic-beta") {
            s.betas
                .push(String::from_utf8_lossy(b.as_bytes()).into_owned());
        }
    }
    if key != u.key {
        let e = json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}});
        return (StatusCode::UNAUTHORIZED, axum::Json(e)).into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    u.seen.lock().unwrap_or_else(|p| p.into_inner()).last_body = req.clone();
    let model = req["model"].as_str().unwrap_or("").to_owned();
    let input = input_tokens(&req);
    let id = format!("msg_fake_{input}");
    if model == "slow-model" {
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    }
    if let Some(ms) = model
        .strip_prefix("claude-delay-")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut final_usage = json!({"output_tokens": WORDS.len()});
    if let Some(stu) = server_tool_use(&req) {
        final_usage["server_tool_use"] = stu;
    }
    if model == "fail-500" {
        let e = json!({"type": "error", "error": {"type": "api_error", "message": "injected upstream failure"}});
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(e)).into_response();
    }
    if req["stream"].as_bool() != Some(true) {
        let text: String = WORDS.concat();
        let mut usage = final_usage;
        usage["input_tokens"] = json!(input);
        return axum::Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": usage,
        }))
        .into_response();
    }
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    for w in WORDS {
        events.push(("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": final_usage})));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let fail = model == "fail-midstream";
    // Paced like a real stream, so what precedes a failure reaches the client.
    let stream = futures_util::StreamExt::then(
        futures_util::stream::iter(events.into_iter().enumerate()),
        move |(i, (name, data))| async move {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            if fail && i == 5 {
                Err(std::io::Error::other("upstream died"))
            } else {
                Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

async fn chat_completions(
    State(u): State<Arc<Upstream>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    {
        let mut s = u.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.requests += 1;
        s.authorizations.push(auth.clone());
        if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            s.api_keys.push(k.to_owned());
        }
    }
    if auth != format!("Bearer {}", u.key) {
        let e = json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
        return (StatusCode::UNAUTHORIZED, axum::Json(e)).into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    u.seen.lock().unwrap_or_else(|p| p.into_inner()).last_body = req.clone();
    let model = req["model"].as_str().unwrap_or("").to_owned();
    let prompt = input_tokens(&req);
    let words = ["Hello", " from", " fake", " gpt"];
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": words.len(), "total_tokens": prompt + words.len() as u64});
    if req["stream"].as_bool() != Some(true) {
        return axum::Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat()}, "finish_reason": "stop", "logprobs": null}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for w in words {
        events.push(chunk(json!({"content": w}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if req["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage}));
    }
    let mut text: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    text.push_str("data: [DONE]\n\n");
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(text))
        .unwrap_or_default()
}

async fn count_tokens(State(u): State<Arc<Upstream>>, headers: HeaderMap, body: Bytes) -> Response {
    {
        let mut s = u.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.count_tokens += 1;
        if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            s.api_keys.push(k.to_owned());
        }
        if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            s.authorizations.push(a.to_owned());
        }
    }
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(u.key.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    axum::Json(json!({"input_tokens": input_tokens(&req)})).into_response()
}

/// A running fake; dropping it does not stop the server (it lives for the test process).
#[derive(Debug, Clone)]
pub struct FakeAnthropic {
    pub url: String,
    state: Arc<Upstream>,
}

impl FakeAnthropic {
    /// Starts on a free loopback port, accepting only `key`.
    pub fn start(key: &str) -> Self {
        let state = Arc::new(Upstream {
            key: key.to_owned(),
            seen: Mutex::new(Seen::default()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake upstream");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        listener.set_nonblocking(true).expect("nonblocking");
        let app = axum::Router::new()
            .route("/v1/messages", axum::routing::post(messages))
            .route(
                "/v1/chat/completions",
                axum::routing::post(chat_completions),
            )
            .route(
                "/v1/messages/count_tokens",
                axum::routing::post(count_tokens),
            )
            .with_state(Arc::clone(&state));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                // Like a real API server: small SSE writes go out at once.
                use axum::serve::ListenerExt;
                let l = l.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let _ = axum::serve(l, app).await;
            });
        });
        Self { url, state }
    }

    /// A snapshot of what arrived so far.
    pub fn seen(&self) -> (Vec<String>, Vec<String>, usize) {
        let s = self.state.seen.lock().unwrap_or_else(|p| p.into_inner());
        (s.api_keys.clone(), s.authorizations.clone(), s.requests)
    }

    /// Every `anthropic-beta` header value received.
    pub fn betas(&self) -> Vec<String> {
        let s = self.state.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.betas.clone()
    }

    /// The body of the last messages or chat-completions request (JSON null before).
    pub fn last_body(&self) -> Value {
        let s = self.state.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.last_body.clone()
    }

    /// How many `count_tokens` requests arrived.
    pub fn count_tokens_requests(&self) -> usize {
        let s = self.state.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.count_tokens
    }
}

/// Serves `app` on a free loopback port from its own thread; returns the base URL.
fn serve_in_thread(app: axum::Router) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(l, app).await;
        });
    });
    url
}

/// A hostile upstream: every request, whatever its method and path, is answered
/// `307 Temporary Redirect` to the same path on `target` (a client that follows it
/// re-sends the method, the body and, unless it takes care, the credential). Returns
/// its base URL.
pub fn redirector(target: &str) -> String {
    let target = target.trim_end_matches('/').to_owned();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let to = format!("{target}{}", uri.path());
        async move {
            Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header("location", to)
                .body(Body::empty())
                .unwrap_or_default()
        }
    });
    serve_in_thread(app)
}
