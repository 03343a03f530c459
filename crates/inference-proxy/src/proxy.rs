//! The agent-facing LLM APIs, proxied: authenticate the agent (and read the budget its
//! token may carry, `clawos.budget.total:<N>`), hold one of its in-flight slots, check
//! the request (strict types, the agent's policy), apply its rate limit, reserve its
//! largest possible cost in its token budgets, swap in the
//! host's key, pass the answer (or the stream) through, settle the budget with the
//! usage the upstream reported and record it.
//!
//! The exchange with the upstream runs in its own task, so it is read to its end and
//! recorded whatever the client does. Redirects from an upstream are never followed:
//! a 3xx is an upstream error, and the host's key is sent to the configured URL only.
//!
//! This module holds the shared state, authentication, the per-request `Slot` and
//! the error shapes; `handlers` takes a request up to the upstream call, and
//! `exchange` runs that call, passes the answer or stream through and settles usage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clawos_agent_token::Verifier;
use clawos_service::metrics::Counter;
use serde_json::{Value, json};

use crate::config::{ApiKind, Upstream};
use crate::conns::ConnMetrics;
use crate::ledger::{Ledger, Record, now_ms};
use crate::limits::{InFlight, RateLimiter, Ticket, TokenBudgets};
use crate::policy::Policies;

mod exchange;
mod handlers;

pub use handlers::{chat_completions, count_tokens, messages, models};

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
#[derive(Debug, Clone, PartialEq, Eq)]
struct Caller {
    agent: String,
    vm_id: String,
    /// The total token budget the caller's token carries (`clawos.budget.total:<N>`,
    /// put there by the launcher for a VM started with one).
    budget: Option<u64>,
}

impl Caller {
    /// The caller a verified token names; a budget scope that cannot be honoured is an
    /// error, never skipped.
    fn from_claims(c: clawos_agent_token::Claims) -> Result<Self, String> {
        let budget =
            clawos_agent_token::scopes::parse_budget_total(&c.scopes).map_err(|e| e.to_string())?;
        Ok(Self {
            agent: c.agent,
            vm_id: c.vm_id,
            budget,
        })
    }
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
            AgentAuth::Jwt(v) => {
                let claims = v
                    .verify(&token)
                    .await
                    .map_err(|e| unauthorized(&e.to_string()))?;
                // Authentic, but carrying a budget this proxy cannot apply: refused.
                Caller::from_claims(claims)
                    .map_err(|m| error_for(api, StatusCode::FORBIDDEN, "permission_error", &m))
            }
            AgentAuth::Static(map) => map
                .get(&token)
                .map(|a| Caller {
                    agent: a.clone(),
                    vm_id: String::new(),
                    budget: None,
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

/// Default upstream timeout for the whole answer of a non-streaming call.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(scopes: &[&str]) -> clawos_agent_token::Claims {
        clawos_agent_token::Claims {
            iss: "http://127.0.0.1:2082".into(),
            sub: "spiffe://clawos.local/agent/step-1".into(),
            aud: "inference-proxy".into(),
            iat: 1,
            nbf: 1,
            exp: 2,
            jti: "j".into(),
            agent: "step-1".into(),
            vm_id: "step-1-1700000000".into(),
            image_root_hash: String::new(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            auth_time: None,
        }
    }

    #[test]
    fn a_verified_token_names_its_agent_and_the_budget_it_carries() {
        let c = Caller::from_claims(claims(&[])).expect("no scope");
        assert_eq!(
            c,
            Caller {
                agent: "step-1".into(),
                vm_id: "step-1-1700000000".into(),
                budget: None
            }
        );
        let c = Caller::from_claims(claims(&["llm:invoke", "clawos.budget.total:300"]))
            .expect("budget");
        assert_eq!(c.budget, Some(300));
        assert_eq!(c.agent, "step-1");
    }

    #[test]
    fn a_malformed_budget_scope_is_refused_with_the_scope_named() {
        for bad in [
            "clawos.budget.total:0",
            "clawos.budget.total:abc",
            "clawos.budget.total:-1",
            "clawos.budget.total:1000000000001",
            "clawos.budget.daily:5",
        ] {
            let e = Caller::from_claims(claims(&[bad])).expect_err(bad);
            assert!(
                e.contains(bad) && e.contains("clawos.budget.total:<N>"),
                "{e}"
            );
        }
        let e = Caller::from_claims(claims(&[
            "clawos.budget.total:300",
            "clawos.budget.total:900",
        ]))
        .expect_err("two");
        assert!(e.contains("more than one"), "{e}");
    }
}
