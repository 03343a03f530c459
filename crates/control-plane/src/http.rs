//! The public API: one table of endpoints ([`endpoints`]) — method, path, the role it
//! needs, the action name the audit trail records — from which the router is mounted,
//! every request authorized and the OpenAPI document generated, so the three cannot
//! disagree. In front of every route, `gate::gate` does, in order:
//!
//! 1. the Host/Origin/body-type checks every ClawOS API makes (`clawos_service::guard`);
//! 2. **authenticate**: `Authorization: Bearer <operator token>` (401 otherwise);
//! 3. **authorize**: the token's role against the endpoint's (403 otherwise; a mounted
//!    route missing from the table is refused too: deny by default);
//! 4. read the body within [`BODY_TIMEOUT`] and [`MAX_BODY`] (408, 413) — but a file
//!    upload, which streams through to the VM under its own idle limit;
//! 5. **act** (the handler), then
//! 6. **audit**: one [`crate::audit::AuditRecord`] per request, whatever happened above.
//!
//! The gate itself is in `gate.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodFilter;
use clawos_api::{RouteMethod, code};
use clawos_control_plane_api::{PREFIX, Role, routes};
use clawos_identity_manager_api::routes as identity;
use clawos_inference_proxy_api::routes as proxy;
use clawos_orchestrator_api::routes as runs;
use clawos_service::guard::Guard;
use clawos_service::http::ErrorResponse;
use clawos_vm_launcher_api::{ClientError, LauncherClient, routes as vm};

use crate::audit::AuditTrail;
use crate::operators::{OperatorError, OperatorStore};
use crate::upstreams as up;
use crate::{operator_routes, vm_routes};

pub(crate) use crate::gate::{AuditTarget, SessionKey, session_cookie};

/// Largest request body (JSON): 1 MiB.
pub const MAX_BODY: usize = 1 << 20;
/// Longest a client may take to send a request body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request or answer body is, for the OpenAPI document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// No body (204 answers; requests without one).
    Empty,
    /// One JSON value of the named schema.
    Json(&'static str),
    /// A JSON array of the named schema.
    JsonArray(&'static str),
    /// Plain text.
    Text,
    /// A page of the web console (HTML, its script or style sheet).
    Page(&'static str),
}

/// One route of the public API.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub method: RouteMethod,
    /// The full path template (`/api/v1/vms/{name}`).
    pub path: String,
    /// The least role that may call it; `None`: open (health, the OpenAPI document).
    pub role: Option<Role>,
    /// The audit trail's name for it, e.g. `vm.stop`.
    pub action: &'static str,
    pub summary: &'static str,
    pub request: Shape,
    /// Success status and body.
    pub answer: (u16, Shape),
}

fn ep(
    route: clawos_api::Route,
    prefix: &str,
    role: Option<Role>,
    action: &'static str,
    summary: &'static str,
    request: Shape,
    answer: (u16, Shape),
) -> Endpoint {
    Endpoint {
        method: route.method,
        path: format!("{prefix}{}", route.path),
        role,
        action,
        summary,
        request,
        answer,
    }
}

/// The public API, every route of it: one line each, a table to read down.
#[rustfmt::skip]
pub fn endpoints() -> Vec<Endpoint> {
    use Role::{Admin, Operator, Viewer};
    use Shape::{Empty, Json as J, JsonArray as A, Text};
    let p = PREFIX;
    vec![
        ep(routes::HEALTHZ, "", None, "health", "Liveness.", Empty, (200, Text)),
        ep(routes::OPENAPI, "", None, "openapi", "This document.", Empty, (200, Text)),
        ep(routes::CONSOLE, "", None, "console.page", "The web console.", Empty, (200, Shape::Page("text/html"))),
        ep(routes::CONSOLE_SCRIPT, "", None, "console.script", "The web console's script.", Empty, (200, Shape::Page("text/javascript"))),
        ep(routes::CONSOLE_STYLE, "", None, "console.style", "The web console's style sheet.", Empty, (200, Shape::Page("text/css"))),
        ep(routes::LOGIN, "", None, "session.create", "Browser login with an operator API token: sets the session cookie (Secure, HttpOnly, SameSite=Strict) and answers the CSRF token.", J("Login"), (201, J("SessionInfo"))),
        ep(routes::LOGIN_OIDC, "", None, "session.oidc.start", "Browser login through the OpenID provider: redirects there with state, nonce and a PKCE challenge.", Empty, (303, Empty)),
        ep(routes::OIDC_CALLBACK, "", None, "session.oidc", "The provider's answer: the code is exchanged, the ID token checked, the groups claim mapped to a role; sets the session cookie and redirects to the console (a CLI's login: redirects to the CLI's loopback port with a one-time code).", Empty, (303, Empty)),
        ep(routes::CLI_TOKEN, "", None, "session.cli_token", "A CLI browser login's last step: its one-time code and PKCE verifier for an operator API token (12 h).", J("CliToken"), (201, J("CreatedToken"))),
        ep(routes::LOGIN_SAML, "", None, "session.saml.start", "Browser login through the SAML identity provider: redirects there with an AuthnRequest.", Empty, (303, Empty)),
        ep(routes::SAML_ACS, "", None, "session.saml", "The IdP's signed Response (HTTP-POST binding): checked, the groups attribute mapped to a role; sets the session cookie and redirects to the console.", Shape::Page("application/x-www-form-urlencoded"), (303, Empty)),
        ep(routes::SAML_METADATA, "", None, "saml.metadata", "This service provider's SAML metadata.", Empty, (200, Shape::Page("application/samlmetadata+xml"))),
        ep(routes::SESSION, "", Some(Viewer), "session.get", "The caller's browser session and its CSRF token.", Empty, (200, J("SessionInfo"))),
        ep(routes::LOGOUT, "", Some(Viewer), "session.delete", "Log out: ends the session and clears its cookie.", Empty, (204, Empty)),
        ep(routes::WHOAMI, "", Some(Viewer), "whoami", "Who the caller is and their role.", Empty, (200, J("WhoAmI"))),
        ep(routes::CREATE_TOKEN, "", Some(Admin), "operator.token.create", "Create an operator API token; its secret is in this answer only.", J("CreateToken"), (201, J("CreatedToken"))),
        ep(routes::LIST_TOKENS, "", Some(Admin), "operator.token.list", "List operator tokens (never their secrets).", Empty, (200, A("TokenInfo"))),
        ep(routes::REVOKE_TOKEN, "", Some(Admin), "operator.token.revoke", "Revoke an operator token.", Empty, (204, Empty)),
        ep(routes::END_ACCESS, "", Some(Admin), "operator.access.end", "End an operator's access: their browser sessions (streams close within seconds) and the tokens their CLI browser logins made.", Empty, (200, J("EndedAccess"))),
        ep(routes::OPERATOR_AUDIT, "", Some(Admin), "operator.audit", "The newest records of the operator audit trail.", Empty, (200, A("AuditRecord"))),
        ep(routes::AUDIT_EVENTS, "", Some(Viewer), "audit.events", "The syscall audit trail (alerts included) from monitor-daemon.", Empty, (200, A("AuditEvent"))),
        ep(proxy::USAGE, p, Some(Viewer), "usage.get", "LLM usage per agent and model, from inference-proxy's ledger.", Empty, (200, J("UsageReport"))),
        ep(runs::LIST, p, Some(Viewer), "workflow.list", "Workflow runs, newest first.", Empty, (200, A("RunSummary"))),
        ep(runs::SUBMIT, p, Some(Operator), "workflow.submit", "Submit a workflow run (the YAML spec and its inputs).", J("SubmitRun"), (201, J("RunSummary"))),
        ep(runs::GET, p, Some(Viewer), "workflow.get", "A run and its steps.", Empty, (200, J("RunStatus"))),
        ep(runs::EVENTS, p, Some(Viewer), "workflow.events", "A run's journal after event `after`.", Empty, (200, A("RunEvent"))),
        ep(runs::RUN_ARTIFACTS, p, Some(Operator), "workflow.artifacts", "The artifacts a run's steps made.", Empty, (200, A("ArtifactRef"))),
        ep(runs::ARTIFACT, p, Some(Operator), "workflow.artifact", "An artifact's bytes, by its sha256.", Empty, (200, Shape::Page("application/octet-stream"))),
        ep(runs::APPROVE, p, Some(Operator), "workflow.approve", "Approve or reject a waiting approval step.", J("Approval"), (204, Empty)),
        ep(runs::CANCEL, p, Some(Operator), "workflow.cancel", "Cancel a run.", Empty, (200, J("RunStatus"))),
        ep(identity::ISSUE, p, Some(Admin), "agent.token.issue", "Issue an agent token (identity-manager).", J("IssueRequest"), (201, J("Issued"))),
        ep(identity::REVOKE, p, Some(Admin), "agent.token.revoke", "Revoke one agent token (by `jti`) or every token of an agent.", J("RevokeRequest"), (204, Empty)),
        ep(identity::ROTATE_KEYS, p, Some(Admin), "agent.keys.rotate", "Rotate identity-manager's token signing keys (next → active → retired).", Empty, (200, J("RotatedKeys"))),
        ep(identity::INTROSPECT, p, Some(Operator), "agent.token.introspect", "Whether an agent token verifies (signature, expiry, revocation), and its claims.", J("IntrospectRequest"), (200, J("Introspection"))),
        ep(vm::IMAGES, p, Some(Operator), "image.list", "The images VMs may boot, each verified now (or why it was refused).", Empty, (200, A("ImageInfo"))),
        ep(vm::VERIFY_IMAGE, p, Some(Operator), "image.verify", "Verify one image as a boot would (422 with the refusal).", Empty, (200, J("ImageInfo"))),
        ep(vm::LIST, p, Some(Viewer), "vm.list", "List VMs.", Empty, (200, A("Vm"))),
        ep(vm::START, p, Some(Operator), "vm.start", "Create (if new) and start a VM from a registered, signed image.", J("StartVm"), (202, J("Vm"))),
        ep(vm::GET, p, Some(Viewer), "vm.get", "One VM.", Empty, (200, J("Vm"))),
        ep(vm::STOP, p, Some(Operator), "vm.stop", "Stop a VM (answers once it is stopped).", Empty, (200, J("Vm"))),
        ep(vm::DELETE, p, Some(Operator), "vm.delete", "Delete a stopped VM and its disks.", Empty, (204, Empty)),
        ep(vm::CONSOLE, p, Some(Viewer), "vm.console", "The VM's console log from byte `offset`; `x-console-offset` is the next offset.", Empty, (200, Text)),
        ep(vm::PAUSE, p, Some(Operator), "vm.pause", "Freeze a VM's vCPUs.", Empty, (200, J("Vm"))),
        ep(vm::RESUME, p, Some(Operator), "vm.resume", "Resume a paused VM.", Empty, (200, J("Vm"))),
        ep(vm::LIST_SNAPSHOTS, p, Some(Viewer), "vm.snapshot.list", "A VM's snapshots.", Empty, (200, A("Snapshot"))),
        ep(vm::CREATE_SNAPSHOT, p, Some(Operator), "vm.snapshot.create", "Snapshot a running VM.", J("CreateSnapshot"), (201, J("Snapshot"))),
        ep(vm::DELETE_SNAPSHOT, p, Some(Operator), "vm.snapshot.delete", "Delete a snapshot.", Empty, (204, Empty)),
        ep(vm::EXEC, p, Some(Operator), "vm.exec", "Run a command in the VM (WebSocket: vm-launcher's exec protocol, relayed).", Empty, (101, Empty)),
        ep(vm::GATEWAY, p, Some(Operator), "vm.gateway", "A TCP tunnel to the VM's agent gateway (WebSocket, binary frames, relayed).", Empty, (101, Empty)),
        ep(vm::AGENT_CHAT, p, Some(Operator), "vm.agent.chat", "Give the VM's agent a task (OpenAI-compatible chat completions; JSON, or server-sent events when `stream` is true).", J("ChatRequest"), (200, J("ChatCompletion"))),
        ep(vm::AGENT_SESSIONS, p, Some(Viewer), "vm.agent.sessions", "The VM's agent sessions.", Empty, (200, J("SessionList"))),
        ep(vm::RESTORE, p, Some(Operator), "vm.restore", "Restore a stopped VM from one of its snapshots.", J("RestoreVm"), (202, J("Vm"))),
        ep(vm::PUT_FILE, p, Some(Operator), "vm.files.put", "Copy a file into the VM's /workspace (`?path=`; octet-stream body with Content-Length, streamed).", Shape::Page("application/octet-stream"), (204, Empty)),
        ep(vm::GET_FILE, p, Some(Operator), "vm.files.get", "Copy a file out of the VM's /workspace (`?path=`, streamed), or list a directory (`&list=true`).", Empty, (200, Shape::Page("application/octet-stream"))),
    ]
}

/// The identity providers operators may log in through (besides API tokens).
#[derive(Debug, Default)]
pub struct Logins {
    pub oidc: Option<Arc<crate::oidc::Oidc>>,
    pub saml: Option<Arc<crate::saml::Saml>>,
}

/// What the handlers share.
#[derive(Debug)]
pub struct App {
    pub launcher: LauncherClient,
    pub operators: OperatorStore,
    pub audit: AuditTrail,
    pub guard: Guard,
    pub upstreams: crate::upstreams::Upstreams,
    /// OIDC login, when configured.
    pub oidc: Option<Arc<crate::oidc::Oidc>>,
    /// SAML login, when configured.
    pub saml: Option<Arc<crate::saml::Saml>>,
    pub sessions: crate::sessions::Sessions,
    /// CLI browser logins' one-time codes, waiting to be traded for a token.
    pub cli_codes: crate::cli_login::CliCodes,
    /// The session cookie's name: `__Host-` prefixed over TLS.
    pub cookie: &'static str,
    /// The served OpenAPI document (JSON).
    pub openapi: String,
    /// Whether answers go over TLS (and so carry HSTS).
    pub tls: bool,
    /// (method, path template) → endpoint.
    pub(crate) table: HashMap<(Method, String), Endpoint>,
}

impl App {
    pub fn new(
        launcher: LauncherClient,
        operators: OperatorStore,
        audit: AuditTrail,
        guard: Guard,
        upstreams: crate::upstreams::Upstreams,
        logins: Logins,
        tls: bool,
    ) -> Self {
        let Logins { oidc, saml } = logins;
        let table = endpoints()
            .into_iter()
            .map(|e| ((e.method.method(), e.path.clone()), e))
            .collect();
        Self {
            launcher,
            operators,
            audit,
            guard,
            upstreams,
            oidc,
            saml,
            sessions: crate::sessions::Sessions::default(),
            cli_codes: crate::cli_login::CliCodes::default(),
            cookie: if tls {
                crate::sessions::COOKIE
            } else {
                crate::sessions::COOKIE_PLAIN
            },
            openapi: crate::openapi::document_json(),
            tls,
            table,
        }
    }
}

pub(crate) type Shared = State<Arc<App>>;

/// The router: every endpoint of [`endpoints`] mounted, `gate::gate` in front of all.
pub fn router(app: Arc<App>) -> Router {
    let mut r: Router<Arc<App>> = Router::new();
    for e in endpoints() {
        let filter = match e.method {
            RouteMethod::Get => MethodFilter::GET,
            RouteMethod::Post => MethodFilter::POST,
            RouteMethod::Put => MethodFilter::PUT,
            RouteMethod::Delete => MethodFilter::DELETE,
        };
        let h = match e.action {
            "health" => axum::routing::on(filter, health),
            "openapi" => axum::routing::on(filter, openapi),
            "whoami" => axum::routing::on(filter, operator_routes::whoami),
            "console.page" => axum::routing::on(filter, operator_routes::console_page),
            "console.script" => axum::routing::on(filter, operator_routes::console_script),
            "console.style" => axum::routing::on(filter, operator_routes::console_style),
            "session.create" => axum::routing::on(filter, operator_routes::login),
            "session.oidc.start" => axum::routing::on(filter, operator_routes::oidc_start),
            "session.oidc" => axum::routing::on(filter, operator_routes::oidc_callback),
            "session.cli_token" => axum::routing::on(filter, crate::cli_login::cli_token),
            "session.saml.start" => axum::routing::on(filter, crate::saml_routes::start),
            "session.saml" => axum::routing::on(filter, crate::saml_routes::acs),
            "saml.metadata" => axum::routing::on(filter, crate::saml_routes::metadata),
            "session.get" => axum::routing::on(filter, operator_routes::session_get),
            "session.delete" => axum::routing::on(filter, operator_routes::logout),
            "operator.token.create" => axum::routing::on(filter, operator_routes::create_token),
            "operator.token.list" => axum::routing::on(filter, operator_routes::list_tokens),
            "operator.token.revoke" => axum::routing::on(filter, operator_routes::revoke_token),
            "operator.audit" => axum::routing::on(filter, up::operator_audit),
            "operator.access.end" => axum::routing::on(filter, operator_routes::end_access),
            "usage.get" => axum::routing::on(filter, up::usage),
            "audit.events" => axum::routing::on(filter, up::audit_events),
            "workflow.list" => axum::routing::on(filter, up::runs),
            "workflow.submit" => axum::routing::on(filter, up::submit_run),
            "workflow.get" => axum::routing::on(filter, up::run),
            "workflow.approve" => axum::routing::on(filter, up::approve),
            "workflow.cancel" => axum::routing::on(filter, up::cancel_run),
            "workflow.events" => axum::routing::on(filter, up::run_events),
            "workflow.artifacts" => axum::routing::on(filter, up::run_artifacts),
            "workflow.artifact" => axum::routing::on(filter, up::artifact),
            "agent.token.issue" => axum::routing::on(filter, up::issue_agent_token),
            "agent.token.revoke" => axum::routing::on(filter, up::revoke_agent_tokens),
            "agent.token.introspect" => axum::routing::on(filter, up::introspect_agent_token),
            "agent.keys.rotate" => axum::routing::on(filter, up::rotate_agent_keys),
            "image.list" => axum::routing::on(filter, vm_routes::images),
            "image.verify" => axum::routing::on(filter, vm_routes::verify_image),
            "vm.files.put" => axum::routing::on(filter, crate::vm_streams::put_file),
            "vm.files.get" => axum::routing::on(filter, crate::vm_streams::get_file),
            "vm.exec" => axum::routing::on(filter, crate::vm_streams::exec),
            "vm.gateway" => axum::routing::on(filter, crate::vm_streams::gateway),
            "vm.agent.chat" => axum::routing::on(filter, crate::vm_streams::agent_chat),
            "vm.agent.sessions" => axum::routing::on(filter, crate::vm_streams::agent_sessions),
            "vm.list" => axum::routing::on(filter, vm_routes::vm_list),
            "vm.start" => axum::routing::on(filter, vm_routes::vm_start),
            "vm.get" => axum::routing::on(filter, vm_routes::vm_get),
            "vm.stop" => axum::routing::on(filter, vm_routes::vm_stop),
            "vm.delete" => axum::routing::on(filter, vm_routes::vm_delete),
            "vm.console" => axum::routing::on(filter, vm_routes::vm_console),
            "vm.pause" => axum::routing::on(filter, vm_routes::vm_pause),
            "vm.resume" => axum::routing::on(filter, vm_routes::vm_resume),
            "vm.snapshot.list" => axum::routing::on(filter, vm_routes::snapshot_list),
            "vm.snapshot.create" => axum::routing::on(filter, vm_routes::snapshot_create),
            "vm.snapshot.delete" => axum::routing::on(filter, vm_routes::snapshot_delete),
            "vm.restore" => axum::routing::on(filter, vm_routes::vm_restore),
            other => {
                // An endpoint without a handler is a programming error every test
                // catches; serve it as 501 rather than panic at start.
                tracing::error!(action = other, "endpoint has no handler");
                axum::routing::on(filter, not_implemented)
            }
        };
        r = r.route(&e.path, h);
    }
    r.fallback(clawos_service::http::no_such_route)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::gate::gate,
        ))
        .layer(axum::middleware::from_fn(
            clawos_service::http::server_request_id,
        ))
        .with_state(app)
}

/// A launcher error as the control plane answers it: the launcher's own status, code
/// and message for what the operator asked wrong; 502 when the launcher refused the
/// control plane's own credential (the operator's is fine); 503 when it is down.
pub(crate) fn upstream(e: ClientError) -> ErrorResponse {
    upstream_error("vm-launcher", e)
}

/// An error of `daemon`'s typed client as the control plane answers it (see
/// [`upstream`]).
pub(crate) fn upstream_error(daemon: &str, e: ClientError) -> ErrorResponse {
    match e {
        ClientError::Api {
            status: 401 | 403, ..
        } => ErrorResponse::new(
            StatusCode::BAD_GATEWAY,
            code::UNAVAILABLE,
            format!(
                "{daemon} refused the control plane's credential for it (is the control plane pointed at {daemon}'s own operator credential, in the shared state directory?)"
            ),
        ),
        ClientError::Api {
            status,
            code,
            message,
            ..
        } => ErrorResponse::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            known_code(&code),
            message,
        ),
        ClientError::Transport { url, source, .. } if source.is_timeout() => ErrorResponse::new(
            StatusCode::GATEWAY_TIMEOUT,
            code::UNAVAILABLE,
            format!("{daemon} at {url} did not answer in time"),
        ),
        ClientError::Transport { url, .. } => ErrorResponse::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::UNAVAILABLE,
            format!("{daemon} at {url} cannot be reached"),
        ),
    }
}

fn known_code(c: &str) -> &'static str {
    [
        code::INVALID_REQUEST,
        code::NOT_FOUND,
        code::CONFLICT,
        code::RATE_LIMITED,
        code::UNAVAILABLE,
        code::IMAGE_UNSIGNED,
        code::IMAGE_BAD_SIGNATURE,
        code::IMAGE_HASH_MISMATCH,
        code::IMAGE_SIZE_MISMATCH,
        code::IMAGE_ROOT_HASH_MISMATCH,
        code::IMAGE_INVALID,
    ]
    .into_iter()
    .find(|k| *k == c)
    .unwrap_or(code::INTERNAL)
}

impl From<OperatorError> for ErrorResponse {
    fn from(e: OperatorError) -> Self {
        match e {
            OperatorError::Invalid(m) => ErrorResponse::invalid(m),
            OperatorError::NotFound(_) => ErrorResponse::not_found(e.to_string()),
            other => ErrorResponse::internal(other.to_string()),
        }
    }
}

/// A VM name or snapshot tag from the path, checked before it goes anywhere.
pub(crate) fn label(kind: &str, name: &str) -> Result<(), ErrorResponse> {
    match clawos_api::label_problem(name) {
        None => Ok(()),
        Some(why) => Err(ErrorResponse::invalid(format!(
            "{kind} name {name:?}: {why}"
        ))),
    }
}

pub(crate) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ErrorResponse> {
    b.map(|Json(t)| t)
        .map_err(|e| ErrorResponse::invalid(e.body_text()))
}

pub(crate) type ApiResult<T> = Result<T, ErrorResponse>;

async fn health() -> &'static str {
    "ok\n"
}

async fn openapi(State(app): Shared) -> Response {
    let mut resp = app.openapi.clone().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn not_implemented() -> ErrorResponse {
    ErrorResponse::new(
        StatusCode::NOT_IMPLEMENTED,
        code::INTERNAL,
        "not implemented",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::first_param;

    #[test]
    fn every_endpoint_is_unique_and_every_closed_one_names_a_role() {
        let eps = endpoints();
        let mut seen = std::collections::HashSet::new();
        for e in &eps {
            assert!(
                seen.insert((e.method.method(), e.path.clone())),
                "{} twice",
                e.path
            );
            assert!(
                e.path == "/healthz"
                    || e.path.starts_with("/api/v1/")
                    || e.action.starts_with("console."),
                "{} is outside /api/v1",
                e.path
            );
            if e.role.is_none() {
                assert!(
                    matches!(
                        e.action,
                        "health"
                            | "openapi"
                            | "session.create"
                            | "session.oidc.start"
                            | "session.oidc"
                            | "session.cli_token"
                            | "session.saml.start"
                            | "session.saml"
                            | "saml.metadata"
                    ) || (e.action.starts_with("console.") && e.method == RouteMethod::Get),
                    "{} is open",
                    e.action
                );
            }
            // Whatever changes state needs at least the operator role (logging in and
            // out change only the caller's own session).
            if e.method != RouteMethod::Get && !e.action.starts_with("session.") {
                assert!(e.role >= Some(Role::Operator), "{} is too open", e.action);
            }
        }
    }

    #[test]
    fn the_audit_target_is_the_first_path_parameter_decoded() {
        assert_eq!(
            first_param("/api/v1/vms/{name}/stop", "/api/v1/vms/my-agent/stop").as_deref(),
            Some("my-agent")
        );
        assert_eq!(
            first_param("/api/v1/vms/{name}", "/api/v1/vms/a%2Fb").as_deref(),
            Some("a/b")
        );
        assert_eq!(first_param("/api/v1/vms", "/api/v1/vms"), None);
    }

    /// A fronted daemon that takes the connection but never answers is a 504 naming
    /// it, not "cannot be reached".
    #[tokio::test]
    async fn a_daemon_that_never_answers_is_a_gateway_timeout() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", silent.local_addr().expect("addr"));
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("client");
        let http = clawos_api::HttpClient::with_http("orchestrator", &url, client);
        let e = http
            .json::<serde_json::Value>(http.request(clawos_orchestrator_api::routes::LIST, &[]))
            .await
            .expect_err("no answer");
        let answer = upstream_error("orchestrator", e);
        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            answer.message.contains("did not answer in time"),
            "{}",
            answer.message
        );
        held.abort();
    }
}
