//! The REST API: the routes of `clawos_vm_launcher_api::routes`, served by the
//! [`Launcher`] behind one [`guard`] (operator credential on every route but
//! `/healthz` and `/metrics`, WebSocket upgrades included; loopback `Host`; no foreign
//! `Origin`; JSON bodies, octet-stream uploads). Every error leaves through
//! `impl From<LauncherError> for ErrorResponse`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use clawos_guest_protocol::frames::{CHUNK, ExecRequest, Kind, Op, Reply};
use clawos_service::guard::Guard;
use clawos_service::http::{ErrorResponse, RouterExt};
use clawos_vm_launcher_api::{
    CONSOLE_OFFSET_HEADER, ConsoleQuery, CreateSnapshot, ExecEvent, ExecStart, FileEntry,
    FileQuery, RestoreVm, STDERR, STDOUT, Snapshot, StartVm, UPLOAD_CONTENT_TYPE, routes,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::LauncherError;
use crate::launcher::Launcher;
use crate::vsock::VsockError;

/// The one place a domain error becomes an HTTP status and error code.
impl From<LauncherError> for ErrorResponse {
    fn from(e: LauncherError) -> Self {
        match e {
            LauncherError::Invalid(m) => Self::invalid(m),
            LauncherError::NotFound(m) => Self::not_found(m),
            LauncherError::Conflict(m) => {
                Self::new(StatusCode::CONFLICT, clawos_api::code::CONFLICT, m)
            }
            LauncherError::ImageRefused { code, message } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
            }
            e @ (LauncherError::Io { .. } | LauncherError::Internal(_)) => {
                Self::internal(e.to_string())
            }
        }
    }
}

impl IntoResponse for LauncherError {
    fn into_response(self) -> Response {
        ErrorResponse::from(self).into_response()
    }
}

pub(crate) type AppState = Arc<Launcher>;

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

async fn console(
    State(l): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
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

async fn metrics(State(l): State<AppState>) -> Response {
    l.metrics_response()
}

async fn fallback() -> LauncherError {
    LauncherError::NotFound("no such route (see GET /v1/vms)".into())
}

/// Who may call the launcher's API, and from where: the operator credential `token`
/// on every route but `/healthz` and `/metrics` (aggregate counts only, as the other
/// daemons' metrics, so a scraper needs no credential); loopback `Host` names; no
/// `Origin` but `cfg.allowed_origins`; JSON bodies, and octet-stream uploads.
pub fn guard(cfg: &crate::Config, token: &str) -> Guard {
    Guard::new()
        .bearer(token, &cfg.token_path.display().to_string())
        .open_path(routes::HEALTHZ.path)
        .open_path(routes::METRICS.path)
        .allow_origins(&cfg.allowed_origins)
        .body_type(axum::http::Method::PUT, UPLOAD_CONTENT_TYPE)
}

/// The launcher's router: every route, its fallback included, behind `guard`.
pub fn router(launcher: Arc<Launcher>, guard: &Guard) -> Router {
    let routes = Router::new()
        .at(routes::START, start)
        .at(routes::LIST, list)
        .at(routes::GET, get_vm)
        .at(routes::DELETE, delete)
        .at(routes::STOP, stop)
        .at(routes::CONSOLE, console)
        .at(routes::PAUSE, pause)
        .at(routes::RESUME, resume)
        .at(routes::CREATE_SNAPSHOT, create_snapshot)
        .at(routes::LIST_SNAPSHOTS, list_snapshots)
        .at(routes::DELETE_SNAPSHOT, delete_snapshot)
        .at(routes::RESTORE, restore)
        .at(routes::EXEC, exec)
        .at(routes::GATEWAY, gateway)
        .at(routes::GET_FILE, get_file)
        .at(routes::PUT_FILE, put_file)
        .at(routes::AGENT_CHAT, crate::agent::chat)
        .at(routes::AGENT_SESSIONS, crate::agent::sessions)
        .at(routes::IMAGES, images)
        .at(routes::VERIFY_IMAGE, verify_image)
        .at(routes::HEALTHZ, || async { "ok\n" })
        .at(routes::METRICS, metrics)
        .fallback(fallback)
        .with_state(launcher);
    guard
        .protect(routes)
        .layer(axum::middleware::from_fn(clawos_service::http::request_id))
}

async fn images(
    State(l): State<AppState>,
) -> Result<Json<Vec<clawos_vm_launcher_api::ImageInfo>>, LauncherError> {
    l.images().await.map(Json)
}

async fn verify_image(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<clawos_vm_launcher_api::ImageInfo>, LauncherError> {
    l.check_image(&name).await.map(Json)
}

async fn pause(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<clawos_vm_launcher_api::Vm>, LauncherError> {
    l.pause(&name).await.map(Json)
}

async fn resume(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<clawos_vm_launcher_api::Vm>, LauncherError> {
    l.resume(&name).await.map(Json)
}

async fn create_snapshot(
    State(l): State<AppState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Snapshot>), LauncherError> {
    // The body is optional: no body takes a time-stamped tag.
    let req: CreateSnapshot = if body.iter().all(u8::is_ascii_whitespace) {
        CreateSnapshot::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| LauncherError::Invalid(format!("request body: {e}")))?
    };
    let snap = l.snapshot(&name, req.tag.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(snap)))
}

async fn list_snapshots(
    State(l): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Snapshot>>, LauncherError> {
    l.snapshots(&name).map(Json)
}

async fn delete_snapshot(
    State(l): State<AppState>,
    Path((name, tag)): Path<(String, String)>,
) -> Result<StatusCode, LauncherError> {
    l.delete_snapshot(&name, &tag)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restore(
    State(l): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<RestoreVm>, JsonRejection>,
) -> Result<(StatusCode, Json<clawos_vm_launcher_api::Vm>), LauncherError> {
    let Json(req) =
        body.map_err(|e| LauncherError::Invalid(format!("request body: {}", e.body_text())))?;
    let vm = l.restore(&name, &req.snapshot).await?;
    Ok((StatusCode::ACCEPTED, Json(vm)))
}

/// A guest refusal (bad path, missing file) is the client's problem: 400 with the
/// guest's words. A broken channel is ours: 502.
fn guest_error(e: VsockError) -> LauncherError {
    match e {
        VsockError::Guest(m) => LauncherError::Invalid(m),
        other => LauncherError::Internal(other.to_string()),
    }
}

/// How much of a refused upload is still read (and dropped) before the refusal is
/// answered: a client still sending when the connection closes sees a broken pipe, not
/// the refusal. Past either bound the connection just closes.
const DRAIN_MAX_BYTES: u64 = 16 << 30;
const DRAIN_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(60);

async fn put_file(
    State(l): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, LauncherError> {
    let mut body = body.into_data_stream();
    let result = upload(&l, &name, q, &headers, &mut body).await;
    if result.is_err() {
        drain(&mut body).await;
    }
    result
}

/// Reads what is left of a request body, within [`DRAIN_MAX_BYTES`] and
/// [`DRAIN_MAX_TIME`].
async fn drain(body: &mut axum::body::BodyDataStream) {
    let deadline = tokio::time::Instant::now() + DRAIN_MAX_TIME;
    let mut read = 0u64;
    while read < DRAIN_MAX_BYTES {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => read += chunk.len() as u64,
            _ => return,
        }
    }
}

/// The guest's answer to an upload as the route's answer.
fn upload_outcome(
    frame: std::io::Result<Option<(Kind, Vec<u8>)>>,
) -> Result<StatusCode, LauncherError> {
    let (kind, payload) = match frame {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(guest_error(VsockError::Protocol(
                "guest closed the connection".into(),
            )));
        }
        Err(e) => return Err(guest_error(e.into())),
    };
    match crate::vsock::parse_reply(kind, &payload).map_err(guest_error)? {
        Reply::Ok => Ok(StatusCode::NO_CONTENT),
        other => Err(LauncherError::Internal(format!(
            "unexpected guest reply {other:?}"
        ))),
    }
}

/// Streams the body to the guest. The guest's answer is read while the body is sent,
/// so a refusal (a path out of `/workspace`, a full disk) ends the upload at once.
async fn upload(
    l: &Launcher,
    name: &str,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: &axum::http::HeaderMap,
    body: &mut axum::body::BodyDataStream,
) -> Result<StatusCode, LauncherError> {
    let Query(q) = q.map_err(|e| LauncherError::Invalid(e.body_text()))?;
    let size: u64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| LauncherError::Invalid("upload needs a Content-Length".into()))?;
    let guest = l.guest(name, "copy files to")?;
    let crate::vsock::Call {
        mut reader,
        mut writer,
    } = guest
        .call(Op::Put {
            path: q.path.clone(),
            size,
            mode: None,
        })
        .await
        .map_err(guest_error)?;
    // Polled until it completes or the upload is abandoned, never cancelled halfway.
    let reply = crate::vsock::read_frame(&mut reader);
    tokio::pin!(reply);
    let mut sent = 0u64;
    loop {
        tokio::select! {
            biased;
            early = &mut reply => {
                return match upload_outcome(early) {
                    Ok(_) => Err(LauncherError::Internal(
                        "guest answered before the upload ended".into(),
                    )),
                    Err(e) => Err(e),
                };
            }
            chunk = body.next() => match chunk {
                None => break,
                Some(Err(e)) => {
                    // Dropping the connection makes the guest discard what it got.
                    return Err(LauncherError::Invalid(format!("upload body: {e}")));
                }
                Some(Ok(chunk)) => {
                    sent += chunk.len() as u64;
                    for part in chunk.chunks(CHUNK) {
                        let frame = clawos_guest_protocol::frames::encode(Kind::Data, part);
                        if writer.write_all(&frame).await.is_err() {
                            // The guest refused and closed; its answer says why.
                            return upload_outcome(reply.await);
                        }
                    }
                }
            }
        }
    }
    if sent != size {
        return Err(LauncherError::Invalid(format!(
            "upload body had {sent} bytes, Content-Length said {size}"
        )));
    }
    // If the guest closed instead, its answer says why.
    let end = clawos_guest_protocol::frames::encode(Kind::End, &[]);
    let _ = writer.write_all(&end).await;
    upload_outcome(reply.await)
}

async fn get_file(
    State(l): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, LauncherError> {
    let Query(q) = q.map_err(|e| LauncherError::Invalid(e.body_text()))?;
    let guest = l.guest(&name, "copy files from")?;
    if q.list {
        let mut call = guest
            .call(Op::List { path: q.path })
            .await
            .map_err(guest_error)?;
        return match call.reply().await.map_err(guest_error)? {
            Reply::Entries { entries } => Ok(Json(
                entries
                    .into_iter()
                    .map(|e| FileEntry {
                        name: e.name,
                        kind: e.kind,
                        size: e.size,
                    })
                    .collect::<Vec<_>>(),
            )
            .into_response()),
            other => Err(LauncherError::Internal(format!(
                "unexpected guest reply {other:?}"
            ))),
        };
    }
    let mut call = guest
        .call(Op::Get { path: q.path })
        .await
        .map_err(guest_error)?;
    let size = match call.reply().await.map_err(guest_error)? {
        Reply::Size { size } => size,
        other => {
            return Err(LauncherError::Internal(format!(
                "unexpected guest reply {other:?}"
            )));
        }
    };
    // The write half travels with the stream: closing it would end the vsock
    // connection before the guest has sent the file.
    let stream = futures_util::stream::unfold(Some(call), |call| async move {
        let mut call = call?;
        match crate::vsock::read_frame(&mut call.reader).await {
            Ok(Some((Kind::Data, data))) => Some((Ok(axum::body::Bytes::from(data)), Some(call))),
            Ok(Some((Kind::End, _))) => None,
            Ok(_) => Some((
                Err(std::io::Error::other("unexpected frame from guest")),
                None,
            )),
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}

async fn exec(
    State(l): State<AppState>,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, LauncherError> {
    // State and channel are checked before the upgrade, so refusals are plain HTTP.
    let guest = l.guest(&name, "exec in")?;
    Ok(ws.on_upgrade(move |socket| exec_session(socket, guest)))
}

async fn send_event<S>(socket: &mut S, ev: &ExecEvent)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let text = serde_json::to_string(ev).unwrap_or_default();
    let _ = socket.send(Message::Text(text.into())).await;
}

async fn exec_session(mut socket: WebSocket, guest: crate::vsock::GuestClient) {
    let start: ExecStart = match socket.recv().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
            Ok(s) => s,
            Err(e) => {
                return send_event(
                    &mut socket,
                    &ExecEvent::Error {
                        message: format!("bad exec request: {e}"),
                    },
                )
                .await;
            }
        },
        _ => {
            return send_event(
                &mut socket,
                &ExecEvent::Error {
                    message: "expected an exec request first".into(),
                },
            )
            .await;
        }
    };
    if start.argv.is_empty() {
        return send_event(
            &mut socket,
            &ExecEvent::Error {
                message: "exec: empty command".into(),
            },
        )
        .await;
    }
    let req = ExecRequest {
        argv: start.argv,
        env: start.env,
        cwd: start.cwd,
        stdin: start.stdin,
        timeout_ms: start.timeout_ms,
    };
    let mut call = match guest.call(Op::Exec(req)).await {
        Ok(c) => c,
        Err(e) => {
            return send_event(
                &mut socket,
                &ExecEvent::Error {
                    message: e.to_string(),
                },
            )
            .await;
        }
    };
    match call.reply().await {
        Ok(Reply::Started { .. }) => {}
        Ok(other) => {
            return send_event(
                &mut socket,
                &ExecEvent::Error {
                    message: format!("unexpected guest reply {other:?}"),
                },
            )
            .await;
        }
        Err(e) => {
            return send_event(
                &mut socket,
                &ExecEvent::Error {
                    message: e.to_string(),
                },
            )
            .await;
        }
    }
    // Guest frames are read by their own task (a frame read is not cancel safe), and
    // the client's stdin is written to the guest by another: a guest command blocked
    // writing its output (`cat` fed more than the buffers between hold) reads no more
    // input until its output is read, so writing input must never hold up reading
    // output, or both ends wait for each other for good.
    let (tx, mut frames) = tokio::sync::mpsc::channel(16);
    let mut reader = call.reader;
    tokio::spawn(async move {
        loop {
            let f = crate::vsock::read_frame(&mut reader).await;
            let done = !matches!(f, Ok(Some((Kind::Stdout | Kind::Stderr, _))));
            if tx.send(f).await.is_err() || done {
                return;
            }
        }
    });
    let (mut socket, mut client) = socket.split();
    let mut writer = call.writer;
    // Ends when the client has gone (its side of the WebSocket closed or broke).
    let mut stdin = AbortOnDrop(tokio::spawn(async move {
        while let Some(m) = client.next().await {
            match m {
                Ok(Message::Binary(b)) => {
                    for part in b.chunks(CHUNK) {
                        if writer
                            .write_all(&clawos_guest_protocol::frames::encode(Kind::Stdin, part))
                            .await
                            .is_err()
                        {
                            // The guest connection broke: its reader reports that.
                            std::future::pending::<()>().await;
                        }
                    }
                }
                Ok(Message::Text(t)) if t.contains("\"eof\"") => {
                    let _ = writer
                        .write_all(&clawos_guest_protocol::frames::encode(Kind::End, &[]))
                        .await;
                }
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }));
    loop {
        tokio::select! {
            f = frames.recv() => match f {
                Some(Ok(Some((kind @ (Kind::Stdout | Kind::Stderr), data)))) => {
                    let mut msg = Vec::with_capacity(data.len() + 1);
                    msg.push(if kind == Kind::Stdout { STDOUT } else { STDERR });
                    msg.extend_from_slice(&data);
                    if socket.send(Message::Binary(msg.into())).await.is_err() {
                        return; // client gone: dropping the guest connection kills the command
                    }
                }
                Some(Ok(Some((k, p)))) => {
                    let ev = match crate::vsock::parse_reply(k, &p) {
                        Ok(Reply::Exit { code, signal, timed_out }) => ExecEvent::Exit { code, signal, timed_out },
                        Ok(other) => ExecEvent::Error { message: format!("unexpected guest reply {other:?}") },
                        Err(e) => ExecEvent::Error { message: e.to_string() },
                    };
                    send_event(&mut socket, &ev).await;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Some(Ok(None)) | None => {
                    return send_event(&mut socket, &ExecEvent::Error { message: "guest closed the exec connection".into() }).await;
                }
                Some(Err(e)) => {
                    return send_event(&mut socket, &ExecEvent::Error { message: format!("guest connection: {e}") }).await;
                }
            },
            // Client gone: returning drops the guest connection (the stdin task is
            // aborted with it), which kills the command.
            _ = &mut stdin.0 => return,
        }
    }
}

/// Aborts a task when dropped (a session's helper task ends with the session).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A TCP tunnel to the agent gateway (guest port 18789), one WebSocket per connection:
/// binary messages carry the bytes both ways. `clawos vm port-forward` listens locally
/// and opens one of these per accepted connection.
async fn gateway(
    State(l): State<AppState>,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, LauncherError> {
    let guest = l.guest(&name, "reach the gateway of")?;
    let (reader, writer) = guest
        .connect(clawos_guest_protocol::frames::GATEWAY_PORT)
        .await
        .map_err(|e| LauncherError::Internal(e.to_string()))?;
    Ok(ws.on_upgrade(move |socket| tunnel(socket, reader, writer)))
}

async fn tunnel(
    socket: WebSocket,
    mut reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    mut writer: tokio::net::unix::OwnedWriteHalf,
) {
    use tokio::io::AsyncReadExt;
    let (mut socket, mut client) = socket.split();
    // Each direction on its own: a guest slow to read what the client sends must not
    // stop what it sends from being read (see `exec_session`).
    let mut upstream = AbortOnDrop(tokio::spawn(async move {
        while let Some(m) = client.next().await {
            match m {
                Ok(Message::Binary(b)) => {
                    if writer.write_all(&b).await.is_err() {
                        return;
                    }
                }
                // A half close through vhost-device-vsock ends the whole vsock
                // connection, so the tunnel ends with the client.
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }));
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            n = reader.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Ok(n) => {
                    if socket.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            },
            _ = &mut upstream.0 => return,
        }
    }
}

#[cfg(test)]
mod tests;
