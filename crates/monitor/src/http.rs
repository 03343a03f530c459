//! The HTTP API on loopback, mounted from `clawos_monitor_api::routes`: watches, events
//! from the trail, metrics, liveness. `/v1/*` needs the operator credential
//! (`<state>/monitor/admin.token`). Every failure is an [`ApiError`], turned into the
//! one error body (`clawos_api::ErrorBody`) here and nowhere else.

use std::io::BufRead;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use clawos_monitor_api::{EventsQuery, UnwatchQuery, WatchAdded, WatchRequest, routes};
use clawos_service::http::{ErrorResponse, RouterExt, no_such_route, request_id};

use crate::daemon::Monitor;
use crate::event::AuditEvent;
use crate::trail;
use crate::watches::WatchError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No operator credential, or a wrong one.
    #[error("needs the operator credential (<state>/monitor/admin.token)")]
    Unauthorized,
    /// The body or query could not be read.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// Nothing watched the pid or cgroup given.
    #[error("no such watch")]
    NoSuchWatch,
    /// Reading the trail failed.
    #[error("reading the audit trail: {0}")]
    Trail(String),
}

impl From<ApiError> for ErrorResponse {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::Unauthorized => Self::unauthorized(message),
            ApiError::Invalid(_) | ApiError::Watch(WatchError::Invalid(_)) => {
                Self::invalid(message)
            }
            ApiError::NoSuchWatch => Self::not_found(message),
            ApiError::Watch(WatchError::Maps(_)) | ApiError::Trail(_) => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        ErrorResponse::from(self).into_response()
    }
}

type AppState = Arc<Monitor>;

/// The router, with request ids on every answer, behind the `Host`/`Origin`/body-type
/// guard (`clawos_service::guard`) for a daemon listening on `listen`; the operator
/// credential is checked per route ([`Operator`]).
pub(crate) fn router(monitor: AppState, listen: std::net::SocketAddr) -> Router {
    let routes = Router::new()
        .at(routes::WATCH, add_watch)
        .at(routes::UNWATCH, remove_watch)
        .at(routes::WATCHES, list_watches)
        .at(routes::EVENTS, events)
        .at(routes::METRICS, metrics)
        .at(routes::HEALTHZ, || async { "ok\n" })
        .fallback(no_such_route);
    clawos_service::guard::Guard::new()
        .listening_on(listen)
        .protect(routes)
        .layer(axum::middleware::from_fn(request_id))
        .with_state(monitor)
}

/// Proof that the request carries the operator credential; handlers that take it
/// answer 401 without running otherwise.
struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, m: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if clawos_service::bearer_matches(header, &m.token) {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::Invalid(e.body_text()))
}

async fn add_watch(
    State(m): State<AppState>,
    _: Operator,
    body: Result<Json<WatchRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<WatchAdded>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let tag = m.watch(req)?;
    Ok((StatusCode::CREATED, Json(WatchAdded { tag })))
}

async fn remove_watch(
    State(m): State<AppState>,
    _: Operator,
    q: Result<Query<UnwatchQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let q = query(q)?;
    if m.unwatch(q.pid, q.cgroup.as_deref()) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NoSuchWatch)
    }
}

async fn list_watches(State(m): State<AppState>, _: Operator) -> Json<Vec<WatchRequest>> {
    Json(m.watches.list())
}

async fn events(
    State(m): State<AppState>,
    _: Operator,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Vec<AuditEvent>>, ApiError> {
    let q = query(q)?;
    let path = m.jsonl.clone();
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let found = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        // The newest closed segment and the live file (older segments are for the
        // SIEM and for the operator's tools).
        let lines = trail::recent(&path)
            .into_iter()
            .filter_map(|p| std::fs::File::open(p).ok())
            .flat_map(|f| std::io::BufReader::new(f).lines().map_while(Result::ok));
        for line in lines {
            let Ok(e) = serde_json::from_str::<AuditEvent>(&line) else {
                continue;
            };
            if e.seq <= q.after {
                continue;
            }
            if let Some(a) = &q.agent
                && e.agent.as_ref() != Some(a)
            {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                break;
            }
        }
        out
    })
    .await
    .map_err(|e| ApiError::Trail(e.to_string()))?;
    Ok(Json(found))
}

async fn metrics(State(m): State<AppState>) -> Response {
    m.metrics.response()
}
