//! inference-proxy: the only road from an agent to an LLM.
//!
//! Agents authenticate with their identity-manager JWT (`x-api-key` or `Authorization:
//! Bearer`); the proxy checks it, applies the agent's requests-per-minute limit (GCRA),
//! replaces the credential with the host's real provider key, passes the answer or the
//! SSE stream through unbuffered, and records usage as the upstream reported it in a
//! SQLite ledger and a JSONL audit trail.
//!
//! The LLM endpoints answer errors in Anthropic's and OpenAI's own shapes (agents use
//! those SDKs); the operator API (`clawos_inference_proxy_api`: usage, health,
//! metrics) answers the one ClawOS error body.

pub mod config;
pub mod ledger;
pub mod limits;
pub mod proxy;
pub mod usage;

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use clawos_inference_proxy_api::{UsageQuery, UsageReport, routes};
use clawos_service::http::{ErrorResponse, RouterExt};

pub use config::{ConfigError, ProxyConfig};

/// Errors that end the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
}

/// `GET /v1/usage`: operators only (agents reach this proxy too, and must not read
/// each other's usage).
async fn usage(
    State(p): State<Arc<proxy::Proxy>>,
    headers: HeaderMap,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UsageReport>, ErrorResponse> {
    let ok = clawos_service::bearer_matches(
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        &p.admin_token,
    );
    if !ok {
        return Err(ErrorResponse::unauthorized(
            "usage needs the operator credential (<state>/proxy/admin.token)",
        ));
    }
    let Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let usage = ledger::usage_rows(&p.ledger.db_path, q.since_ms, q.agent.as_deref())
        .map_err(|e| ErrorResponse::internal(e.to_string()))?;
    Ok(Json(UsageReport { usage }))
}

/// The router: the agent-facing LLM APIs, which answer errors in their vendors' own
/// shapes (agents use those SDKs), and the operator API of
/// `clawos_inference_proxy_api::routes`, which answers the one ClawOS error body.
pub fn router(p: Arc<proxy::Proxy>) -> Router {
    let operator = Router::new()
        .at(routes::USAGE, usage)
        .at(routes::HEALTHZ, || async { "ok\n" })
        .at(
            routes::METRICS,
            |State(p): State<Arc<proxy::Proxy>>| async move { p.metrics.response() },
        )
        .fallback(clawos_service::http::no_such_route)
        .layer(axum::middleware::from_fn(clawos_service::http::request_id));
    Router::new()
        .route("/v1/messages", post(proxy::messages))
        .route("/v1/messages/count_tokens", post(proxy::count_tokens))
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/models", get(proxy::models))
        .merge(operator)
        .with_state(p)
}

/// Runs until `shutdown` resolves; queued usage records are written before it returns.
pub async fn run(
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let auth = match (&cfg.issuer, cfg.static_tokens) {
        (Some(iss), _) => proxy::AgentAuth::Jwt(Box::new(clawos_agent_token::Verifier::new(
            clawos_agent_token::VerifierConfig::new(iss, &cfg.audience),
        ))),
        (None, Some(map)) => proxy::AgentAuth::Static(map),
        (None, None) => proxy::AgentAuth::Static(Default::default()),
    };
    let now = ledger::now_ms();
    let today = ledger::tokens_since(&cfg.ledger_path, now - now % 86_400_000)?;
    let all = if cfg.tokens_total > 0 {
        ledger::tokens_since(&cfg.ledger_path, 0)?
    } else {
        Default::default()
    };
    let p = Arc::new(proxy::Proxy {
        metrics: proxy::Metrics::default(),
        admin_token: cfg.admin_token,
        upstream_timeout: cfg.upstream_timeout,
        budgets: limits::TokenBudgets::new(
            cfg.tokens_per_minute,
            cfg.tokens_per_day,
            cfg.tokens_total,
            today,
            all,
            now,
        ),
        auth,
        upstreams: cfg.upstreams,
        limiter: limits::RateLimiter::per_minute(cfg.rpm),
        ledger: ledger::Ledger::open_with(&cfg.ledger_path, &cfg.audit_path, cfg.audit_rotation)?,
        http: reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap_or_default(),
    });
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.addr,
            source,
        })?;
    tracing::info!(addr = %cfg.addr, rpm = cfg.rpm, "inference-proxy listening");
    // Streams are many small writes: without TCP_NODELAY an SSE event can wait for the
    // client's delayed ACK (tens of milliseconds).
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    clawos_service::http::serve(
        listener,
        router(Arc::clone(&p)),
        shutdown,
        clawos_service::http::DRAIN_TIMEOUT,
    )
    .await
    .map_err(ServeError::Http)?;
    drop(p);
    Ok(())
}
