//! The agent-facing endpoints (`POST /v1/messages`, `/v1/messages/count_tokens`,
//! `/v1/chat/completions`, `GET /v1/models`) and everything about a request up to the
//! upstream call: authentication, the in-flight slot, the bounded body read, the
//! request and policy checks, the rate limit, the budget reservation and the rewritten
//! upstream request, handed to an [`Exchange`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::exchange::Exchange;
use super::{MAX_REQUEST_BYTES, Metrics, Proxy, Slot, error_for, request_id, too_many};
use crate::config::ApiKind;
use crate::ledger::{Record, now_ms};
use crate::limits::{BudgetRefusal, Decision, VM_TOTAL};
use crate::request::Endpoint;
use crate::usage::Usage;
use clawos_agent_token::scopes::BUDGET_TOTAL;

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
    let budgeted = p.budgets.enabled() || caller.budget.is_some();
    if ep == Endpoint::ChatCompletions && max_output.is_none() && budgeted {
        // Without a maximum the answer is unbounded, and so would be its cost.
        parsed["max_tokens"] = json!(p.default_max_tokens);
        max_output = Some(p.default_max_tokens.saturating_mul(shape.choices));
        rewrite = true;
    }
    let reserve = match ep {
        Endpoint::CountTokens => 0,
        _ => shape.input_estimate + max_output.unwrap_or(0),
    };
    let cost = format!(
        "{reserve} tokens (input estimate {} + maximum output {})",
        shape.input_estimate,
        max_output.unwrap_or(0)
    );
    match p.budgets.reserve_within(
        &caller.agent,
        reserve,
        caller.budget,
        Instant::now(),
        now_ms(),
    ) {
        Ok(t) => slot.ticket = Some(t),
        Err(BudgetRefusal::Wait {
            window: VM_TOTAL,
            limit,
            left,
            retry_after,
        }) => {
            Metrics::add(&p.metrics.budget_refused, 1);
            return too_many(
                api,
                retry_after,
                &format!(
                    "token budget of this VM ({BUDGET_TOTAL} {limit}) exhausted: agent {} has {left} of its {limit} tokens left and this request may cost up to {cost}; it does not come back by itself (a new start of the VM sets a new one); retry in {{secs}}s",
                    caller.agent
                ),
            );
        }
        Err(BudgetRefusal::Wait {
            window,
            left,
            retry_after,
            ..
        }) => {
            Metrics::add(&p.metrics.budget_refused, 1);
            return too_many(
                api,
                retry_after,
                &format!(
                    "agent {} has used its token budget: this request may cost up to {cost} and its {window} budget has {left} left; retry in {{secs}}s",
                    caller.agent
                ),
            );
        }
        Err(BudgetRefusal::TooLarge {
            window: VM_TOTAL,
            limit,
        }) => {
            Metrics::add(&p.metrics.budget_refused, 1);
            return invalid(
                StatusCode::BAD_REQUEST,
                &format!(
                    "this request may cost up to {cost}, more than the whole token budget of this VM ({BUDGET_TOTAL} {limit}); lower max_tokens or the prompt"
                ),
            );
        }
        Err(BudgetRefusal::TooLarge { window, limit }) => {
            Metrics::add(&p.metrics.budget_refused, 1);
            return invalid(
                StatusCode::BAD_REQUEST,
                &format!(
                    "this request may cost up to {cost}, more than agent {}'s whole {window} token budget of {limit}; lower max_tokens or the prompt",
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
