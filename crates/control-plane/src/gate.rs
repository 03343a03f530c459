//! The gate every request of the public API passes (`gate`, mounted in front of the
//! router by `http::router`): guard → authenticate → authorize → read the body → act →
//! audit, as the `http` module's documentation lists; plus the session hand-over
//! handlers and streams rely on and the answers' security headers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clawos_api::code;
use clawos_control_plane_api::Role;
use clawos_service::http::ErrorResponse;
use futures_util::FutureExt as _;

use crate::audit::{AuditRecord, timestamp};
use crate::http::{App, BODY_TIMEOUT, Endpoint, MAX_BODY, Shared};
use crate::operators::Operator;

/// The audit target a handler found in the body (a started VM's name), for [`gate`].
#[derive(Debug, Clone)]
pub(crate) struct AuditTarget(pub(crate) String);

/// Authenticate → authorize → read the body → act → audit (see the module docs).
pub(crate) async fn gate(State(app): Shared, req: Request, next: Next) -> Response {
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
/// A body whose `Content-Length` is already over the limit is refused before any of it
/// is read: a client that sent `Expect: 100-continue` (curl does above 1 MiB) then
/// never sends it, and none is cut off mid-upload (which a client sees as a broken
/// pipe, not as the 413).
async fn read_body(req: Request) -> Result<Request, Response> {
    let too_large = || {
        ErrorResponse::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::INVALID_REQUEST,
            format!("request body over {MAX_BODY} bytes"),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return Err(if over {
                too_large()
            } else {
                ErrorResponse::invalid(format!("request body: {e}")).into_response()
            });
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
pub(crate) fn first_param(template: &str, path: &str) -> Option<String> {
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
