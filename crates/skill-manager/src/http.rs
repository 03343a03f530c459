//! skill-manager's HTTP surface: the operator API under `/v1` (behind the operator
//! credential and the `Host`/`Origin`/body-type guard every daemon has) and MCP for
//! agents at `/mcp` (behind the agent's JWT: the launcher's relay puts the VM's token
//! on every request a guest makes; an `Origin` header — a browser — is refused).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use clawos_agent_token::Verifier;
use clawos_service::guard::Guard;
use clawos_service::http::{ErrorResponse, RouterExt};
use clawos_skill_manager_api::{CallResult, CallSkill, InstallSkill, SkillInfo, routes};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::host::{Caller, HostError, SkillHost};
use crate::mcp::{AgentIdentity, SkillsMcp};

/// Largest install upload: a 64 MiB component in base64, and the rest.
pub const MAX_INSTALL_BODY: usize = 96 << 20;
/// Largest body of any other request.
pub const MAX_BODY: usize = 2 << 20;

#[derive(Clone)]
struct AppState {
    host: Arc<SkillHost>,
    metrics: Arc<clawos_service::Metrics>,
}

fn host_error(e: HostError) -> ErrorResponse {
    use clawos_api::code;
    let msg = e.to_string();
    match e {
        HostError::Skill(_) | HostError::Bundle(_) | HostError::Invalid(_) => {
            ErrorResponse::invalid(msg)
        }
        HostError::NotFound(_) | HostError::NotEnabled { .. } => ErrorResponse::not_found(msg),
        HostError::Store(crate::store::StoreError::Exists(_)) => {
            ErrorResponse::new(StatusCode::CONFLICT, code::CONFLICT, msg)
        }
        HostError::RateLimited { .. } | HostError::Busy { .. } => {
            ErrorResponse::new(StatusCode::TOO_MANY_REQUESTS, code::RATE_LIMITED, msg)
        }
        other => {
            tracing::error!(error = %other, "skill-manager failure");
            ErrorResponse::internal("internal error (see the skill-manager's log)")
        }
    }
}

fn bad_name(what: &str, name: &str) -> Option<ErrorResponse> {
    clawos_api::label_problem(name)
        .map(|why| ErrorResponse::invalid(format!("{what} {name:?}: {why}")))
}

async fn install(
    State(a): State<AppState>,
    body: Result<Json<InstallSkill>, JsonRejection>,
) -> Result<(StatusCode, Json<SkillInfo>), ErrorResponse> {
    let Json(req) =
        body.map_err(|e| ErrorResponse::invalid(format!("request body: {}", e.body_text())))?;
    let info = a.host.install(req).await.map_err(host_error)?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn list(State(a): State<AppState>) -> Json<Vec<SkillInfo>> {
    Json(a.host.list())
}

async fn get(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SkillInfo>, ErrorResponse> {
    a.host.get(&name).map(Json).map_err(host_error)
}

async fn remove(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ErrorResponse> {
    a.host.remove(&name).map_err(host_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn enable(
    State(a): State<AppState>,
    Path((name, agent)): Path<(String, String)>,
) -> Result<StatusCode, ErrorResponse> {
    if let Some(e) = bad_name("agent", &agent) {
        return Err(e);
    }
    a.host.enable(&name, &agent).map_err(host_error)?;
    tracing::info!(skill = %name, agent = %agent, "skill enabled");
    Ok(StatusCode::NO_CONTENT)
}

async fn disable(
    State(a): State<AppState>,
    Path((name, agent)): Path<(String, String)>,
) -> Result<StatusCode, ErrorResponse> {
    a.host.disable(&name, &agent).map_err(host_error)?;
    tracing::info!(skill = %name, agent = %agent, "skill disabled");
    Ok(StatusCode::NO_CONTENT)
}

async fn call(
    State(a): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<CallSkill>, JsonRejection>,
) -> Result<Json<CallResult>, ErrorResponse> {
    let Json(req) =
        body.map_err(|e| ErrorResponse::invalid(format!("request body: {}", e.body_text())))?;
    a.host
        .call(&name, &Caller::Operator, &req.input)
        .await
        .map(Json)
        .map_err(host_error)
}

/// Admits an MCP request only with a valid agent token, and never from a browser.
async fn agent_auth(
    State(verifier): State<Arc<Verifier>>,
    mut req: Request,
    next: Next,
) -> Response {
    if req.headers().contains_key(axum::http::header::ORIGIN) {
        return ErrorResponse::new(
            StatusCode::FORBIDDEN,
            clawos_api::code::FORBIDDEN,
            "requests with an Origin header (browsers) are not served",
        )
        .into_response();
    }
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = token else {
        return ErrorResponse::unauthorized("an agent token is required (Authorization: Bearer)")
            .into_response();
    };
    match verifier.verify(&token).await {
        Ok(claims) => {
            req.extensions_mut().insert(AgentIdentity {
                agent: claims.agent,
                vm_id: claims.vm_id,
            });
            next.run(req).await
        }
        Err(e) => {
            tracing::info!(error = %e, "agent token refused");
            ErrorResponse::unauthorized("agent token refused").into_response()
        }
    }
}

async fn metrics(State(a): State<AppState>) -> Response {
    a.metrics.response()
}

/// The daemon's `/metrics`: skills installed, calls by outcome, calls running.
fn registry(host: &Arc<SkillHost>) -> clawos_service::Metrics {
    use std::sync::atomic::Ordering::Relaxed;
    let mut m = clawos_service::Metrics::new();
    let h = Arc::clone(host);
    m.gauge_fn(
        "clawos_skills_installed",
        "Skills installed and loaded.",
        move || h.list().len() as i64,
    );
    for (name, help, pick) in [
        (
            "clawos_skill_calls_answered_total",
            "Skill calls the skill answered.",
            (|c| &c.answered) as fn(&crate::host::CallCounts) -> &std::sync::atomic::AtomicU64,
        ),
        (
            "clawos_skill_calls_failed_total",
            "Skill calls that failed or were stopped at a limit.",
            |c| &c.failed,
        ),
        (
            "clawos_skill_calls_refused_total",
            "Agents' skill calls refused at their rate or in-flight limit.",
            |c| &c.refused,
        ),
        (
            "clawos_skill_calls_aborted_total",
            "Skill calls whose caller went away before the answer.",
            |c| &c.aborted,
        ),
    ] {
        let h = Arc::clone(host);
        m.counter_fn(name, help, move || pick(h.counts()).load(Relaxed));
    }
    let h = Arc::clone(host);
    m.gauge_fn(
        "clawos_skill_calls_running",
        "Skill calls running now.",
        move || h.counts().running.load(Relaxed),
    );
    m
}

/// The whole router.
pub fn router(
    host: Arc<SkillHost>,
    operator_token: &str,
    token_hint: &str,
    listen: std::net::SocketAddr,
    verifier: Arc<Verifier>,
) -> Router {
    let state = AppState {
        host: Arc::clone(&host),
        metrics: Arc::new(registry(&host)),
    };
    let guard = Guard::new()
        .bearer(operator_token, token_hint)
        .open_path(routes::HEALTHZ.path)
        .open_path(routes::METRICS.path)
        .listening_on(listen);
    let operator = Router::new()
        .route(
            routes::INSTALL.path,
            axum::routing::post(install)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_INSTALL_BODY)),
        )
        .at(routes::LIST, list)
        .at(routes::GET, get)
        .at(routes::REMOVE, remove)
        .at(routes::ENABLE, enable)
        .at(routes::DISABLE, disable)
        .at(routes::CALL, call)
        .at(routes::HEALTHZ, || async { "ok\n" })
        .at(routes::METRICS, metrics)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    let mcp_host = Arc::clone(&host);
    let mcp = StreamableHttpService::new(
        move || {
            Ok(SkillsMcp {
                host: Arc::clone(&mcp_host),
            })
        },
        Arc::new(LocalSessionManager::default()),
        // Stateless: every request stands alone (each carries its agent's token, which
        // names the caller anyway), so a guest looping over `initialize` leaves nothing
        // behind in a daemon every VM shares; answers are plain JSON.
        StreamableHttpServerConfig::default()
            .with_allowed_hosts([
                listen.ip().to_string(),
                listen.to_string(),
                "localhost".into(),
            ])
            .with_legacy_session_mode(false)
            .with_json_response(true),
    );
    let agents = Router::new()
        .nest_service(routes::MCP.path, mcp)
        .layer(axum::middleware::from_fn_with_state(verifier, agent_auth));
    guard
        .protect(operator)
        .merge(agents)
        .fallback(clawos_service::http::no_such_route)
        .layer(axum::middleware::from_fn(clawos_service::http::request_id))
}
