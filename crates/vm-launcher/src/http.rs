//! The REST API (see `clawos_vm_launcher_api` for the routes and wire types).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clawos_vm_launcher_api::{ApiError, CONSOLE_OFFSET_HEADER, StartVm};

use crate::LauncherError;
use crate::launcher::Launcher;

impl IntoResponse for LauncherError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::ImageRefused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "image_refused"),
            Self::Io { .. } | Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let body = ApiError {
            code: code.into(),
            message: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

type AppState = Arc<Launcher>;

async fn start(
    State(l): State<AppState>,
    body: Result<Json<StartVm>, JsonRejection>,
) -> Result<(StatusCode, Json<clawos_vm_launcher_api::Vm>), LauncherError> {
    let Json(req) =
        body.map_err(|e| LauncherError::Invalid(format!("request body: {}", e.body_text())))?;
    let vm = l.start(req).await?;
    Ok((StatusCode::ACCEPTED, Json(vm)))
}

async fn list(State(l): State<AppState>) -> Json<Vec<clawos_vm_launcher_api::Vm>> {
    Json(l.list())
}

async fn get_vm(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<clawos_vm_launcher_api::Vm>, LauncherError> {
    l.get(&name).map(Json)
}

async fn stop(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<clawos_vm_launcher_api::Vm>, LauncherError> {
    l.stop(&name).await.map(Json)
}

async fn delete(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, LauncherError> {
    l.delete(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
}

async fn console(
    State(l): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, LauncherError> {
    let Query(q) = q.map_err(|e| LauncherError::Invalid(e.body_text()))?;
    let (bytes, next) = l.console(&name, q.offset)?;
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CONSOLE_OFFSET_HEADER, HeaderValue::from(next));
    Ok(resp)
}

async fn metrics(State(l): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        l.metrics_text(),
    )
}

async fn fallback() -> LauncherError {
    LauncherError::NotFound("no such route (see GET /v1/vms)".into())
}

/// The launcher's router.
pub fn router(launcher: Arc<Launcher>) -> Router {
    Router::new()
        .route("/v1/vms", post(start).get(list))
        .route("/v1/vms/{name}", get(get_vm).delete(delete))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/console", get(console))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .with_state(launcher)
}
