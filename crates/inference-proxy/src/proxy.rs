//! The agent-facing LLM APIs, proxied: authenticate the agent, hold one of its
//! in-flight slots, check the request (strict types, the agent's policy), apply its
//! rate limit, reserve its largest possible cost in its token budgets, swap in the
//! host's key, pass the answer (or the stream) through, settle the budget with the
//! usage the upstream reported and record it.
//!
//! The exchange with the upstream runs in its own task, so it is read to its end and
//! recorded whatever the client does. Redirects from an upstream are never followed:
//! a 3xx is an upstream error, and the host's key is sent to the configured URL only.

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
use crate::conns::ConnMetrics;
use crate::ledger::{Ledger, Record, now_ms};
use crate::limits::{BudgetRefusal, Decision, InFlight, RateLimiter, Ticket, TokenBudgets};
use crate::policy::Policies;
use crate::request::Endpoint;
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
    pub in_flight_refused: Counter,
    pub policy_refused: Counter,
    pub invalid_requests: Counter,
    pub upstream_errors: Counter,
    pub input_tokens: Counter,
    pub output_tokens: Counter,
    pub server_tool_requests: Counter,
    pub conns: ConnMetrics,
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
            in_flight_refused: r.counter(
                "clawos_proxy_in_flight_refused_total",
                "Requests refused by the per-agent in-flight cap.",
            ),
            policy_refused: r.counter(
                "clawos_proxy_policy_refused_total",
                "Requests refused for a beta flag or provider-side feature the agent may not use.",
            ),
            invalid_requests: r.counter(
                "clawos_proxy_invalid_requests_total",
                "Requests refused as malformed (400, 408, 413).",
            ),
            upstream_errors: r.counter(
                "clawos_proxy_upstream_errors_total",
                "Requests whose upstream failed, broke off or redirected.",
            ),
            input_tokens: r.counter(
                "clawos_proxy_input_tokens_total",
                "Input tokens charged (incl. cache).",
            ),
            output_tokens: r.counter("clawos_proxy_output_tokens_total", "Output tokens charged."),
            server_tool_requests: r.counter(
                "clawos_proxy_server_tool_requests_total",
                "Server-side tool calls the provider reported (web searches, fetches).",
            ),
            conns: ConnMetrics {
                evicted: r.counter(
                    "clawos_proxy_connections_evicted_total",
                    "Idle client connections closed to make room for new ones.",
                ),
                refused: r.counter(
                    "clawos_proxy_connections_refused_total",
                    "Client connections refused: the table was full of busy connections.",
                ),
                timed_out: r.counter(
                    "clawos_proxy_connections_timed_out_total",
                    "Client connections closed by the header or idle timeout.",
                ),
                open: r.gauge(
                    "clawos_proxy_connections_open",
                    "Client connections held now.",
                ),
            },
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
    /// Longest wait for a non-streaming upstream answer, and between two chunks of a
    /// stream.
    pub upstream_timeout: Duration,
    /// Longest wait for a request body once its head has arrived.
    pub body_timeout: Duration,
    pub auth: AgentAuth,
    pub upstreams: Vec<Upstream>,
    pub limiter: RateLimiter,
    pub in_flight: InFlight,
    pub budgets: TokenBudgets,
    /// `max_tokens` set on OpenAI requests without one while a budget is on.
    pub default_max_tokens: u64,
    pub policies: Policies,
    pub ledger: Ledger,
    /// Upstream client: never follows redirects.
    pub http: reqwest::Client,
}

/// The upstream HTTP client: no redirects (a redirect would carry the host's key
/// wherever the upstream points), bounded connect time and idle pool.
pub fn upstream_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(16)
        .build()
}

/// Who is calling.
#[derive(Debug, Clone)]
struct Caller {
    agent: String,
    vm_id: String,
}

/// Largest request body accepted (the limit the proxy has always had).
pub const MAX_REQUEST_BYTES: usize = 2 << 20;

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

    /// Ends a request: settles its budget reservation with what the upstream reported
    /// (the reservation if a successful answer reported nothing; nothing if it failed),
    /// frees its in-flight slot and writes the record.
    fn finish(&self, mut record: Record, slot: Slot) {
        let reported = record.usage.total();
        let succeeded = (200..300).contains(&record.status) && record.error.is_none();
        let charged = if reported > 0 {
            reported
        } else if succeeded {
            slot.reserved()
        } else {
            0
        };
        record.charged_tokens = charged;
        slot.settle(charged);
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
        Metrics::add(&m.server_tool_requests, u.server_tool_requests);
        self.ledger.record(record);
    }

    fn upstream_for(&self, model: &str, api: ApiKind) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|u| u.kind == api && u.serves(model))
    }
}

/// One request's hold on its agent's limits: an in-flight slot from authentication on,
/// and the budget reservation once made. Dropped without [`Slot::settle`] (the request
/// failed before the upstream, or its task ended), both are given back.
struct Slot {
    p: Arc<Proxy>,
    agent: String,
    ticket: Option<Ticket>,
}

impl Slot {
    fn acquire(p: &Arc<Proxy>, agent: &str) -> Option<Self> {
        p.in_flight.try_acquire(agent).then(|| Self {
            p: Arc::clone(p),
            agent: agent.to_owned(),
            ticket: None,
        })
    }

    fn reserved(&self) -> u64 {
        self.ticket.map_or(0, |t| t.tokens)
    }

    fn settle(mut self, charged: u64) {
        if let Some(t) = self.ticket.take() {
            self.p
                .budgets
                .settle(&self.agent, t, charged, Instant::now(), now_ms());
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.p
                .budgets
                .settle(&self.agent, t, 0, Instant::now(), now_ms());
        }
        self.p.in_flight.release(&self.agent);
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
                "rate_limit_error" => "requests",
                "authentication_error"
                | "invalid_request_error"
                | "permission_error"
                | "request_too_large" => "invalid_request_error",
                _ => "server_error",
            };
            openai_error(status, kind, message)
        }
    }
}

/// A 429 with `retry-after`.
fn too_many(api: ApiKind, retry_after: Duration, message: &str) -> Response {
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp = error_for(
        api,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        &message.replace("{secs}", &secs.to_string()),
    );
    resp.headers_mut()
        .insert("retry-after", HeaderValue::from(secs));
    resp
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
pub async fn messages(State(p): State<Arc<Proxy>>, headers: HeaderMap, body: Body) -> Response {
    handle(p, Endpoint::Messages, headers, body).await
}

/// `POST /v1/chat/completions` (OpenAI-compatible).
pub async fn chat_completions(
    State(p): State<Arc<Proxy>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(p, Endpoint::ChatCompletions, headers, body).await
}

/// `POST /v1/messages/count_tokens` (Anthropic): like a message for authentication,
/// the in-flight cap, the policy and the RPM limit; recorded with kind `count_tokens`,
/// charged nothing (it consumes no tokens).
pub async fn count_tokens(State(p): State<Arc<Proxy>>, headers: HeaderMap, body: Body) -> Response {
    handle(p, Endpoint::CountTokens, headers, body).await
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

/// Reads the body once the caller is known, bounded in size and time.
async fn read_body(
    p: &Proxy,
    api: ApiKind,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Response> {
    let too_large = || {
        error_for(
            api,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            &format!("request body is larger than {MAX_REQUEST_BYTES} bytes"),
        )
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_REQUEST_BYTES as u64)
    {
        return Err(too_large());
    }
    match tokio::time::timeout(
        p.body_timeout,
        axum::body::to_bytes(body, MAX_REQUEST_BYTES),
    )
    .await
    {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(error_for(
            api,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!(
                "request body could not be read: cut off, or larger than {MAX_REQUEST_BYTES} bytes"
            ),
        )),
        Err(_) => Err(error_for(
            api,
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            &format!(
                "request body not received within {} s",
                p.body_timeout.as_secs()
            ),
        )),
    }
}

/// Everything about a request up to the upstream call.
async fn handle(p: Arc<Proxy>, ep: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let api = ep.api();
    let started = Instant::now();
    let caller = match p.authenticate(&headers, api).await {
        Ok(c) => c,
        Err(resp) => {
            Metrics::add(&p.metrics.auth_failures, 1);
            return resp;
        }
    };
    // Held before the body is read, so a slow body counts against the agent too.
    let Some(mut slot) = Slot::acquire(&p, &caller.agent) else {
        Metrics::add(&p.metrics.in_flight_refused, 1);
        return too_many(
            api,
            Duration::from_secs(1),
            &format!(
                "agent {} already has {} requests in flight, the most it may have at once; retry when one finishes",
                caller.agent,
                p.in_flight.max()
            ),
        );
    };
    let invalid = |status: StatusCode, m: &str| {
        Metrics::add(&p.metrics.invalid_requests, 1);
        error_for(api, status, "invalid_request_error", m)
    };
    let bytes = match read_body(&p, api, &headers, body).await {
        Ok(b) => b,
        Err(r) => {
            Metrics::add(&p.metrics.invalid_requests, 1);
            return r;
        }
    };
    let mut parsed = match crate::request::parse(&bytes) {
        Ok(v) => v,
        Err(m) => return invalid(StatusCode::BAD_REQUEST, &m),
    };
    let shape = match crate::request::check(ep, &parsed) {
        Ok(s) => s,
        Err(m) => return invalid(StatusCode::BAD_REQUEST, &m),
    };
    let beta = match crate::policy::check(
        p.policies.for_agent(&caller.agent),
        &caller.agent,
        ep,
        &headers,
        &parsed,
    ) {
        Ok(b) => b,
        Err(m) => {
            Metrics::add(&p.metrics.policy_refused, 1);
            return error_for(api, StatusCode::FORBIDDEN, "permission_error", &m);
        }
    };
    let Some(up) = p.upstream_for(&shape.model, api).cloned() else {
        return invalid(
            StatusCode::BAD_REQUEST,
            &format!("model {} is not served by this proxy", shape.model),
        );
    };
    if let Decision::Deny { retry_after } = p.limiter.check(&caller.agent) {
        Metrics::add(&p.metrics.rate_limited, 1);
        return too_many(
            api,
            retry_after,
            &format!(
                "agent {} is over its requests-per-minute limit; retry in {{secs}}s",
                caller.agent
            ),
        );
    }
    // The body goes upstream as the agent sent it, unless the proxy must set a field.
    let mut rewrite = false;
    let mut max_output = shape.max_output;
    if ep == Endpoint::ChatCompletions && max_output.is_none() && p.budgets.enabled() {
        // Without a maximum the answer is unbounded, and so would be its cost.
        parsed["max_tokens"] = json!(p.default_max_tokens);
        max_output = Some(p.default_max_tokens.saturating_mul(shape.choices));
        rewrite = true;
    }
    let reserve = match ep {
        Endpoint::CountTokens => 0,
        _ => shape.input_estimate + max_output.unwrap_or(0),
    };
    match p
        .budgets
        .reserve(&caller.agent, reserve, Instant::now(), now_ms())
    {
        Ok(t) => slot.ticket = Some(t),
        Err(BudgetRefusal::Wait {
            window,
            left,
            retry_after,
        }) => {
            Metrics::add(&p.metrics.budget_refused, 1);
            return too_many(
                api,
                retry_after,
                &format!(
                    "agent {} has used its token budget: this request may cost up to {reserve} tokens (input estimate {} + maximum output {}) and its {window} budget has {left} left; retry in {{secs}}s",
                    caller.agent,
                    shape.input_estimate,
                    max_output.unwrap_or(0)
                ),
            );
        }
        Err(BudgetRefusal::TooLarge { window, limit }) => {
            Metrics::add(&p.metrics.budget_refused, 1);
            return invalid(
                StatusCode::BAD_REQUEST,
                &format!(
                    "this request may cost up to {reserve} tokens (input estimate {} + maximum output {}), more than agent {}'s whole {window} token budget of {limit}; lower max_tokens or the prompt",
                    shape.input_estimate,
                    max_output.unwrap_or(0),
                    caller.agent
                ),
            );
        }
    }
    // OpenAI streams report usage only when asked: always ask, and hide the extra chunk
    // from clients that did not.
    let mut client_wants_usage = false;
    if ep == Endpoint::ChatCompletions && shape.stream {
        client_wants_usage = parsed["stream_options"]["include_usage"].as_bool() == Some(true);
        parsed["stream_options"] = json!({ "include_usage": true });
        rewrite = true;
    }
    let body = if rewrite {
        Bytes::from(parsed.to_string())
    } else {
        bytes
    };
    let id = request_id();
    let record = Record {
        request_id: id.clone(),
        time_ms: now_ms(),
        agent: caller.agent.clone(),
        vm_id: caller.vm_id.clone(),
        model: shape.model.clone(),
        upstream: up.name.clone(),
        api: match api {
            ApiKind::Anthropic => "anthropic",
            ApiKind::Openai => "openai",
        },
        kind: ep.kind(),
        stream: shape.stream,
        status: 0,
        usage: Usage::default(),
        charged_tokens: 0,
        latency_ms: 0,
        error: None,
    };
    // The agent's credential stops here; the host's key goes upstream, to the
    // configured URL only.
    let url = format!("{}{}", up.base_url.trim_end_matches('/'), ep.path());
    let mut req = match api {
        ApiKind::Anthropic => {
            let mut r = p
                .http
                .post(url)
                .header("x-api-key", up.api_key.as_str())
                .header(
                    "anthropic-version",
                    headers
                        .get("anthropic-version")
                        .cloned()
                        .unwrap_or(HeaderValue::from_static("2023-06-01")),
                );
            if let Some(beta) = beta {
                r = r.header("anthropic-beta", beta);
            }
            r
        }
        ApiKind::Openai => p.http.post(url).bearer_auth(&up.api_key),
    };
    req = req.header("content-type", "application/json").body(body);
    if !shape.stream {
        // A slow upstream gets a 504, not a hung agent. Streams are bounded by the
        // upstream's own pacing, and a gap between chunks.
        req = req.timeout(p.upstream_timeout);
    }
    let exchange = Exchange {
        p: Arc::clone(&p),
        ep,
        upstream: up.name,
        client_wants_usage,
        record,
        slot,
        started,
        id,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(exchange.run(req, tx));
    rx.await.unwrap_or_else(|_| {
        error_for(
            api,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "the proxy lost this request's upstream exchange",
        )
    })
}

/// One request's exchange with its upstream, run to its end in its own task.
struct Exchange {
    p: Arc<Proxy>,
    ep: Endpoint,
    upstream: String,
    client_wants_usage: bool,
    record: Record,
    slot: Slot,
    started: Instant,
    id: String,
}

impl Exchange {
    fn fail(mut self, status: StatusCode, kind: &str, log: String, message: &str) -> Response {
        self.record.status = status.as_u16();
        self.record.error = Some(log);
        self.record.latency_ms = self.started.elapsed().as_millis() as u64;
        self.p.finish(self.record, self.slot);
        error_for(self.ep.api(), status, kind, message)
    }

    fn with_id(&self, mut out: Response) -> Response {
        if let Ok(v) = HeaderValue::from_str(&self.id) {
            out.headers_mut().insert("request-id", v);
        }
        out
    }

    async fn run(
        mut self,
        req: reqwest::RequestBuilder,
        answer: tokio::sync::oneshot::Sender<Response>,
    ) {
        let api = self.ep.api();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let (status, kind) = if e.is_timeout() {
                    (StatusCode::GATEWAY_TIMEOUT, "timeout_error")
                } else {
                    (StatusCode::BAD_GATEWAY, "api_error")
                };
                let msg = format!("upstream {} unreachable", self.upstream);
                let log = format!("upstream {}: {e}", self.upstream);
                let _ = answer.send(self.fail(status, kind, log, &msg));
                return;
            }
        };
        if resp.status().is_redirection() {
            // Never followed: the host's key goes to the configured URL and nowhere else.
            let code = resp.status().as_u16();
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>();
            let log = format!(
                "upstream {} answered a {code} redirect to {location:?}; redirects are not followed",
                self.upstream
            );
            let msg = format!(
                "upstream {} answered a redirect ({code}); the proxy does not follow redirects",
                self.upstream
            );
            let _ = answer.send(self.fail(StatusCode::BAD_GATEWAY, "api_error", log, &msg));
            return;
        }
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        self.record.status = status.as_u16();
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    let log = format!("upstream body: {e}");
                    let r = self.fail(
                        StatusCode::BAD_GATEWAY,
                        "api_error",
                        log,
                        "upstream answer was cut off",
                    );
                    let _ = answer.send(r);
                    return;
                }
            };
            if self.ep != Endpoint::CountTokens
                && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
            {
                self.record.usage = match api {
                    ApiKind::Anthropic => Usage::from_anthropic(&v["usage"]),
                    ApiKind::Openai => from_openai(&v["usage"]),
                };
            }
            self.record.latency_ms = self.started.elapsed().as_millis() as u64;
            let mut out = Response::new(Body::from(bytes));
            *out.status_mut() = status;
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let out = self.with_id(out);
            // Settled before the client has the answer, so its next request finds the
            // slot and the budget free.
            self.p.finish(self.record, self.slot);
            let _ = answer.send(out);
            return;
        }
        // Stream: read the upstream to its end whatever the client does, so usage is
        // never lost; the client gets chunks as they arrive, unbuffered.
        let mut parser = match api {
            ApiKind::Anthropic => StreamParser::Anthropic(SseUsage::default()),
            ApiKind::Openai => StreamParser::Openai(OpenAiSse::new(self.client_wants_usage)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let mut out = Response::new(Body::from_stream(tokio_stream_from(rx)));
        *out.status_mut() = status;
        out.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        out.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let out = self.with_id(out);
        let mut client_gone = answer.send(out).is_err();
        let mut upstream = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(self.p.upstream_timeout, upstream.next()).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    self.record.error = Some(format!(
                        "upstream stream stalled for {} s",
                        self.p.upstream_timeout.as_secs()
                    ));
                    break;
                }
            };
            match chunk {
                Ok(b) => {
                    let out = parser.feed(b);
                    if !client_gone && !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                        client_gone = true;
                    }
                }
                Err(e) => {
                    self.record.error = Some(format!("upstream stream broke: {e}"));
                    break;
                }
            }
        }
        let rest = parser.finish();
        if !client_gone && !rest.is_empty() {
            let _ = tx.send(Ok(rest)).await;
        }
        if !parser.complete() && self.record.error.is_none() {
            self.record.error = Some("upstream stream ended before its end marker".into());
        }
        if let Some(err) = &self.record.error
            && !client_gone
        {
            let _ = tx.send(Ok(parser.error_event(err))).await;
        }
        if client_gone && self.record.error.is_none() {
            self.record.error = Some("client disconnected; upstream read to the end".into());
        }
        self.record.usage = parser.usage();
        self.record.latency_ms = self.started.elapsed().as_millis() as u64;
        // Settled before the client sees the end of the stream.
        self.p.finish(self.record, self.slot);
        drop(tx);
    }
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
