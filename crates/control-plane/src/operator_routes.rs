//! Who the caller is and how operators get in: whoami, operator tokens, the console's
//! pages, browser sessions (login with a token, current, logout) and the OIDC login;
//! [`session_redirect`] is where every identity-provider login (OIDC here, SAML in
//! `saml_routes`) becomes a session.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clawos_api::code;
use clawos_control_plane_api::{CreateToken, Login, Role, SessionInfo, WhoAmI};
use clawos_service::http::ErrorResponse;

use crate::http::{ApiResult, App, AuditTarget, Shared, body, session_cookie};
use crate::operators::Operator;

fn operator(req_op: Option<axum::Extension<Operator>>) -> ApiResult<Operator> {
    req_op
        .map(|axum::Extension(op)| op)
        .ok_or_else(|| ErrorResponse::internal("no authenticated operator on an authorized route"))
}

pub(crate) async fn whoami(op: Option<axum::Extension<Operator>>) -> ApiResult<Json<WhoAmI>> {
    let op = operator(op)?;
    Ok(Json(WhoAmI {
        operator: op.name,
        role: op.role,
        via: op.via.to_owned(),
    }))
}

pub(crate) async fn create_token(
    State(app): Shared,
    op: Option<axum::Extension<Operator>>,
    b: Result<Json<CreateToken>, JsonRejection>,
) -> ApiResult<Response> {
    let op = operator(op)?;
    let req = body(b)?;
    let created = store(&app, move |s| s.create(&req, &op.name)).await??;
    let id = created.info.id.clone();
    let mut resp = (StatusCode::CREATED, Json(created)).into_response();
    resp.extensions_mut().insert(AuditTarget(id));
    Ok(resp)
}

pub(crate) async fn list_tokens(State(app): Shared) -> ApiResult<Response> {
    Ok(Json(store(&app, |s| s.list()).await??).into_response())
}

pub(crate) async fn revoke_token(
    State(app): Shared,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let revoked = id.clone();
    store(&app, move |s| s.revoke(&revoked)).await??;
    app.sessions.end_for_token(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// Runs `f` on the operator store off the async workers: SQLite writes wait for the
/// disk, and the workers serve every other request meanwhile.
pub(crate) async fn store<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&crate::operators::OperatorStore) -> T + Send + 'static,
) -> Result<T, ErrorResponse> {
    let app = Arc::clone(app);
    tokio::task::spawn_blocking(move || f(&app.operators))
        .await
        .map_err(|e| ErrorResponse::internal(format!("operator store task: {e}")))
}

/// Ends an identity-provider user's access: every browser session they hold, every
/// token their CLI browser logins made and any CLI login code still waiting. `operator`
/// is their provider name (`otto`) or their CLI token's (`cli-otto`). API tokens an
/// admin made stay: revoke those by id. Nothing matched: 404, saying what to try.
pub(crate) async fn end_access(
    State(app): Shared,
    q: Result<Query<clawos_control_plane_api::OperatorQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let name = q.operator.trim();
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(ErrorResponse::invalid(
            "operator: 1-256 characters, no control characters",
        ));
    }
    // A CLI token's name (`cli-otto`) stands for the provider user whose logins made
    // it; token names are lossy (case, punctuation), so it is looked up, and one that
    // several users share is refused rather than guessed.
    let user = if name.starts_with("cli-") {
        let token_name = name.to_owned();
        let mut users = store(&app, move |s| s.cli_login_users(&token_name)).await??;
        users.extend(app.cli_codes.users_named(name));
        users.sort();
        users.dedup();
        match users.len() {
            // No such CLI token: perhaps a provider user whose own name starts so.
            0 => name.to_owned(),
            1 => users.remove(0),
            _ => {
                return Err(ErrorResponse::new(
                    StatusCode::CONFLICT,
                    code::CONFLICT,
                    format!(
                        "{name} is the CLI token name of several provider users ({}): end each by their provider name",
                        users.join(", ")
                    ),
                ));
            }
        }
    } else {
        name.to_owned()
    };
    // Codes first: one traded meanwhile would make a token after the revocation pass.
    let codes = app.cli_codes.forget_user(&user);
    let by = user.clone();
    let tokens_revoked = store(&app, move |s| s.revoke_cli_logins_of(&by)).await??;
    for id in &tokens_revoked {
        app.sessions.end_for_token(id);
    }
    let sessions_ended = app.sessions.end_for_operator(&user);
    if tokens_revoked.is_empty() && sessions_ended == 0 && codes == 0 {
        return Err(ErrorResponse::new(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!(
                "nothing to end for {name:?}: no identity-provider session, live CLI login token or waiting CLI login (give the provider's user name, or their CLI token's `cli-…`); an API token an admin made is revoked by id (`operator token revoke`)"
            ),
        ));
    }
    tracing::info!(
        operator = %user,
        sessions_ended,
        tokens = tokens_revoked.len(),
        "operator access ended"
    );
    let mut resp = Json(clawos_control_plane_api::EndedAccess {
        operator: user.clone(),
        sessions_ended,
        tokens_revoked,
    })
    .into_response();
    resp.extensions_mut().insert(AuditTarget(user));
    Ok(resp)
}

/// The caller's address (unspecified when the connection's is not known, as in tests
/// that drive the router directly).
pub(crate) fn client_ip(
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
) -> std::net::IpAddr {
    peer.map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |p| {
        p.0.0.ip()
    })
}

const CONSOLE_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/app.js");
const CONSOLE_CSS: &str = include_str!("../console/style.css");

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(crate) async fn console_page() -> Response {
    page("text/html; charset=utf-8", CONSOLE_HTML)
}

pub(crate) async fn console_script() -> Response {
    page("text/javascript; charset=utf-8", CONSOLE_JS)
}

pub(crate) async fn console_style() -> Response {
    page("text/css; charset=utf-8", CONSOLE_CSS)
}

fn session_info(op: &Operator, csrf: String) -> SessionInfo {
    SessionInfo {
        operator: op.name.clone(),
        role: op.role,
        via: op.via.to_owned(),
        csrf_token: csrf,
        idle_timeout_secs: crate::sessions::IDLE.as_secs(),
    }
}

pub(crate) fn cookie_header(app: &App, value: &str, max_age: u64) -> Option<HeaderValue> {
    let secure = if app.tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
        app.cookie
    ))
    .ok()
}

pub(crate) async fn login(
    State(app): Shared,
    b: Result<Json<Login>, JsonRejection>,
) -> ApiResult<Response> {
    let req = body(b)?;
    let Some(op) = app.operators.authenticate(req.token.trim())? else {
        return Err(ErrorResponse::unauthorized(
            "operator credential refused: unknown, revoked or expired",
        ));
    };
    let new = app
        .sessions
        .create(op.clone())
        .map_err(|e| ErrorResponse::internal(format!("no randomness: {e}")))?;
    let mut resp = (StatusCode::CREATED, Json(session_info(&op, new.csrf))).into_response();
    if let Some(v) = cookie_header(&app, &new.id, crate::sessions::ABSOLUTE.as_secs()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp.extensions_mut().insert(AuditTarget(op.name.clone()));
    resp.extensions_mut().insert(op);
    Ok(resp)
}

/// The OIDC login state cookie: `SameSite=Lax` (the provider's redirect back is a
/// cross-site navigation), `__Host-`, ten minutes.
fn state_cookie(app: &App, value: &str, max_age: u64) -> Option<HeaderValue> {
    let secure = if app.tls { "; Secure" } else { "" };
    let name = if app.tls {
        crate::oidc::STATE_COOKIE
    } else {
        "clawos_oidc"
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    ))
    .ok()
}

fn oidc_of(app: &App) -> ApiResult<&Arc<crate::oidc::Oidc>> {
    app.oidc.as_ref().ok_or_else(|| {
        ErrorResponse::not_found(
            "OIDC login is not configured on this control plane (--oidc-issuer)",
        )
    })
}

fn oidc_error(e: &crate::oidc::OidcError) -> ErrorResponse {
    login_refusal(e.status(), e.to_string())
}

pub(crate) async fn oidc_start(
    State(app): Shared,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    q: Result<Query<crate::cli_login::StartQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let oidc = oidc_of(&app)?;
    let Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let check_only = q.check_only();
    let cli = crate::cli_login::handoff(q)?;
    if check_only {
        // The CLI asks before it waits for a browser: configured, parameters good.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (url, state) = oidc
        .start(cli, client_ip(peer))
        .await
        .map_err(|e| oidc_error(&e))?;
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&url) {
        h.insert(header::LOCATION, v);
    }
    if let Some(v) = state_cookie(&app, &state, crate::oidc::LOGIN_TTL.as_secs()) {
        h.insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

pub(crate) async fn oidc_callback(
    State(app): Shared,
    headers: HeaderMap,
    q: Result<Query<Callback>, QueryRejection>,
) -> ApiResult<Response> {
    let oidc = oidc_of(&app)?;
    let Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let clear = state_cookie(&app, "", 0);
    let with_clear = |mut resp: Response| {
        if let Some(v) = clear.clone() {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
        resp
    };
    if let Some(err) = q.error {
        let e = crate::oidc::OidcError::Provider(format!(
            "{err}: {}",
            q.error_description.unwrap_or_default()
        ));
        return Ok(with_clear(oidc_error(&e).into_response()));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(ErrorResponse::invalid("the callback needs code and state"));
    };
    let cookie_name = if app.tls {
        crate::oidc::STATE_COOKIE
    } else {
        "clawos_oidc"
    };
    let cookie_state = crate::sessions::cookie_in(&headers, cookie_name);
    let user = match oidc.finish(&code, &state, cookie_state).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "OIDC login refused");
            return Ok(with_clear(oidc_error(&e).into_response()));
        }
    };
    let resp = match user.cli {
        Some(cli) => crate::cli_login::redirect_to_cli(&app, user.name, user.role, &cli)?,
        None => session_redirect(&app, user.name, user.role, "oidc")?,
    };
    Ok(with_clear(resp))
}

/// A browser login that an identity provider vouched for: a new session for `name`
/// with `role`, its cookie, and a redirect to the console; the audit record names them.
pub(crate) fn session_redirect(
    app: &App,
    name: String,
    role: Role,
    via: &'static str,
) -> ApiResult<Response> {
    let op = Operator {
        name,
        role,
        via,
        token_id: String::new(),
    };
    let new = app
        .sessions
        .create(op.clone())
        .map_err(|e| ErrorResponse::internal(format!("no randomness: {e}")))?;
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    if let Some(v) = cookie_header(app, &new.id, crate::sessions::ABSOLUTE.as_secs()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp.extensions_mut().insert(AuditTarget(op.name.clone()));
    resp.extensions_mut().insert(op);
    Ok(resp)
}

/// A refused browser login as its answer: 403 (no role), 502 (the provider cannot be
/// used) or 401.
pub(crate) fn login_refusal(status: u16, message: String) -> ErrorResponse {
    let (status, code) = match status {
        403 => (StatusCode::FORBIDDEN, code::FORBIDDEN),
        502 => (StatusCode::BAD_GATEWAY, code::UNAVAILABLE),
        _ => (StatusCode::UNAUTHORIZED, code::UNAUTHORIZED),
    };
    ErrorResponse::new(status, code, message)
}

pub(crate) async fn session_get(
    State(app): Shared,
    op: Option<axum::Extension<Operator>>,
    headers: HeaderMap,
) -> ApiResult<Json<SessionInfo>> {
    let op = operator(op)?;
    let id = session_cookie(&app, &headers).ok_or_else(|| {
        ErrorResponse::invalid("no browser session: this request used a bearer token")
    })?;
    let found = app
        .sessions
        .find(id)
        .ok_or_else(|| ErrorResponse::unauthorized("session expired"))?;
    Ok(Json(session_info(&op, found.csrf)))
}

pub(crate) async fn logout(State(app): Shared, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&app, &headers) {
        app.sessions.end(id);
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Some(v) = cookie_header(&app, "", 0) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}
