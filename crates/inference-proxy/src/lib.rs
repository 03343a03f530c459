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
//!
//! What a hostile agent cannot do through it (`docs/security.md`): overrun its token
//! budgets (costs are reserved before forwarding, [`limits::TokenBudgets`]; a VM's
//! agent token may carry a total budget of its own, the scope `clawos.budget.total:<N>`
//! the launcher asked for, which the guest never sees), hold more
//! than its in-flight cap of requests, call anything unlimited or unrecorded, smuggle
//! a cost-deciding field past the checks ([`request`]), reach the internet through the
//! provider's server-side tools unless allowed ([`policy`]), or exhaust the proxy's
//! descriptors with connections ([`conns`]). An upstream cannot redirect the host's key
//! elsewhere, and other local users cannot read the ledger or the audit trail.

pub mod config;
pub mod conns;
pub mod ledger;
pub mod limits;
pub mod policy;
pub mod proxy;
pub mod request;
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
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("upstream HTTP client: {0}")]
    Client(#[source] reqwest::Error),
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
    router_on(p, std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// [`router`] for a proxy listening on `listen`: the operator API is behind the
/// `Host`/`Origin`/body-type guard (`clawos_service::guard`; `GET /v1/usage` checks
/// the operator credential itself). The agent-facing routes are not: agents' SDKs
/// come through the launcher's relay with `Host: 127.0.0.1:11435`, which would pass,
/// but their shapes are their vendors', not ours.
pub fn router_on(p: Arc<proxy::Proxy>, listen: std::net::SocketAddr) -> Router {
    let operator = Router::new()
        .at(routes::USAGE, usage)
        .at(routes::HEALTHZ, || async { "ok\n" })
        .at(
            routes::METRICS,
            |State(p): State<Arc<proxy::Proxy>>| async move { p.metrics.response() },
        )
        .fallback(clawos_service::http::no_such_route);
    let operator = clawos_service::guard::Guard::new()
        .listening_on(listen)
        .protect(operator)
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
    cfg.validate()?;
    // Every client connection may hold a second descriptor upstream: size the caps
    // under this process's descriptor limit, so accept() never fails for lack of one.
    let nofile = conns::fd_limit();
    let fit = conns::fd_budget(nofile);
    let mut limits = cfg.connections;
    if limits.max_connections > fit {
        if fit < config::MIN_CONNECTIONS {
            return Err(ConfigError(format!(
                "the descriptor limit ({nofile}) leaves room for {fit} client connections; raise it (ulimit -n, LimitNOFILE=)"
            ))
            .into());
        }
        tracing::warn!(
            configured = limits.max_connections,
            nofile,
            max_connections = fit,
            "fewer client connections than configured fit the descriptor limit"
        );
        limits.max_connections = fit;
        limits.max_per_peer = limits.max_per_peer.min(fit);
    }
    let auth = match (&cfg.issuer, cfg.static_tokens) {
        (Some(iss), _) => proxy::AgentAuth::Jwt(Box::new(clawos_agent_token::Verifier::new(
            clawos_agent_token::VerifierConfig::new(iss, &cfg.audience),
        ))),
        (None, Some(map)) => proxy::AgentAuth::Static(map),
        (None, None) => proxy::AgentAuth::Static(Default::default()),
    };
    let now = ledger::now_ms();
    let today = ledger::tokens_since(&cfg.ledger_path, now - now % 86_400_000)?;
    // Always: a VM's token may carry a total budget (`clawos.budget.total`), which
    // counts what its agent spent before this start like the configured total does.
    let all = ledger::tokens_since(&cfg.ledger_path, 0)?;
    let metrics = proxy::Metrics::default();
    let conn_metrics = metrics.conns.clone();
    let p = Arc::new(proxy::Proxy {
        metrics,
        admin_token: cfg.admin_token,
        upstream_timeout: cfg.upstream_timeout,
        body_timeout: cfg.body_timeout,
        budgets: limits::TokenBudgets::new(
            cfg.tokens_per_minute,
            cfg.tokens_per_day,
            cfg.tokens_total,
            today,
            all,
            now,
        ),
        in_flight: limits::InFlight::new(cfg.max_in_flight),
        default_max_tokens: cfg.default_max_tokens,
        policies: cfg.policies,
        auth,
        upstreams: cfg.upstreams,
        limiter: limits::RateLimiter::per_minute(cfg.rpm),
        ledger: ledger::Ledger::open_with(&cfg.ledger_path, &cfg.audit_path, cfg.audit_rotation)?,
        http: proxy::upstream_client().map_err(ServeError::Client)?,
    });
    let (listener, _table) =
        conns::LimitedListener::bind(cfg.addr, limits, conn_metrics).map_err(|source| {
            ServeError::Bind {
                addr: cfg.addr,
                source,
            }
        })?;
    tracing::info!(
        addr = %cfg.addr,
        rpm = cfg.rpm,
        max_in_flight = cfg.max_in_flight,
        max_connections = limits.max_connections,
        max_connections_per_peer = limits.max_per_peer,
        nofile,
        "inference-proxy listening"
    );
    let app = router_on(Arc::clone(&p), cfg.addr)
        .layer(axum::middleware::from_fn(conns::track_busy))
        .into_make_service_with_connect_info::<conns::ConnHandle>();
    clawos_service::http::serve(listener, app, shutdown, clawos_service::http::DRAIN_TIMEOUT)
        .await
        .map_err(ServeError::Http)?;
    drop(p);
    Ok(())
}
