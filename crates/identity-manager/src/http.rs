//! REST API.
//!
//! | method | path | auth | |
//! |---|---|---|---|
//! | POST | `/v1/tokens` | service | issue ([`IssueRequest`]) → 201 |
//! | POST | `/v1/tokens/renew` | agent token | a fresh token with the same claims |
//! | POST | `/v1/revoke` | service | `{"jti": ..}` or `{"agent": ..}` → 204 |
//! | POST | `/v1/introspect` | service | RFC 7662 (form or JSON `token`) |
//! | GET | `/v1/revocations` | – | revocation feed for verifiers |
//! | GET | `/v1/agents/{agent}/key` | service | the agent's public key |
//! | POST | `/v1/keys/rotate` | service | signing key rotation |
//! | GET | `/.well-known/jwks.json`, `/.well-known/openid-configuration` | – | |

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::json;

use crate::IdentityError;
use crate::identity::{Identity, IssueRequest};

impl IntoResponse for IdentityError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MasterKey(_) | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let mut resp = (
            status,
            Json(json!({ "error": code, "message": self.to_string() })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[derive(Debug)]
struct AppState {
    identity: Arc<Identity>,
    service_token: String,
    issued: std::sync::atomic::AtomicU64,
    renewed: std::sync::atomic::AtomicU64,
    revocations: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    let given = bearer(headers).ok_or_else(|| {
        IdentityError::Unauthorized("missing service credential (Authorization: Bearer)".into())
    })?;
    let (a, b) = (given.as_bytes(), st.service_token.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if !same {
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
) -> Result<Response, IdentityError> {
    require_service(&st, &headers)?;
    let req = json_body(body)?;
    let issued = st.identity.issue(&req)?;
    bump(&st.issued);
    tracing::info!(agent = %req.agent, vm = %req.vm_id, jti = %issued.jti, kid = %issued.kid, "token issued");
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

async fn renew(State(st): S, headers: HeaderMap) -> Result<Response, IdentityError> {
    let token = bearer(&headers).ok_or_else(|| {
        IdentityError::Unauthorized("renew needs the current token (Authorization: Bearer)".into())
    })?;
    let renewed = st.identity.renew(token)?;
    bump(&st.renewed);
    Ok(Json(renewed).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    jti: Option<String>,
    agent: Option<String>,
}

async fn revoke(
    State(st): S,
    headers: HeaderMap,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<StatusCode, IdentityError> {
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
            return Err(IdentityError::Invalid(
                "give exactly one of jti or agent".into(),
            ));
        }
    }
    bump(&st.revocations);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
struct IntrospectRequest {
    token: String,
}

/// RFC 7662: `active: false` and nothing else for any token that does not verify.
async fn introspect(
    State(st): S,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, IdentityError> {
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
    let answer = match st.identity.verify(&req.token, None) {
        Ok(c) => json!({
            "active": true, "token_type": "Bearer", "iss": c.iss, "sub": c.sub, "aud": c.aud,
            "iat": c.iat, "nbf": c.nbf, "exp": c.exp, "jti": c.jti, "scope": c.scopes.join(" "),
            "agent": c.agent, "vm_id": c.vm_id, "image_root_hash": c.image_root_hash,
        }),
        Err(_) => json!({ "active": false }),
    };
    Ok(Json(answer).into_response())
}

async fn revocations(State(st): S) -> Result<Response, IdentityError> {
    Ok(Json(st.identity.revocations()?).into_response())
}

async fn agent_key(
    State(st): S,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> Result<Response, IdentityError> {
    require_service(&st, &headers)?;
    let public = st.identity.known_agent_key(&agent)?;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public);
    Ok(
        Json(json!({ "agent": agent, "jwk": { "kty": "OKP", "crv": "Ed25519", "x": x } }))
            .into_response(),
    )
}

async fn rotate(State(st): S, headers: HeaderMap) -> Result<Response, IdentityError> {
    require_service(&st, &headers)?;
    let kid = st.identity.rotate_signing_keys()?;
    Ok(Json(json!({ "active_kid": kid })).into_response())
}

async fn jwks(State(st): S) -> Result<Response, IdentityError> {
    let mut resp = Json(st.identity.jwks()?).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_str(&format!("max-age={}", crate::identity::JWKS_CACHE_SECS))
            .unwrap_or(header::HeaderValue::from_static("max-age=600")),
    );
    Ok(resp)
}

async fn discovery(State(st): S) -> Response {
    let iss = st.identity.config.issuer.trim_end_matches('/').to_owned();
    Json(json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "introspection_endpoint": format!("{iss}/v1/introspect"),
        "revocation_endpoint": format!("{iss}/v1/revoke"),
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "token_endpoint_auth_methods_supported": ["client_secret_bearer"],
        "subject_types_supported": ["public"],
        "response_types_supported": ["token"],
        "claims_supported": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "agent", "vm_id", "image_root_hash", "scopes"],
    }))
    .into_response()
}

async fn metrics(State(st): S) -> Response {
    let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let out = clawos_service::render_counters(&[
        (
            "clawos_identity_tokens_issued_total",
            "Tokens issued.",
            g(&st.issued),
        ),
        (
            "clawos_identity_tokens_renewed_total",
            "Tokens renewed.",
            g(&st.renewed),
        ),
        (
            "clawos_identity_revocations_total",
            "Revocations (by jti or agent).",
            g(&st.revocations),
        ),
        (
            "clawos_identity_service_auth_refused_total",
            "Requests refused for a missing or wrong service credential.",
            g(&st.refused),
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn fallback() -> IdentityError {
    IdentityError::NotFound("no such route".into())
}

/// The router.
pub fn router(identity: Arc<Identity>, service_token: String) -> Router {
    let st = Arc::new(AppState {
        identity,
        service_token,
        issued: Default::default(),
        renewed: Default::default(),
        revocations: Default::default(),
        refused: Default::default(),
    });
    Router::new()
        .route("/v1/tokens", post(issue))
        .route("/v1/tokens/renew", post(renew))
        .route("/v1/revoke", post(revoke))
        .route("/v1/introspect", post(introspect))
        .route("/v1/revocations", get(revocations))
        .route("/v1/agents/{agent}/key", get(agent_key))
        .route("/v1/keys/rotate", post(rotate))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .with_state(st)
}
