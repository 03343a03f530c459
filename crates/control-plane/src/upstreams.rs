//! The daemons behind the control plane other than vm-launcher — inference-proxy
//! (usage), monitor-daemon (the syscall audit trail), orchestrator (workflows),
//! identity-manager (agent tokens) — and the routes that front them. Each is reached through its own typed client with the
//! operator credential its daemon made in the shared state directory; the credential
//! is read at each request, so a daemon started after the control plane (or one that
//! made a new credential) is picked up without a restart. One that is not there
//! answers 503 naming what is missing; the rest of the API keeps working.

use std::path::PathBuf;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use clawos_api::{ClientError, code};
use clawos_control_plane_api::{AuditQuery, EventsQuery};
use clawos_identity_manager_api::{IdentityClient, IntrospectRequest, IssueRequest, RevokeRequest};
use clawos_inference_proxy_api::{ProxyAdminClient, UsageQuery};
use clawos_monitor_api::MonitorClient;
use clawos_orchestrator_api::EventsQuery as RunEventsQuery;
use clawos_orchestrator_api::{Approval, OrchestratorClient, SubmitRun};
use clawos_service::http::ErrorResponse;

use crate::http::Shared;

/// Where one daemon is and where its operator credential lives.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub url: String,
    pub token_path: PathBuf,
}

/// The daemons the control plane fronts besides vm-launcher.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub proxy: Upstream,
    pub monitor: Upstream,
    pub orchestrator: Upstream,
    pub identity: Upstream,
}

impl Upstreams {
    /// Each daemon at its default loopback URL, with the credential it makes under
    /// `state_dir` (or the one systemd handed over as `<daemon>-token`).
    pub fn defaults(state_dir: &std::path::Path) -> Self {
        use clawos_service::credential_path;
        Self {
            proxy: Upstream {
                url: clawos_inference_proxy_api::DEFAULT_URL.to_owned(),
                token_path: credential_path("proxy-token", state_dir.join("proxy/admin.token")),
            },
            monitor: Upstream {
                url: clawos_monitor_api::DEFAULT_URL.to_owned(),
                token_path: credential_path(
                    "monitor-token",
                    clawos_monitor_api::token_path(state_dir),
                ),
            },
            orchestrator: Upstream {
                url: clawos_orchestrator_api::DEFAULT_URL.to_owned(),
                token_path: credential_path(
                    "orchestrator-token",
                    clawos_orchestrator_api::token_path(state_dir),
                ),
            },
            identity: Upstream {
                url: clawos_identity_manager_api::DEFAULT_URL.to_owned(),
                token_path: credential_path(
                    "identity-token",
                    state_dir.join("identity/service.token"),
                ),
            },
        }
    }
}

impl Upstream {
    fn token(&self, daemon: &str) -> Result<String, ErrorResponse> {
        match std::fs::read_to_string(&self.token_path) {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
            Ok(_) | Err(_) => Err(ErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::UNAVAILABLE,
                format!(
                    "{daemon} is not set up on this host: no operator credential at {} (start {daemon}, or point the control plane at it)",
                    self.token_path.display()
                ),
            )),
        }
    }
}

/// Longest the control plane waits for a fronted daemon (but vm-launcher, whose calls
/// carry their own limits, and an orchestrator cancel, which stops VMs and gets 120 s):
/// one that hangs costs its caller 30 s, not a connection forever.
pub const UPSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The HTTP client for the fronted daemons' JSON calls: [`UPSTREAM_TIMEOUT`] for each
/// whole call, no redirects followed, no proxy from the environment.
fn upstream_http() -> Result<reqwest::Client, ErrorResponse> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    shared_client(&CLIENT, |b| b.timeout(UPSTREAM_TIMEOUT))
}

/// The same for answers streamed through (artifacts): no limit on the whole, which
/// may be large, but [`UPSTREAM_TIMEOUT`] for each read (and for the headers, at the
/// call).
fn upstream_stream_http() -> Result<reqwest::Client, ErrorResponse> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    shared_client(&CLIENT, |b| b.read_timeout(UPSTREAM_TIMEOUT))
}

fn shared_client(
    cell: &'static std::sync::OnceLock<reqwest::Client>,
    limit: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<reqwest::Client, ErrorResponse> {
    if let Some(c) = cell.get() {
        return Ok(c.clone());
    }
    let builder = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    let c = limit(builder)
        .build()
        .map_err(|e| ErrorResponse::internal(format!("HTTP client for the daemons: {e}")))?;
    Ok(cell.get_or_init(|| c).clone())
}

/// The answer when `daemon` did not answer within [`UPSTREAM_TIMEOUT`].
fn timed_out(daemon: &str) -> ErrorResponse {
    ErrorResponse::new(
        StatusCode::GATEWAY_TIMEOUT,
        code::UNAVAILABLE,
        format!(
            "{daemon} did not answer within {}s",
            UPSTREAM_TIMEOUT.as_secs()
        ),
    )
}

/// An upstream error as the control plane answers it (see `http::upstream`).
fn failed(daemon: &'static str) -> impl Fn(ClientError) -> ErrorResponse {
    move |e| crate::http::upstream_error(daemon, e)
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ErrorResponse> {
    q.map(|Query(t)| t)
        .map_err(|e| ErrorResponse::invalid(e.body_text()))
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ErrorResponse> {
    b.map(|Json(t)| t)
        .map_err(|e| ErrorResponse::invalid(e.body_text()))
}

fn id(kind: &str, s: &str) -> Result<(), ErrorResponse> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ErrorResponse::invalid(format!(
            "{kind} id {s:?}: 1-128 characters of A-Z a-z 0-9 . _ - [ ]"
        )))
    }
}

type ApiResult = Result<Response, ErrorResponse>;

pub(crate) async fn usage(
    State(app): Shared,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let up = &app.upstreams.proxy;
    let client = ProxyAdminClient::with_http(
        "inference-proxy",
        &up.url,
        upstream_http()?,
        &up.token("inference-proxy")?,
    );
    let report = client.usage(&q).await.map_err(failed("inference-proxy"))?;
    Ok(Json(report).into_response())
}

pub(crate) async fn audit_events(
    State(app): Shared,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    if let Some(agent) = &q.agent
        && let Some(why) = clawos_api::label_problem(agent)
    {
        return Err(ErrorResponse::invalid(format!("agent {agent:?}: {why}")));
    }
    let up = &app.upstreams.monitor;
    let client = MonitorClient::new(&up.url, &up.token("monitor-daemon")?);
    let limit = q.limit.unwrap_or(200).clamp(1, 1000);
    let events = tokio::time::timeout(
        UPSTREAM_TIMEOUT,
        client.events(q.agent.as_deref(), q.after, limit),
    )
    .await
    .map_err(|_| timed_out("monitor-daemon"))?
    .map_err(failed("monitor-daemon"))?;
    Ok(Json(events).into_response())
}

pub(crate) async fn operator_audit(
    State(app): Shared,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let records = app
        .audit
        .tail(limit)
        .map_err(|e| ErrorResponse::internal(format!("operator audit trail: {e}")))?;
    Ok(Json(records).into_response())
}

fn orchestrator(app: &crate::http::App) -> Result<OrchestratorClient, ErrorResponse> {
    let up = &app.upstreams.orchestrator;
    Ok(OrchestratorClient::with_http(
        "orchestrator",
        &up.url,
        upstream_http()?,
        &up.token("orchestrator")?,
    ))
}

pub(crate) async fn runs(State(app): Shared) -> ApiResult {
    let runs = orchestrator(&app)?
        .list()
        .await
        .map_err(failed("orchestrator"))?;
    Ok(Json(runs).into_response())
}

pub(crate) async fn submit_run(
    State(app): Shared,
    b: Result<Json<SubmitRun>, JsonRejection>,
) -> ApiResult {
    let req = body(b)?;
    let run = orchestrator(&app)?
        .submit(&req)
        .await
        .map_err(failed("orchestrator"))?;
    let target = run.id.clone();
    let mut resp = (StatusCode::CREATED, Json(run)).into_response();
    resp.extensions_mut()
        .insert(crate::http::AuditTarget(target));
    Ok(resp)
}

pub(crate) async fn run(State(app): Shared, Path(run): Path<String>) -> ApiResult {
    id("run", &run)?;
    let status = orchestrator(&app)?
        .get(&run)
        .await
        .map_err(failed("orchestrator"))?;
    Ok(Json(status).into_response())
}

pub(crate) async fn approve(
    State(app): Shared,
    Path((run, step)): Path<(String, String)>,
    b: Result<Json<Approval>, JsonRejection>,
) -> ApiResult {
    id("run", &run)?;
    id("step", &step)?;
    let a = body(b)?;
    orchestrator(&app)?
        .approve(&run, &step, &a)
        .await
        .map_err(failed("orchestrator"))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn cancel_run(State(app): Shared, Path(run): Path<String>) -> ApiResult {
    id("run", &run)?;
    let status = orchestrator(&app)?
        .cancel(&run)
        .await
        .map_err(failed("orchestrator"))?;
    Ok(Json(status).into_response())
}

pub(crate) async fn run_events(
    State(app): Shared,
    Path(run): Path<String>,
    q: Result<Query<RunEventsQuery>, QueryRejection>,
) -> ApiResult {
    id("run", &run)?;
    let q = query(q)?;
    let events = orchestrator(&app)?
        .events(&run, q.after)
        .await
        .map_err(failed("orchestrator"))?;
    Ok(Json(events).into_response())
}

pub(crate) async fn run_artifacts(State(app): Shared, Path(run): Path<String>) -> ApiResult {
    id("run", &run)?;
    let artifacts = orchestrator(&app)?
        .artifacts(&run)
        .await
        .map_err(failed("orchestrator"))?;
    Ok(Json(artifacts).into_response())
}

pub(crate) async fn artifact(State(app): Shared, Path(sha256): Path<String>) -> ApiResult {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ErrorResponse::invalid(format!(
            "artifact {sha256:?}: 64 hex characters (its sha256)"
        )));
    }
    // Streamed through (an artifact may be tens of MiB), never held whole: the
    // headers within UPSTREAM_TIMEOUT, then each read within it, however long the
    // whole takes.
    let up = &app.upstreams.orchestrator;
    let client = OrchestratorClient::with_http(
        "orchestrator",
        &up.url,
        upstream_stream_http()?,
        &up.token("orchestrator")?,
    );
    let up = tokio::time::timeout(UPSTREAM_TIMEOUT, client.artifact_download(&sha256))
        .await
        .map_err(|_| timed_out("orchestrator"))?
        .map_err(failed("orchestrator"))?;
    let size = up.content_length();
    Ok(crate::vm_streams::octet_stream(
        axum::body::Body::from_stream(up.bytes_stream()),
        size,
    ))
}

fn identity(app: &crate::http::App) -> Result<IdentityClient, ErrorResponse> {
    let up = &app.upstreams.identity;
    Ok(
        IdentityClient::with_service_token(&up.url, &up.token("identity-manager")?)
            .with_timeout(UPSTREAM_TIMEOUT),
    )
}

/// Issues an agent token (admin): identity-manager checks the request as it checks
/// the launcher's.
pub(crate) async fn issue_agent_token(
    State(app): Shared,
    b: Result<Json<IssueRequest>, JsonRejection>,
) -> ApiResult {
    let req = body(b)?;
    let issued = identity(&app)?
        .issue(&req)
        .await
        .map_err(failed("identity-manager"))?;
    // The agent and the token's jti: a token minted here can be revoked from the trail.
    let target = format!("{}/{}", req.agent, issued.jti);
    let mut resp = (StatusCode::CREATED, Json(issued)).into_response();
    resp.extensions_mut()
        .insert(crate::http::AuditTarget(target));
    Ok(resp)
}

/// Revokes one agent token (by jti) or every token of an agent (admin).
pub(crate) async fn revoke_agent_tokens(
    State(app): Shared,
    b: Result<Json<RevokeRequest>, JsonRejection>,
) -> ApiResult {
    let req = body(b)?;
    let target = req.agent.clone().or_else(|| req.jti.clone());
    identity(&app)?
        .revoke(&req)
        .await
        .map_err(failed("identity-manager"))?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Some(t) = target {
        resp.extensions_mut().insert(crate::http::AuditTarget(t));
    }
    Ok(resp)
}

/// Whether an agent token verifies, and its claims (RFC 7662).
pub(crate) async fn introspect_agent_token(
    State(app): Shared,
    b: Result<Json<IntrospectRequest>, JsonRejection>,
) -> ApiResult {
    let req = body(b)?;
    let answer = identity(&app)?
        .introspect(&req.token)
        .await
        .map_err(failed("identity-manager"))?;
    Ok(Json(answer).into_response())
}

/// Rotates identity-manager's token signing keys (admin).
pub(crate) async fn rotate_agent_keys(State(app): Shared) -> ApiResult {
    let rotated = identity(&app)?
        .rotate_keys()
        .await
        .map_err(failed("identity-manager"))?;
    let mut resp = Json(&rotated).into_response();
    resp.extensions_mut()
        .insert(crate::http::AuditTarget(rotated.active_kid.clone()));
    Ok(resp)
}
