//! The public API: one table of endpoints ([`endpoints`]) — method, path, the role it
//! needs, the action name the audit trail records — from which the router is mounted,
//! every request authorized and the OpenAPI document generated, so the three cannot
//! disagree. In front of every route, [`gate`] does, in order:
//!
//! 1. the Host/Origin/body-type checks every ClawOS API makes (`clawos_service::guard`);
//! 2. **authenticate**: `Authorization: Bearer <operator token>` (401 otherwise);
//! 3. **authorize**: the token's role against the endpoint's (403 otherwise; a mounted
//!    route missing from the table is refused too: deny by default);
//! 4. read the body within [`BODY_TIMEOUT`] and [`MAX_BODY`] (408, 413) — but a file
//!    upload, which streams through to the VM under its own idle limit;
//! 5. **act** (the handler), then
//! 6. **audit**: one [`AuditRecord`] per request, whatever happened above.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
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
use futures_util::FutureExt as _;

use crate::audit::{AuditRecord, AuditTrail, timestamp};
use crate::operators::{Operator, OperatorError, OperatorStore};
use crate::upstreams as up;
use crate::{operator_routes, vm_routes};

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
    table: HashMap<(Method, String), Endpoint>,
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

/// The router: every endpoint of [`endpoints`] mounted, [`gate`] in front of all.
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
        .layer(axum::middleware::from_fn_with_state(app.clone(), gate))
        .layer(axum::middleware::from_fn(
            clawos_service::http::server_request_id,
        ))
        .with_state(app)
}

/// The audit target a handler found in the body (a started VM's name), for [`gate`].
#[derive(Debug, Clone)]
pub(crate) struct AuditTarget(pub(crate) String);

/// Authenticate → authorize → read the body → act → audit (see the module docs).
async fn gate(State(app): Shared, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |c| c.0.to_string());
    let endpoint = template
        .as_ref()
        .and_then(|t| app.table.get(&(method.clone(), t.clone())));
    let action = match (&template, endpoint) {
        (_, Some(e)) => e.action.to_owned(),
        (None, None) => "unknown_route".to_owned(),
        (Some(_), None) => "unlisted_route".to_owned(),
    };
    let target = template
        .as_deref()
        .and_then(|t| first_param(t, req.uri().path()));
    let rec = AuditRecord {
        ts: timestamp(),
        request_id: clawos_service::http::current_request_id(),
        operator: "-".into(),
        role: None,
        via: "-".into(),
        action,
        target,
        result: String::new(),
        status: 0,
        remote,
        client_request_id: req
            .extensions()
            .get::<clawos_service::http::ClientRequestId>()
            .map(|c| c.0.clone()),
    };
    let page = endpoint.is_some_and(|e| e.action.starts_with("console."));
    // Until the answer is ready, a record is pending: if this future is dropped (the
    // client went away mid-request, after the action may have started), the guard
    // writes it as `aborted` (status 499) on its way out.
    let mut pending = PendingRecord {
        app: Arc::clone(&app),
        rec: Some(rec),
    };
    let resp = match admit(&app, endpoint, template.is_some(), req).await {
        Ok((op, req)) => {
            if let (Some(op), Some(rec)) = (&op, pending.rec.as_mut()) {
                rec.operator = op.name.clone();
                rec.role = Some(op.role.to_string());
                rec.via = op.via.to_owned();
            }
            // A panic in a handler is an answer (500) and a record like any other.
            match std::panic::AssertUnwindSafe(next.run(req))
                .catch_unwind()
                .await
            {
                Ok(resp) => resp,
                Err(_) => {
                    tracing::error!("a handler panicked");
                    ErrorResponse::internal("the request failed inside the control plane")
                        .into_response()
                }
            }
        }
        Err((op, refusal)) => {
            if let (Some(op), Some(rec)) = (op, pending.rec.as_mut()) {
                rec.operator = op.name;
                rec.role = Some(op.role.to_string());
                rec.via = op.via.to_owned();
            }
            refusal
        }
    };
    let Some(mut rec) = pending.rec.take() else {
        return resp;
    };
    let mut resp = resp;
    if let Some(AuditTarget(t)) = resp.extensions_mut().remove::<AuditTarget>() {
        rec.target = Some(t);
    }
    // A login names its operator only in its answer.
    if let Some(op) = resp.extensions_mut().remove::<Operator>() {
        rec.operator = op.name;
        rec.role = Some(op.role.to_string());
        rec.via = op.via.to_owned();
    }
    rec.status = resp.status().as_u16();
    rec.result = AuditRecord::result_of(rec.status).to_owned();
    app.audit.record(&rec);
    secure_headers(&app, &mut resp, page);
    resp
}

/// The audit record of a request in progress; written as `aborted` if dropped unsent.
struct PendingRecord {
    app: Arc<App>,
    rec: Option<AuditRecord>,
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.status = 499;
            rec.result = "aborted".to_owned();
            self.app.audit.record(&rec);
        }
    }
}

type Refused = (Option<Operator>, Response);

/// Steps 1–4 of [`gate`]: the request, ready for its handler, and who sent it.
async fn admit(
    app: &App,
    endpoint: Option<&Endpoint>,
    matched: bool,
    req: Request,
) -> Result<(Option<Operator>, Request), Refused> {
    // The console's own requests carry our own origin; any other is checked (and
    // refused unless configured) by the guard.
    // The SAML ACS takes a cross-site form post by design (the IdP's page posts it):
    // Origin and body type are not checked there; the signed, browser-bound Response is.
    let saml_acs = endpoint.is_some_and(|e| e.action == "session.saml");
    let checked = if saml_acs {
        app.guard.check_host(req.uri(), req.headers())
    } else if same_origin(req.headers()) {
        let mut h = req.headers().clone();
        h.remove(header::ORIGIN);
        app.guard.check(req.method(), req.uri(), &h)
    } else {
        app.guard.check(req.method(), req.uri(), req.headers())
    };
    if let Err(refusal) = checked {
        return Err((None, refusal.into_response()));
    }
    let open = endpoint.is_some_and(|e| e.role.is_none());
    if open {
        // Open routes (logins, the SAML ACS) get the same body limits: a slow or
        // endless body costs a connection for 10 s, not for as long as it likes.
        return match read_body(req).await {
            Ok(req) => Ok((None, req)),
            Err(resp) => Err((None, resp)),
        };
    }
    let (op, session) = match authenticate(app, &req) {
        Ok(found) => found,
        Err(failure) => return Err((None, failure.into_response())),
    };
    let Some(endpoint) = endpoint else {
        if matched {
            // Mounted but not in the table: nobody may call it.
            tracing::error!(path = %req.uri().path(), "route has no access policy; refused");
            return Err((
                Some(op),
                ErrorResponse::new(
                    StatusCode::FORBIDDEN,
                    code::FORBIDDEN,
                    "this route has no access policy",
                )
                .into_response(),
            ));
        }
        // Unknown routes: the fallback's 404, to authenticated callers only.
        return Ok((Some(op), req));
    };
    let needed = endpoint.role.unwrap_or(Role::Admin);
    if op.role < needed {
        let msg = format!(
            "{} needs the {needed} role; {} has {}",
            endpoint.action, op.name, op.role
        );
        return Err((
            Some(op),
            ErrorResponse::new(StatusCode::FORBIDDEN, code::FORBIDDEN, msg).into_response(),
        ));
    }
    // A file upload streams through to the VM under its own idle limit; every other
    // body is read whole first.
    let body = if endpoint.action == "vm.files.put" {
        Ok(req)
    } else {
        read_body(req).await
    };
    match body {
        Ok(mut req) => {
            req.extensions_mut().insert(op.clone());
            if let Some(key) = session {
                req.extensions_mut().insert(SessionKey(key));
            }
            Ok((Some(op), req))
        }
        Err(resp) => Err((Some(op), resp)),
    }
}

/// Why a caller was not authenticated.
enum AuthFailure {
    /// 401 with this message.
    Unauthorized(&'static str),
    /// The store failed: 500.
    Store(String),
    /// A session's state-changing request without its CSRF token: 403.
    Csrf,
}

impl IntoResponse for AuthFailure {
    fn into_response(self) -> Response {
        match self {
            Self::Unauthorized(msg) => {
                let mut resp = ErrorResponse::unauthorized(msg).into_response();
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"clawos\""),
                );
                resp
            }
            Self::Store(e) => {
                ErrorResponse::internal(format!("operator store: {e}")).into_response()
            }
            Self::Csrf => ErrorResponse::new(
                StatusCode::FORBIDDEN,
                code::FORBIDDEN,
                "missing or wrong x-csrf-token for this session (a cross-site request?)",
            )
            .into_response(),
        }
    }
}

/// Whether the request's `Origin` is this server itself (`https://` + its `Host`).
fn same_origin(h: &axum::http::HeaderMap) -> bool {
    let (Some(origin), Some(host)) = (
        h.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        h.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .is_some_and(|o| o.eq_ignore_ascii_case(host))
}

/// The session cookie's value in `headers`, if there is one.
pub(crate) fn session_cookie<'a>(app: &App, headers: &'a axum::http::HeaderMap) -> Option<&'a str> {
    crate::sessions::cookie_in(headers, app.cookie)
}

/// The session a request came with (the cookie's value), for handlers whose work
/// outlives the request (streams) to check it is still alive.
#[derive(Clone)]
pub(crate) struct SessionKey(pub(crate) String);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl App {
    /// Whether `op` may still act: its token not revoked or expired, its browser
    /// session (if it came with one) not ended. Streams ask this while they run.
    pub(crate) fn still_allowed(&self, op: &Operator, session: Option<&str>) -> bool {
        if let Some(id) = session
            && self.sessions.find(id).is_none()
        {
            return false;
        }
        op.token_id.is_empty() || self.operators.is_active(&op.token_id).unwrap_or(false)
    }
}

fn authenticate(app: &App, req: &Request) -> Result<(Operator, Option<String>), AuthFailure> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return from_session(app, req).map(|(op, id)| (op, Some(id)));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    match app.operators.authenticate(token) {
        Ok(Some(op)) => Ok((op, None)),
        Ok(None) => Err(AuthFailure::Unauthorized(
            "operator credential refused: unknown, revoked or expired",
        )),
        Err(e) => Err(AuthFailure::Store(e.to_string())),
    }
}

/// The operator of the browser session the request's cookie names; for any method but
/// GET/HEAD the session's CSRF token must come in `x-csrf-token` too.
fn from_session(app: &App, req: &Request) -> Result<(Operator, String), AuthFailure> {
    let Some(id) = session_cookie(app, req.headers()) else {
        return Err(AuthFailure::Unauthorized(
            "no operator credential: send Authorization: Bearer <token> (`clawos operator token create`, or the local admin's control-plane/admin.token), or log in to the console",
        ));
    };
    let Some(found) = app.sessions.find(id) else {
        return Err(AuthFailure::Unauthorized(
            "session expired or logged out: log in again",
        ));
    };
    // A session opened with an API token lives only as long as the token; one opened
    // through the identity provider (no token) until its own expiry or logout.
    let token_active = if found.operator.token_id.is_empty() {
        Ok(true)
    } else {
        app.operators.is_active(&found.operator.token_id)
    };
    match token_active {
        Ok(true) => {}
        Ok(false) => {
            app.sessions.end(id);
            return Err(AuthFailure::Unauthorized(
                "the token this session was opened with was revoked or expired: log in again",
            ));
        }
        Err(e) => return Err(AuthFailure::Store(e.to_string())),
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let sent = req
            .headers()
            .get(crate::sessions::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !crate::sessions::same(sent, &found.csrf) {
            return Err(AuthFailure::Csrf);
        }
    }
    let mut op = found.operator;
    if op.via == "token" {
        op.via = "session";
    }
    Ok((op, id.to_owned()))
}

/// Reads a request's body within [`BODY_TIMEOUT`] and [`MAX_BODY`], so a slow or
/// endless sender costs one connection for ten seconds, not a handler forever.
async fn read_body(req: Request) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                ErrorResponse::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    code::INVALID_REQUEST,
                    format!("request body over {MAX_BODY} bytes"),
                )
            } else {
                ErrorResponse::invalid(format!("request body: {e}"))
            }
            .into_response());
        }
        Err(_) => {
            return Err(ErrorResponse::new(
                StatusCode::REQUEST_TIMEOUT,
                code::INVALID_REQUEST,
                format!(
                    "request body not received within {}s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
            .into_response());
        }
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The actual value of the first `{…}` segment of `template` in `path`.
fn first_param(template: &str, path: &str) -> Option<String> {
    template
        .split('/')
        .zip(path.split('/'))
        .find(|(t, _)| t.starts_with('{'))
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(hi), Some(lo)) = (hex_digit(b[i + 1]), hex_digit(b[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn secure_headers(app: &App, resp: &mut Response, page: bool) {
    let h = resp.headers_mut();
    if app.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The console loads only its own script, style and API; everything else nothing.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(if page {
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        } else {
            "default-src 'none'; frame-ancestors 'none'"
        }),
    );
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
