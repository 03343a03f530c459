//! The VM routes that are streams rather than one JSON answer: exec and the agent
//! gateway (WebSockets relayed frame by frame to vm-launcher's own), and the agent's
//! chat completions (the request passed on, the answer — JSON or server-sent events —
//! streamed back as the launcher gives it).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message as ClientMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use clawos_api::{Route, code};
use clawos_service::http::ErrorResponse;
use clawos_vm_launcher_api::routes as vm;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message as UpMessage};

use crate::http::{Shared, label, upstream};

type ApiResult = Result<Response, ErrorResponse>;

pub(crate) async fn exec(
    State(app): Shared,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult {
    relay(&app, vm::EXEC, &name, ws).await
}

pub(crate) async fn gateway(
    State(app): Shared,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult {
    relay(&app, vm::GATEWAY, &name, ws).await
}

/// Opens the launcher's WebSocket first, so a refusal there (no such VM, not running)
/// is answered as the launcher's error instead of an upgrade that closes at once.
async fn relay(
    app: &crate::http::App,
    route: Route,
    name: &str,
    ws: WebSocketUpgrade,
) -> ApiResult {
    label("VM", name)?;
    let up = match app.launcher.ws_connect(route, name).await {
        Ok(up) => up,
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().unwrap_or_default();
            return Err(upstream(clawos_api::decode_error(
                status,
                body,
                String::new(),
            )));
        }
        Err(e) => {
            return Err(ErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::UNAVAILABLE,
                format!("vm-launcher's WebSocket cannot be opened: {e}"),
            ));
        }
    };
    Ok(ws.on_upgrade(move |client| pump(client, up)))
}

/// Copies frames both ways until either side closes.
async fn pump(client: WebSocket, up: clawos_vm_launcher_api::WebSocket) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = up.split();
    let to_launcher = async {
        while let Some(Ok(m)) = client_rx.next().await {
            let (m, last) = match m {
                ClientMessage::Text(t) => (UpMessage::Text(t.as_str().into()), false),
                ClientMessage::Binary(b) => (UpMessage::Binary(b), false),
                ClientMessage::Ping(p) => (UpMessage::Ping(p), false),
                ClientMessage::Pong(p) => (UpMessage::Pong(p), false),
                ClientMessage::Close(_) => (UpMessage::Close(None), true),
            };
            if up_tx.send(m).await.is_err() || last {
                break;
            }
        }
        let _ = up_tx.close().await;
    };
    let to_client = async {
        while let Some(Ok(m)) = up_rx.next().await {
            let (m, last) = match m {
                UpMessage::Text(t) => (ClientMessage::Text(t.as_str().into()), false),
                UpMessage::Binary(b) => (ClientMessage::Binary(b), false),
                UpMessage::Ping(p) => (ClientMessage::Ping(p), false),
                UpMessage::Pong(p) => (ClientMessage::Pong(p), false),
                UpMessage::Close(_) => (ClientMessage::Close(None), true),
                UpMessage::Frame(_) => continue,
            };
            if client_tx.send(m).await.is_err() || last {
                break;
            }
        }
        let _ = client_tx.close().await;
    };
    // The exec protocol ends with the launcher's last text frame then a close; the
    // gateway tunnel ends when either direction does.
    tokio::select! {
        () = to_launcher => {}
        () = to_client => {}
    }
}

/// Headers of the launcher's chat answer passed on to the client.
const PASSED_HEADERS: [&str; 3] = [
    "content-type",
    "cache-control",
    clawos_agentd_api::SESSION_HEADER,
];

pub(crate) async fn agent_chat(
    State(app): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    label("VM", &name)?;
    let resp = app
        .launcher
        .agent_chat_raw(&name, body)
        .await
        .map_err(upstream)?;
    let mut out = Response::builder().status(resp.status().as_u16());
    for h in PASSED_HEADERS {
        if let Some(v) = resp.headers().get(h) {
            out = out.header(HeaderName::from_static(h), v.as_bytes());
        }
    }
    out.body(Body::from_stream(resp.bytes_stream()))
        .map_err(|e| ErrorResponse::internal(format!("agent answer: {e}")))
}

pub(crate) async fn agent_sessions(State(app): Shared, Path(name): Path<String>) -> ApiResult {
    label("VM", &name)?;
    let list = app.launcher.agent_sessions(&name).await.map_err(upstream)?;
    Ok(Json(list).into_response())
}
