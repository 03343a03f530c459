//! The agent API of a running VM, reached through the launcher: each request is passed
//! to the VM's agent runtime (guest port 18789, over the VM's vsock) and its answer,
//! streamed or not, is passed back unchanged. The orchestrator, the control plane and
//! `clawos agent` all drive every runtime this one way.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use clawos_agentd_api::{SESSION_HEADER, TOOL_EVENTS_HEADER};
use clawos_guest_protocol::frames::GATEWAY_PORT;
use clawos_service::http::ErrorResponse;

use crate::LauncherError;
use crate::http::AppState;

/// Largest request the launcher passes on (the runtime's own limit).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Why the agent could not be asked.
fn unreachable(vm: &str, detail: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(
        StatusCode::BAD_GATEWAY,
        clawos_api::code::UNAVAILABLE,
        format!(
            "the agent runtime of VM {vm} did not answer on guest port {GATEWAY_PORT}: {detail}"
        ),
    )
}

/// Sends one request to the VM's runtime and gives back its response as it streams.
async fn pass(
    l: &AppState,
    vm: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ErrorResponse> {
    let guest = l.guest(vm, "talk to the agent of")?;
    let (reader, writer) = guest
        .connect(GATEWAY_PORT)
        .await
        .map_err(|e| unreachable(vm, e))?;
    let io = hyper_util::rt::TokioIo::new(tokio::io::join(reader, writer));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(vm, e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "127.0.0.1")
        .header(header::CONTENT_TYPE, "application/json");
    for name in [SESSION_HEADER, TOOL_EVENTS_HEADER] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    let req = req
        .body(http_body_util::Full::new(body))
        .map_err(|e| ErrorResponse::internal(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(vm, e))?;
    let (parts, incoming) = resp.into_parts();
    let mut out = Response::new(Body::new(incoming));
    *out.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(v) = parts.headers.get(SESSION_HEADER) {
        out.headers_mut().insert(SESSION_HEADER, v.clone());
    }
    out.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(out)
}

/// `POST /v1/vms/{name}/agent/chat/completions`.
pub async fn chat(
    State(l): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ErrorResponse> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(LauncherError::Invalid(format!(
            "agent request of {} bytes is over the {MAX_REQUEST_BYTES}-byte limit",
            body.len()
        ))
        .into());
    }
    pass(
        &l,
        &name,
        Method::POST,
        clawos_agentd_api::CHAT_COMPLETIONS_PATH,
        &headers,
        body,
    )
    .await
}

/// `GET /v1/vms/{name}/agent/sessions`.
pub async fn sessions(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ErrorResponse> {
    pass(
        &l,
        &name,
        Method::GET,
        clawos_agentd_api::SESSIONS_PATH,
        &HeaderMap::new(),
        axum::body::Bytes::new(),
    )
    .await
}
