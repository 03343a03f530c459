//! The VM routes answered with one JSON (or text) body: vm-launcher's own routes,
//! each name checked, each call made through its typed client, its errors passed on
//! (`http::upstream`). The streaming ones are in `vm_streams`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clawos_service::http::ErrorResponse;
use clawos_vm_launcher_api::{
    CONSOLE_OFFSET_HEADER, ConsoleQuery, CreateSnapshot, RestoreVm, StartVm,
};

use crate::http::{ApiResult, AuditTarget, Shared, body, label, upstream};

pub(crate) async fn vm_list(State(app): Shared) -> ApiResult<Response> {
    Ok(Json(app.launcher.list().await.map_err(upstream)?).into_response())
}

pub(crate) async fn vm_start(
    State(app): Shared,
    b: Result<Json<StartVm>, JsonRejection>,
) -> ApiResult<Response> {
    let req = body(b)?;
    label("VM", &req.name)?;
    let name = req.name.clone();
    let vm = app.launcher.start(&req).await.map_err(upstream)?;
    let mut resp = (StatusCode::ACCEPTED, Json(vm)).into_response();
    resp.extensions_mut().insert(AuditTarget(name));
    Ok(resp)
}

pub(crate) async fn vm_get(State(app): Shared, Path(name): Path<String>) -> ApiResult<Response> {
    label("VM", &name)?;
    Ok(Json(app.launcher.get(&name).await.map_err(upstream)?).into_response())
}

pub(crate) async fn vm_stop(State(app): Shared, Path(name): Path<String>) -> ApiResult<Response> {
    label("VM", &name)?;
    Ok(Json(app.launcher.stop(&name).await.map_err(upstream)?).into_response())
}

pub(crate) async fn vm_delete(
    State(app): Shared,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    label("VM", &name)?;
    app.launcher.delete(&name).await.map_err(upstream)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn vm_console(
    State(app): Shared,
    Path(name): Path<String>,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
) -> ApiResult<Response> {
    label("VM", &name)?;
    let Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let (bytes, next) = app
        .launcher
        .console(&name, q.offset)
        .await
        .map_err(upstream)?;
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CONSOLE_OFFSET_HEADER, HeaderValue::from(next));
    Ok(resp)
}

pub(crate) async fn vm_pause(State(app): Shared, Path(name): Path<String>) -> ApiResult<Response> {
    label("VM", &name)?;
    Ok(Json(app.launcher.pause(&name).await.map_err(upstream)?).into_response())
}

pub(crate) async fn vm_resume(State(app): Shared, Path(name): Path<String>) -> ApiResult<Response> {
    label("VM", &name)?;
    Ok(Json(app.launcher.resume(&name).await.map_err(upstream)?).into_response())
}

pub(crate) async fn snapshot_list(
    State(app): Shared,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    label("VM", &name)?;
    Ok(Json(app.launcher.snapshots(&name).await.map_err(upstream)?).into_response())
}

pub(crate) async fn snapshot_create(
    State(app): Shared,
    Path(name): Path<String>,
    b: Result<Json<CreateSnapshot>, JsonRejection>,
) -> ApiResult<Response> {
    label("VM", &name)?;
    let req = body(b)?;
    let snap = app.launcher.snapshot(&name, &req).await.map_err(upstream)?;
    Ok((StatusCode::CREATED, Json(snap)).into_response())
}

pub(crate) async fn snapshot_delete(
    State(app): Shared,
    Path((name, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    label("VM", &name)?;
    label("snapshot", &tag)?;
    app.launcher
        .delete_snapshot(&name, &tag)
        .await
        .map_err(upstream)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn vm_restore(
    State(app): Shared,
    Path(name): Path<String>,
    b: Result<Json<RestoreVm>, JsonRejection>,
) -> ApiResult<Response> {
    label("VM", &name)?;
    let req = body(b)?;
    let vm = app.launcher.restore(&name, &req).await.map_err(upstream)?;
    Ok((StatusCode::ACCEPTED, Json(vm)).into_response())
}

pub(crate) async fn images(State(app): Shared) -> ApiResult<Response> {
    Ok(Json(app.launcher.images().await.map_err(upstream)?).into_response())
}

pub(crate) async fn verify_image(
    State(app): Shared,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    label("image", &name)?;
    Ok(Json(app.launcher.verify_image(&name).await.map_err(upstream)?).into_response())
}
