//! The Anthropic Messages API, proxied: authenticate the agent, charge it, enforce its
//! limits, swap in the host's key, pass the answer (or the stream) through, record it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clawos_agent_token::Verifier;
use clawos_service::metrics::Counter;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::config::{ApiKind, Upstream};
use crate::ledger::{Ledger, Record, now_ms};
use crate::limits::{Decision, RateLimiter, TokenBudgets};
use crate::usage::{OpenAiSse, SseUsage, Usage, from_openai};

/// How agents authenticate.
pub enum AgentAuth {
    /// identity-manager JWTs, verified against its JWKS.
    Jwt(Box<Verifier>),
    /// Static per-agent tokens (development only): token → agent name.
    Static(HashMap<String, String>),
}

impl std::fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Jwt(_) => "AgentAuth::Jwt",
            Self::Static(_) => "AgentAuth::Static",
        })
    }
}

/// Counters for `/metrics`, in the proxy's registry.
#[derive(Debug)]
pub struct Metrics {
    registry: clawos_service::Metrics,
    pub requests: Counter,
    pub auth_failures: Counter,
    pub rate_limited: Counter,
    pub budget_refused: Counter,
    pub upstream_errors: Counter,
    pub input_tokens: Counter,
    pub output_tokens: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = clawos_service::Metrics::new();
        Self {
            requests: r.counter(
                "clawos_proxy_requests_total",
                "Requests forwarded upstream.",
            ),
            auth_failures: r.counter(
                "clawos_proxy_auth_failures_total",
                "Requests refused for their credential.",
            ),
            rate_limited: r.counter(
                "clawos_proxy_rate_limited_total",
                "Requests refused by the per-agent RPM limit.",
            ),
            budget_refused: r.counter(
                "clawos_proxy_budget_refused_total",
                "Requests refused by a token budget.",
            ),
            upstream_errors: r.counter(
                "clawos_proxy_upstream_errors_total",
                "Requests whose upstream failed or broke off.",
            ),
            input_tokens: r.counter(
                "clawos_proxy_input_tokens_total",
                "Input tokens charged (incl. cache).",
            ),
            output_tokens: r.counter("clawos_proxy_output_tokens_total", "Output tokens charged."),
            registry: r,
        }
    }
}

impl Metrics {
    fn add(c: &Counter, n: u64) {
        c.inc_by(n);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }

    /// The answer to `GET /metrics`.
    pub fn response(&self) -> Response {
        self.registry.response()
    }
}

/// Shared state of the proxy.
#[derive(Debug)]
pub struct Proxy {
    pub metrics: Metrics,
    /// Operator credential for `GET /v1/usage`.
    pub admin_token: String,
    /// Longest wait for a non-streaming upstream answer.
    pub upstream_timeout: Duration,
    pub auth: AgentAuth,
    pub upstreams: Vec<Upstream>,
    pub limiter: RateLimiter,
    pub budgets: TokenBudgets,
    pub ledger: Ledger,
    pub http: reqwest::Client,
}

/// Who is calling.
#[derive(Debug, Clone)]
struct Caller {
    agent: String,
    vm_id: String,
}

/// An error in the Anthropic API's shape, so the official SDKs understand it (and
/// retry 429/5xx as they do against the real API).
pub fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({ "type": "error", "error": { "type": kind, "message": message } });
    (status, axum::Json(body)).into_response()
}

fn credential(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_owned())
}

impl Proxy {
    async fn authenticate(&self, headers: &HeaderMap, api: ApiKind) -> Result<Caller, Response> {
        let unauthorized =
            |m: &str| error_for(api, StatusCode::UNAUTHORIZED, "authentication_error", m);
        let token = credential(headers).ok_or_else(|| {
            unauthorized("missing agent credential (x-api-key or Authorization: Bearer)")
        })?;
        match &self.auth {
            AgentAuth::Jwt(v) => v
                .verify(&token)
                .await
                .map(|c| Caller {
                    agent: c.agent,
                    vm_id: c.vm_id,
                })
                .map_err(|e| unauthorized(&e.to_string())),
            AgentAuth::Static(map) => map
                .get(&token)
                .map(|a| Caller {
                    agent: a.clone(),
                    vm_id: String::new(),
                })
                .ok_or_else(|| unauthorized("unknown agent credential")),
        }
    }

    /// Charges the agent's budgets and writes the record.
    fn finish(&self, record: Record) {
        let m = &self.metrics;
        Metrics::add(&m.requests, 1);
        if record.error.is_some() || record.status >= 500 {
            Metrics::add(&m.upstream_errors, 1);
        }
        let u = record.usage;
        Metrics::add(
            &m.input_tokens,
            u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens,
        );
        Metrics::add(&m.output_tokens, u.output_tokens);
        self.budgets.charge(
            &record.agent,
            record.usage.total(),
            Instant::now(),
            now_ms(),
        );
        self.ledger.record(record);
    }

    fn upstream_for(&self, model: &str, api: ApiKind) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|u| u.kind == api && u.serves(model))
    }
}

fn request_id() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    format!("req_{}", hex::encode(b))
}

/// An error in the OpenAI API's shape.
pub fn openai_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let code = if status == StatusCode::TOO_MANY_REQUESTS {
        json!("rate_limit_exceeded")
    } else {
        Value::Null
    };
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    (status, axum::Json(body)).into_response()
}

fn error_for(api: ApiKind, status: StatusCode, anthropic_kind: &str, message: &str) -> Response {
    match api {
        ApiKind::Anthropic => anthropic_error(status, anthropic_kind, message),
        ApiKind::Openai => {
            let kind = match anthropic_kind {
                "authentication_error" => "invalid_request_error",
                "rate_limit_error" => "requests",
                "invalid_request_error" => "invalid_request_error",
                _ => "server_error",
            };
            openai_error(status, kind, message)
        }
    }
}

/// Reads usage out of a stream, in either API's event format.
enum StreamParser {
    Anthropic(SseUsage),
    Openai(OpenAiSse),
}

impl StreamParser {
    /// Returns the bytes to forward to the client.
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Self::Anthropic(p) => {
                p.feed(&chunk);
                chunk
            }
            Self::Openai(p) => Bytes::from(p.feed(&chunk)),
        }
    }
    fn finish(&mut self) -> Bytes {
        match self {
            Self::Anthropic(_) => Bytes::new(),
            Self::Openai(p) => Bytes::from(p.finish()),
        }
    }
    fn usage(&self) -> Usage {
        match self {
            Self::Anthropic(p) => p.usage,
            Self::Openai(p) => p.usage,
        }
    }
    fn complete(&self) -> bool {
        match self {
            Self::Anthropic(p) => p.complete,
            Self::Openai(p) => p.complete,
        }
    }
    fn error_event(&self, message: &str) -> Bytes {
        Bytes::from(match self {
            Self::Anthropic(_) => {
                let ev = json!({ "type": "error", "error": { "type": "api_error", "message": message } });
                format!("event: error\ndata: {ev}\n\n")
            }
            Self::Openai(_) => {
                let ev = json!({ "error": { "message": message, "type": "server_error", "param": null, "code": null } });
                format!("data: {ev}\n\n")
            }
        })
    }
}

/// `POST /v1/messages` (Anthropic).
pub async fn messages(State(p): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    forward(p, ApiKind::Anthropic, headers, body).await
}

/// `POST /v1/chat/completions` (OpenAI-compatible).
pub async fn chat_completions(
    State(p): State<Arc<Proxy>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    forward(p, ApiKind::Openai, headers, body).await
}

/// `POST /v1/messages/count_tokens` (Anthropic): authenticated, passed through with the
/// host key, not charged (it consumes no tokens).
pub async fn count_tokens(
    State(p): State<Arc<Proxy>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = p.authenticate(&headers, ApiKind::Anthropic).await {
        return r;
    }
    let model = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["model"].as_str().map(str::to_owned));
    let Some(model) = model else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body must be JSON with a model",
        );
    };
    let Some(up) = p.upstream_for(&model, ApiKind::Anthropic) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("model {model} is not served by this proxy"),
        );
    };
    let resp = p
        .http
        .post(format!(
            "{}/v1/messages/count_tokens",
            up.base_url.trim_end_matches('/')
        ))
        .header("x-api-key", up.api_key.as_str())
        .header(
            "anthropic-version",
            headers
                .get("anthropic-version")
                .cloned()
                .unwrap_or(HeaderValue::from_static("2023-06-01")),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = r.bytes().await.unwrap_or_default();
            let mut out = Response::new(Body::from(bytes));
            *out.status_mut() = status;
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            out
        }
        Err(_) => anthropic_error(
            StatusCode::BAD_GATEWAY,
            "api_error",
            &format!("upstream {} unreachable", up.name),
        ),
    }
}

/// `GET /v1/models` (OpenAI-compatible): the exact model names configured.
pub async fn models(State(p): State<Arc<Proxy>>, headers: HeaderMap) -> Response {
    if let Err(r) = p.authenticate(&headers, ApiKind::Openai).await {
        return r;
    }
    let data: Vec<Value> = p
        .upstreams
        .iter()
        .flat_map(|u| {
            u.models.iter().filter(|m| !m.ends_with('*')).map(
                move |m| json!({ "id": m, "object": "model", "created": 0, "owned_by": u.name }),
            )
        })
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

async fn forward(p: Arc<Proxy>, api: ApiKind, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let caller = match p.authenticate(&headers, api).await {
        Ok(c) => c,
        Err(resp) => {
            Metrics::add(&p.metrics.auth_failures, 1);
            return resp;
        }
    };
    let mut parsed: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return error_for(
                api,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request body must be a JSON object",
            );
        }
        Err(e) => {
            return error_for(
                api,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("malformed JSON body: {e}"),
            );
        }
    };
    let Some(model) = parsed
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return error_for(
            api,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model: field required",
        );
    };
    let stream = parsed
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Decision::Deny { retry_after } = p.limiter.check(&caller.agent) {
        Metrics::add(&p.metrics.rate_limited, 1);
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = error_for(
            api,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!(
                "agent {} is over its requests-per-minute limit; retry in {secs}s",
                caller.agent
            ),
        );
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
        return resp;
    }
    if let Decision::Deny { retry_after } = p.budgets.check(&caller.agent, Instant::now(), now_ms())
    {
        Metrics::add(&p.metrics.budget_refused, 1);
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = error_for(
            api,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!(
                "agent {} has used its token budget; retry in {secs}s",
                caller.agent
            ),
        );
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
        return resp;
    }
    let Some(up) = p.upstream_for(&model, api).cloned() else {
        return error_for(
            api,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("model {model} is not served by this proxy"),
        );
    };
    // OpenAI streams report usage only when asked: always ask, and hide the extra chunk
    // from clients that did not.
    let mut client_wants_usage = false;
    let body = if api == ApiKind::Openai && stream {
        client_wants_usage = parsed["stream_options"]["include_usage"].as_bool() == Some(true);
        parsed["stream_options"] = json!({ "include_usage": true });
        Bytes::from(parsed.to_string())
    } else {
        body
    };
    let id = request_id();
    let mut record = Record {
        request_id: id.clone(),
        time_ms: now_ms(),
        agent: caller.agent.clone(),
        vm_id: caller.vm_id.clone(),
        model: model.clone(),
        upstream: up.name.clone(),
        api: match api {
            ApiKind::Anthropic => "anthropic",
            ApiKind::Openai => "openai",
        },
        stream,
        status: 0,
        usage: Usage::default(),
        latency_ms: 0,
        error: None,
    };
    // The agent's credential stops here; the host's key goes upstream.
    let base = up.base_url.trim_end_matches('/');
    let mut req = match api {
        ApiKind::Anthropic => {
            let mut r = p
                .http
                .post(format!("{base}/v1/messages"))
                .header("x-api-key", up.api_key.as_str())
                .header(
                    "anthropic-version",
                    headers
                        .get("anthropic-version")
                        .cloned()
                        .unwrap_or(HeaderValue::from_static("2023-06-01")),
                );
            if let Some(beta) = headers.get("anthropic-beta") {
                r = r.header("anthropic-beta", beta.clone());
            }
            r
        }
        ApiKind::Openai => p
            .http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&up.api_key),
    };
    req = req.header("content-type", "application/json").body(body);
    if !stream {
        // A slow upstream gets a 504, not a hung agent. Streams are bounded by the
        // upstream's own pacing.
        req = req.timeout(p.upstream_timeout);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let (status, kind) = if e.is_timeout() {
                (StatusCode::GATEWAY_TIMEOUT, "timeout_error")
            } else {
                (StatusCode::BAD_GATEWAY, "api_error")
            };
            record.status = status.as_u16();
            record.error = Some(format!("upstream {}: {e}", up.name));
            record.latency_ms = started.elapsed().as_millis() as u64;
            p.finish(record);
            return error_for(
                api,
                status,
                kind,
                &format!("upstream {} unreachable", up.name),
            );
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    record.status = status.as_u16();
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_sse {
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                record.status = StatusCode::BAD_GATEWAY.as_u16();
                record.error = Some(format!("upstream body: {e}"));
                record.latency_ms = started.elapsed().as_millis() as u64;
                p.finish(record);
                return error_for(
                    api,
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "upstream answer was cut off",
                );
            }
        };
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            record.usage = match api {
                ApiKind::Anthropic => Usage::from_anthropic(&v["usage"]),
                ApiKind::Openai => from_openai(&v["usage"]),
            };
        }
        record.latency_ms = started.elapsed().as_millis() as u64;
        p.finish(record);
        let mut out = Response::new(Body::from(bytes));
        *out.status_mut() = status;
        out.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        out.headers_mut().insert(
            "request-id",
            HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("")),
        );
        return out;
    }
    // Stream: a task reads the upstream to its end whatever the client does, so usage
    // is never lost; the client gets chunks as they arrive, unbuffered.
    let mut parser = match api {
        ApiKind::Anthropic => StreamParser::Anthropic(SseUsage::default()),
        ApiKind::Openai => StreamParser::Openai(OpenAiSse::new(client_wants_usage)),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let ledger_proxy = Arc::clone(&p);
    tokio::spawn(async move {
        let mut upstream = resp.bytes_stream();
        let mut client_gone = false;
        while let Some(chunk) = upstream.next().await {
            match chunk {
                Ok(b) => {
                    let out = parser.feed(b);
                    if !client_gone && !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                        client_gone = true;
                    }
                }
                Err(e) => {
                    record.error = Some(format!("upstream stream broke: {e}"));
                    break;
                }
            }
        }
        let rest = parser.finish();
        if !client_gone && !rest.is_empty() {
            let _ = tx.send(Ok(rest)).await;
        }
        if !parser.complete() && record.error.is_none() {
            record.error = Some("upstream stream ended before its end marker".into());
        }
        if let Some(err) = &record.error
            && !client_gone
        {
            let _ = tx.send(Ok(parser.error_event(err))).await;
        }
        if client_gone && record.error.is_none() {
            record.error = Some("client disconnected; upstream read to the end".into());
        }
        record.usage = parser.usage();
        record.latency_ms = started.elapsed().as_millis() as u64;
        ledger_proxy.finish(record);
    });
    let body = Body::from_stream(tokio_stream_from(rx));
    let mut out = Response::new(body);
    *out.status_mut() = status;
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out.headers_mut().insert(
        "request-id",
        HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("")),
    );
    out
}

/// A receiver as a stream.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Default upstream timeout for the whole answer of a non-streaming call.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(600);
