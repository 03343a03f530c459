//! The REST API: the routes of `clawos_identity_manager_api::routes`, served from the
//! store. Every error leaves through `impl From<IdentityError> for ErrorResponse`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine;
use clawos_identity_manager_api::{
    AgentKey, IntrospectRequest, Introspection, IssueRequest, Jwk, OpenIdConfiguration,
    RevokeRequest, RotatedKeys, routes,
};
use clawos_service::http::{ErrorResponse, RouterExt};
use clawos_service::metrics::Counter;

use crate::IdentityError;
use crate::identity::Identity;

/// The one place a domain error becomes an HTTP status and error code.
impl From<IdentityError> for ErrorResponse {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Invalid(m) => Self::invalid(m),
            IdentityError::Unauthorized(m) => Self::unauthorized(m),
            IdentityError::NotFound(m) => Self::not_found(m),
            e @ (IdentityError::MasterKey(_)
            | IdentityError::Database(_)
            | IdentityError::Io { .. }
            | IdentityError::Internal(_)) => Self::internal(e.to_string()),
        }
    }
}

/// RFC 6750: a 401 names the scheme it wants.
async fn www_authenticate(mut resp: Response) -> Response {
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

type ApiResult<T> = Result<T, ErrorResponse>;

#[derive(Debug)]
struct AppState {
    identity: Arc<Identity>,
    service_token: String,
    metrics: clawos_service::Metrics,
    issued: Counter,
    renewed: Counter,
    revocations: Counter,
    refused: Counter,
}

fn bump(c: &Counter) {
    c.inc();
}

type S = State<Arc<AppState>>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Constant-time check of the service credential.
fn require_service(st: &AppState, headers: &HeaderMap) -> Result<(), IdentityError> {
    let result = check_service(st, headers);
    if result.is_err() {
        bump(&st.refused);
    }
    result
}

fn check_service(st: &AppState, headers: &HeaderMap) -> Result<(), IdentityError> {
    if bearer(headers).is_none() {
        return Err(IdentityError::Unauthorized(
            "missing service credential (Authorization: Bearer)".into(),
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim_end);
    if !clawos_service::bearer_matches(given, &st.service_token) {
        return Err(IdentityError::Unauthorized(
            "wrong service credential".into(),
        ));
    }
    Ok(())
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, IdentityError> {
    body.map(|Json(b)| b)
        .map_err(|e| IdentityError::Invalid(format!("request body: {}", e.body_text())))
}

async fn issue(
    State(st): S,
    headers: HeaderMap,
    body: Result<Json<IssueRequest>, JsonRejection>,
) -> ApiResult<Response> {
    require_service(&st, &headers)?;
    let req = json_body(body)?;
    let issued = st.identity.issue(&req)?;
    bump(&st.issued);
    tracing::info!(agent = %req.agent, vm = %req.vm_id, jti = %issued.jti, kid = %issued.kid, "token issued");
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

async fn renew(State(st): S, headers: HeaderMap) -> ApiResult<Response> {
    let token = bearer(&headers).ok_or_else(|| {
        IdentityError::Unauthorized("renew needs the current token (Authorization: Bearer)".into())
    })?;
    let renewed = st.identity.renew(token)?;
    bump(&st.renewed);
    Ok(Json(renewed).into_response())
}

async fn revoke(
    State(st): S,
    headers: HeaderMap,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> ApiResult<StatusCode> {
    require_service(&st, &headers)?;
    match json_body(body)? {
        RevokeRequest {
            jti: Some(j),
            agent: None,
        } => st.identity.revoke_jti(&j)?,
        RevokeRequest {
            jti: None,
            agent: Some(a),
        } => st.identity.revoke_agent(&a)?,
        _ => {
            return Err(IdentityError::Invalid("give exactly one of jti or agent".into()).into());
        }
    }
    bump(&st.revocations);
    Ok(StatusCode::NO_CONTENT)
}

/// RFC 7662: `active: false` and nothing else for any token that does not verify.
async fn introspect(
    State(st): S,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Introspection>> {
    require_service(&st, &headers)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let req: IntrospectRequest = if is_json {
        serde_json::from_slice(&body)
            .map_err(|e| IdentityError::Invalid(format!("request body: {e}")))?
    } else {
        serde_urlencoded::from_bytes(&body)
            .map_err(|e| IdentityError::Invalid(format!("request body: {e}")))?
    };
    Ok(Json(match st.identity.verify(&req.token, None) {
        Ok(c) => Introspection::active(&c),
        Err(_) => Introspection::inactive(),
    }))
}

async fn revocations(State(st): S) -> ApiResult<Response> {
    Ok(Json(st.identity.revocations()?).into_response())
}

async fn agent_key(
    State(st): S,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> ApiResult<Json<AgentKey>> {
    require_service(&st, &headers)?;
    let public = st.identity.known_agent_key(&agent)?;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public);
    Ok(Json(AgentKey {
        agent,
        jwk: Jwk::ed25519(x),
    }))
}

async fn rotate(State(st): S, headers: HeaderMap) -> ApiResult<Json<RotatedKeys>> {
    require_service(&st, &headers)?;
    let active_kid = st.identity.rotate_signing_keys()?;
    Ok(Json(RotatedKeys { active_kid }))
}

async fn jwks(State(st): S) -> ApiResult<Response> {
    let mut resp = Json(st.identity.jwks()?).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_str(&format!("max-age={}", crate::identity::JWKS_CACHE_SECS))
            .unwrap_or(header::HeaderValue::from_static("max-age=600")),
    );
    Ok(resp)
}

async fn discovery(State(st): S) -> Json<OpenIdConfiguration> {
    let iss = st.identity.config.issuer.trim_end_matches('/').to_owned();
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    Json(OpenIdConfiguration {
        jwks_uri: format!("{iss}{}", routes::JWKS.path),
        introspection_endpoint: format!("{iss}{}", routes::INTROSPECT.path),
        revocation_endpoint: format!("{iss}{}", routes::REVOKE.path),
        issuer: iss,
        id_token_signing_alg_values_supported: strings(&["EdDSA"]),
        token_endpoint_auth_methods_supported: strings(&["client_secret_bearer"]),
        subject_types_supported: strings(&["public"]),
        response_types_supported: strings(&["token"]),
        claims_supported: strings(&[
            "iss",
            "sub",
            "aud",
            "iat",
            "nbf",
            "exp",
            "jti",
            "agent",
            "vm_id",
            "image_root_hash",
            "scopes",
            "auth_time",
        ]),
    })
}

async fn metrics(State(st): S) -> Response {
    st.metrics.response()
}

/// The router.
/// The router, behind the `Host`/`Origin`/body-type guard (`clawos_service::guard`)
/// for a daemon listening on `listen` and named by `issuer` (verifiers reach it at
/// the issuer URL's host); the credentials are checked per route.
pub fn router(
    identity: Arc<Identity>,
    service_token: String,
    listen: std::net::SocketAddr,
    issuer: &str,
) -> Router {
    let mut registry = clawos_service::Metrics::new();
    let in_flight = registry.gauge(
        "clawos_identity_requests_in_flight",
        "Requests whose head has been read and that are not yet answered (a stop waits for them).",
    );
    let st = Arc::new(AppState {
        identity,
        service_token,
        issued: registry.counter("clawos_identity_tokens_issued_total", "Tokens issued."),
        renewed: registry.counter("clawos_identity_tokens_renewed_total", "Tokens renewed."),
        revocations: registry.counter(
            "clawos_identity_revocations_total",
            "Revocations (by jti or agent).",
        ),
        refused: registry.counter(
            "clawos_identity_service_auth_refused_total",
            "Requests refused for a missing or wrong service credential.",
        ),
        metrics: registry,
    });
    let routes = Router::new()
        .at(routes::ISSUE, issue)
        .at(routes::RENEW, renew)
        .at(routes::REVOKE, revoke)
        .at(routes::REVOCATIONS, revocations)
        .at(routes::AGENT_KEY, agent_key)
        .at(routes::ROTATE_KEYS, rotate)
        .at(routes::JWKS, jwks)
        .at(routes::DISCOVERY, discovery)
        .at(routes::HEALTHZ, || async { "ok\n" })
        .at(routes::METRICS, metrics)
        .fallback(clawos_service::http::no_such_route);
    let mut guard = clawos_service::guard::Guard::new().listening_on(listen);
    if let Some(host) = issuer
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .filter(|h| !h.is_empty())
    {
        guard = guard.allow_host(host);
    }
    // RFC 7662 introspection is form-encoded (JSON is taken too); the Host and Origin
    // checks and the service credential still apply to it.
    let introspection = guard
        .clone()
        .body_type(axum::http::Method::POST, clawos_service::guard::JSON)
        .body_type(
            axum::http::Method::POST,
            "application/x-www-form-urlencoded",
        )
        .protect(Router::new().at(routes::INTROSPECT, introspect));
    guard
        .protect(routes)
        .merge(introspection)
        .with_state(st)
        .layer(axum::middleware::map_response(www_authenticate))
        .layer(axum::middleware::from_fn(clawos_service::http::request_id))
        .layer(axum::middleware::from_fn(move |req, next| {
            count_in_flight(in_flight.clone(), req, next)
        }))
}

/// Counts a request from the moment its head is read (the handler has not yet read
/// its body) until its answer is returned, or it is dropped.
async fn count_in_flight(
    gauge: clawos_service::metrics::Gauge,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    struct Leaving(clawos_service::metrics::Gauge);
    impl Drop for Leaving {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    gauge.inc();
    let _leaving = Leaving(gauge);
    next.run(req).await
}
