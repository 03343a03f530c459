//! The VM routes that are streams rather than one JSON answer: exec and the agent
//! gateway (WebSockets relayed frame by frame to vm-launcher's own), the agent's
//! chat completions (the request passed on, the answer — JSON or server-sent events —
//! streamed back as the launcher gives it), and file copies in and out of a VM's
//! workspace (bodies streamed through, never held whole).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message as ClientMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use clawos_api::{Route, code};
use clawos_service::http::ErrorResponse;
use clawos_vm_launcher_api::{FileQuery, routes as vm};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message as UpMessage};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Extension;

use crate::http::{App, AuditTarget, SessionKey, Shared, label, upstream};
use crate::operators::Operator;

type ApiResult = Result<Response, ErrorResponse>;

/// A relayed stream ends when nothing crosses it for this long,
pub const STREAM_IDLE: Duration = Duration::from_secs(600);
/// or this long after it opened,
pub const STREAM_MAX: Duration = Duration::from_secs(12 * 3600);
/// and within this of its operator's token being revoked or session ended.
pub const STREAM_RECHECK: Duration = Duration::from_secs(5);
/// Longest an agent task's answer may stream through the control plane.
pub const CHAT_MAX: Duration = Duration::from_secs(3600);
/// A file copy whose sender sends nothing for this long is abandoned (the guest keeps
/// nothing of it).
pub const FILE_IDLE: Duration = Duration::from_secs(60);

/// Who opened a stream, to ask again while it runs.
struct Holder {
    app: Arc<App>,
    op: Operator,
    session: Option<String>,
}

fn holder(
    app: &Arc<App>,
    op: Option<Extension<Operator>>,
    session: Option<Extension<SessionKey>>,
) -> Result<Holder, ErrorResponse> {
    let Extension(op) =
        op.ok_or_else(|| ErrorResponse::internal("no authenticated operator on a stream"))?;
    Ok(Holder {
        app: Arc::clone(app),
        op,
        session: session.map(|Extension(SessionKey(k))| k),
    })
}

pub(crate) async fn exec(
    State(app): Shared,
    Path(name): Path<String>,
    op: Option<Extension<Operator>>,
    session: Option<Extension<SessionKey>>,
    ws: WebSocketUpgrade,
) -> ApiResult {
    let h = holder(&app, op, session)?;
    relay(h, vm::EXEC, &name, ws).await
}

pub(crate) async fn gateway(
    State(app): Shared,
    Path(name): Path<String>,
    op: Option<Extension<Operator>>,
    session: Option<Extension<SessionKey>>,
    ws: WebSocketUpgrade,
) -> ApiResult {
    let h = holder(&app, op, session)?;
    relay(h, vm::GATEWAY, &name, ws).await
}

/// Opens the launcher's WebSocket first, so a refusal there (no such VM, not running)
/// is answered as the launcher's error instead of an upgrade that closes at once.
async fn relay(h: Holder, route: Route, name: &str, ws: WebSocketUpgrade) -> ApiResult {
    label("VM", name)?;
    let up = match h.app.launcher.ws_connect(route, name).await {
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
    Ok(ws.on_upgrade(move |client| pump(client, up, h)))
}

/// Copies frames both ways until either side closes.
async fn pump(client: WebSocket, up: clawos_vm_launcher_api::WebSocket, h: Holder) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = up.split();
    let opened = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(opened.elapsed().as_secs(), Ordering::Relaxed);
    let watchdog = async {
        let mut tick = tokio::time::interval(STREAM_RECHECK);
        loop {
            tick.tick().await;
            let idle = opened
                .elapsed()
                .as_secs()
                .saturating_sub(last.load(Ordering::Relaxed));
            let why = if !h.app.still_allowed(&h.op, h.session.as_deref()) {
                "its operator's credential was revoked or the session ended"
            } else if idle >= STREAM_IDLE.as_secs() {
                "idle"
            } else if opened.elapsed() >= STREAM_MAX {
                "open for the longest a stream may be"
            } else {
                continue;
            };
            tracing::info!(
                operator = h.op.name,
                reason = why,
                "closing a relayed stream"
            );
            return;
        }
    };
    let to_launcher = async {
        while let Some(Ok(m)) = client_rx.next().await {
            touch();
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
            touch();
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
        () = watchdog => {}
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
    // A task's answer streams for at most CHAT_MAX, then the stream ends.
    let body = resp.bytes_stream().take_until(tokio::time::sleep(CHAT_MAX));
    out.body(Body::from_stream(body))
        .map_err(|e| ErrorResponse::internal(format!("agent answer: {e}")))
}

pub(crate) async fn agent_sessions(State(app): Shared, Path(name): Path<String>) -> ApiResult {
    label("VM", &name)?;
    let list = app.launcher.agent_sessions(&name).await.map_err(upstream)?;
    Ok(Json(list).into_response())
}

/// When a file copy asks again whether its operator may still act: every
/// [`STREAM_RECHECK`], not at every chunk (the answer may need the operator store).
#[derive(Debug)]
struct Recheck(std::sync::Mutex<Instant>);

impl Default for Recheck {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Instant::now()))
    }
}

impl Recheck {
    /// Whether a check is due now (and if so, the next one counts from now).
    fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < STREAM_RECHECK {
            return false;
        }
        *last = Instant::now();
        true
    }
}

/// Why the client's side of a relayed file ended early, for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SenderFailure {
    /// Nothing came for [`FILE_IDLE`].
    Idle,
    /// The body broke off (the client reset or closed early).
    Broken,
    /// The operator's token was revoked or session ended meanwhile.
    AccessEnded,
}

impl SenderFailure {
    fn answer(self) -> ErrorResponse {
        match self {
            Self::Idle => ErrorResponse::new(
                StatusCode::REQUEST_TIMEOUT,
                code::INVALID_REQUEST,
                format!(
                    "no upload data for {}s: the copy was abandoned (the VM keeps nothing of it)",
                    FILE_IDLE.as_secs()
                ),
            ),
            Self::Broken => ErrorResponse::invalid(
                "the upload body broke off before its Content-Length: the VM keeps nothing of it",
            ),
            Self::AccessEnded => ErrorResponse::unauthorized(
                "the operator's access ended during the copy (token revoked or session ended)",
            ),
        }
    }
}

/// The client's upload as the body relayed on: each chunk within `idle`, `allowed`
/// asked before each; the first failure ends the stream and is kept in `failed`.
pub(crate) fn relayed_upload(
    body: Body,
    idle: Duration,
    allowed: impl Fn() -> bool + Send + 'static,
    failed: Arc<std::sync::Mutex<Option<SenderFailure>>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(body.into_data_stream()), move |s| {
        let failed = Arc::clone(&failed);
        let ok = allowed();
        async move {
            let mut s = s?;
            let fail = |why: SenderFailure| {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                Some((Err(std::io::Error::other(format!("{why:?}"))), None))
            };
            if !ok {
                return fail(SenderFailure::AccessEnded);
            }
            match tokio::time::timeout(idle, s.next()).await {
                Ok(Some(Ok(b))) => Some((Ok(b), Some(s))),
                Ok(Some(Err(_))) => fail(SenderFailure::Broken),
                Ok(None) => None,
                Err(_) => fail(SenderFailure::Idle),
            }
        }
    })
}

/// `PUT …/files?path=`: the body streamed on to the launcher as it arrives, its
/// Content-Length checked there (a body of another length is refused and discarded).
/// A sender that goes quiet for [`FILE_IDLE`], breaks off, or whose access ends
/// meanwhile ends the copy, and the answer says which.
pub(crate) async fn put_file(
    State(app): Shared,
    Path(name): Path<String>,
    op: Option<Extension<Operator>>,
    session: Option<Extension<SessionKey>>,
    q: Result<axum::extract::Query<FileQuery>, axum::extract::rejection::QueryRejection>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult {
    label("VM", &name)?;
    let h = holder(&app, op, session)?;
    let axum::extract::Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let len: u64 = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ErrorResponse::invalid("a file upload needs a Content-Length"))?;
    let failed = Arc::new(std::sync::Mutex::new(None));
    let Holder { app, op, session } = h;
    let checker = Arc::clone(&app);
    let due = Recheck::default();
    let chunks = relayed_upload(
        body,
        FILE_IDLE,
        move || !due.due() || checker.still_allowed(&op, session.as_deref()),
        Arc::clone(&failed),
    );
    let sent = app
        .launcher
        .upload(&name, &q.path, len, reqwest::Body::wrap_stream(chunks))
        .await;
    if let Some(why) = *failed.lock().unwrap_or_else(|p| p.into_inner()) {
        return Err(why.answer());
    }
    sent.map_err(upstream)?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut()
        .insert(AuditTarget(format!("{name}:{}", q.path)));
    Ok(resp)
}

/// `GET …/files?path=[&list=true]`: a file streamed back as the launcher sends it, or
/// a directory's entries.
pub(crate) async fn get_file(
    State(app): Shared,
    Path(name): Path<String>,
    op: Option<Extension<Operator>>,
    session: Option<Extension<SessionKey>>,
    q: Result<axum::extract::Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    label("VM", &name)?;
    let h = holder(&app, op, session)?;
    let axum::extract::Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let target = AuditTarget(format!("{name}:{}", q.path));
    if q.list {
        let entries = app
            .launcher
            .list_files(&name, &q.path)
            .await
            .map_err(upstream)?;
        let mut resp = Json(entries).into_response();
        resp.extensions_mut().insert(target);
        return Ok(resp);
    }
    let download = app
        .launcher
        .download(&name, &q.path)
        .await
        .map_err(upstream)?;
    let size = download.size();
    // A download whose operator's access ends is cut short (the client sees fewer
    // bytes than the Content-Length: an error, not a file).
    let chunks = futures_util::stream::unfold(
        Some((download, h, Recheck::default())),
        |state| async move {
            let (mut d, h, due) = state?;
            if due.due() && !h.app.still_allowed(&h.op, h.session.as_deref()) {
                return Some((
                    Err(std::io::Error::other("the operator's access ended")),
                    None,
                ));
            }
            match d.chunk().await {
                Ok(Some(bytes)) => Some((Ok(Bytes::from(bytes)), Some((d, h, due)))),
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        },
    );
    let mut resp = octet_stream(Body::from_stream(chunks), size);
    resp.extensions_mut().insert(target);
    Ok(resp)
}

/// `body` streamed back as `application/octet-stream`, with its length when known.
pub(crate) fn octet_stream(body: Body, size: Option<u64>) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(size) = size {
        h.insert(
            axum::http::header::CONTENT_LENGTH,
            axum::http::HeaderValue::from(size),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        body: Body,
        allowed: impl Fn() -> bool + Send + 'static,
    ) -> (Vec<Result<Bytes, std::io::Error>>, Option<SenderFailure>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let failed = Arc::new(std::sync::Mutex::new(None));
            // A short idle limit: a stream that never yields again is cut by it
            // whatever the machine's speed (nothing here races it).
            let idle = Duration::from_millis(50);
            let out: Vec<_> = relayed_upload(body, idle, allowed, Arc::clone(&failed))
                .collect()
                .await;
            let why = *failed.lock().expect("lock");
            (out, why)
        })
    }

    #[test]
    fn a_whole_upload_is_relayed_as_it_came() {
        let body = Body::from_stream(futures_util::stream::iter([
            Ok::<_, std::io::Error>(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"def")),
        ]));
        let (out, why) = run(body, || true);
        let bytes: Vec<u8> = out
            .into_iter()
            .flat_map(|c| c.expect("chunk").to_vec())
            .collect();
        assert_eq!(bytes, b"abcdef");
        assert_eq!(why, None);
    }

    #[test]
    fn a_sender_gone_quiet_is_cut_after_the_idle_limit_and_named() {
        // One chunk, then nothing ever again.
        let body = Body::from_stream(
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abc"))])
                .chain(futures_util::stream::pending()),
        );
        let (out, why) = run(body, || true);
        assert_eq!(out.len(), 2, "the chunk, then the error");
        assert!(out[1].is_err());
        assert_eq!(why, Some(SenderFailure::Idle));
        assert_eq!(
            why.map(|w| w.answer().status),
            Some(StatusCode::REQUEST_TIMEOUT)
        );
    }

    #[test]
    fn a_broken_body_and_an_ended_access_are_named() {
        let body = Body::from_stream(futures_util::stream::iter([
            Ok::<_, std::io::Error>(Bytes::from_static(b"abc")),
            Err(std::io::Error::other("reset")),
        ]));
        let (_, why) = run(body, || true);
        assert_eq!(why, Some(SenderFailure::Broken));
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        let body = Body::from_stream(futures_util::stream::iter([
            Ok::<_, std::io::Error>(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"def")),
        ]));
        // Allowed for the first chunk, revoked before the second.
        let (out, why) = run(body, move || counter.fetch_add(1, Ordering::SeqCst) == 0);
        assert_eq!(why, Some(SenderFailure::AccessEnded));
        assert!(out[0].is_ok() && out[1].is_err());
    }
}
