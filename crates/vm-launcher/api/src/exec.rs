//! The WebSocket client of [`routes::EXEC`]: runs a command in a VM, streams its
//! output, and returns how it ended.

use clawos_api::{ClientError, code};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::{ExecEvent, ExecStart, LauncherClient, STDERR, routes};

/// How a guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStatus {
    /// It exited with this code.
    Exited(i32),
    /// `timeout_ms` passed; it and its process group were killed.
    TimedOut,
    /// A signal ended it.
    Killed { signal: Option<i32> },
}

impl ExecStatus {
    /// The status a local process reports for it, as ssh and docker exec do: an exit
    /// code's low 8 bits (as `exit(2)` keeps them: 256 → 0, -1 → 255), 124 for a
    /// timeout (as `timeout(1)`), 128 for a signal.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Exited(c) => (c & 0xff) as u8,
            Self::TimedOut => 124,
            Self::Killed { .. } => 128,
        }
    }

    fn from_event(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> Self {
        match (code, timed_out) {
            (Some(c), _) => Self::Exited(c),
            (None, true) => Self::TimedOut,
            (None, false) => Self::Killed { signal },
        }
    }
}

/// Why an exec did not produce an [`ExecStatus`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The launcher refused before the WebSocket opened (no such VM, not running, …).
    #[error(transparent)]
    Refused(ClientError),
    /// The launcher could not be reached.
    #[error("cannot reach vm-launcher for exec at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tungstenite::Error,
    },
    /// The WebSocket failed after it opened.
    #[error("exec stream: {0}")]
    Stream(#[source] tungstenite::Error),
    /// Writing the command's output locally failed.
    #[error("exec output: {0}")]
    Output(#[source] std::io::Error),
    /// The launcher or guest could not run the command.
    #[error("exec: {0}")]
    Remote(String),
    /// The launcher sent an event this client does not understand.
    #[error("exec: bad event {text:?}: {source}")]
    BadEvent {
        text: String,
        #[source]
        source: serde_json::Error,
    },
    /// The stream ended before the command's end was reported.
    #[error("exec stream ended without an exit status")]
    NoStatus,
}

impl ExecError {
    /// The machine-readable code (`clawos_api::code`): the launcher's own for a
    /// refusal, `unavailable` when it was not reached, `internal` otherwise.
    pub fn code(&self) -> &str {
        match self {
            Self::Refused(e) => e.code(),
            Self::Connect { .. } => code::UNAVAILABLE,
            _ => code::INTERNAL,
        }
    }

    /// The `clawos` exit status for this error ([`clawos_api::exit_code`]).
    pub fn exit_code(&self) -> u8 {
        clawos_api::exit_code(self.code())
    }
}

/// Sends what `src` yields as binary WebSocket messages until it ends. Returns false
/// if the WebSocket went away first.
pub(crate) async fn pump_to_websocket<S>(mut src: impl AsyncRead + Unpin, tx: &mut S) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => {
                if tx
                    .send(Message::Binary(buf[..n].to_vec().into()))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
    }
}

/// A refused upgrade (plain HTTP with an error body) as the client error it is.
pub(crate) fn refused_upgrade(resp: &tungstenite::http::Response<Option<Vec<u8>>>) -> ClientError {
    let request_id = resp
        .headers()
        .get(clawos_api::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    clawos_api::decode_error(
        resp.status().as_u16(),
        resp.body().as_deref().unwrap_or_default(),
        request_id,
    )
}

/// A WebSocket to the launcher's routes (or a control plane's, over TLS).
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl LauncherClient {
    /// Opens the WebSocket of `route` (exec, gateway) for VM `name` with the client's
    /// credential, over TLS when the client has [`LauncherClient::with_ws_tls`]. A
    /// refused upgrade is `tungstenite::Error::Http` with the server's answer.
    pub async fn ws_connect(
        &self,
        route: clawos_api::Route,
        name: &str,
    ) -> Result<WebSocket, tungstenite::Error> {
        let req = self.ws_request(route, name)?;
        let connector = self
            .ws_tls
            .clone()
            .map(tokio_tungstenite::Connector::Rustls);
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector)
            .await
            .map(|(ws, _)| ws)
    }

    /// A WebSocket request for `route`, with the client's credential if it has one.
    pub(crate) fn ws_request(
        &self,
        route: clawos_api::Route,
        name: &str,
    ) -> Result<tungstenite::handshake::client::Request, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let mut req = self.http.ws_url(route, &[name]).into_client_request()?;
        if let Some(t) = self.http.token() {
            let v = tungstenite::http::HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|e| tungstenite::Error::HttpFormat(e.into()))?;
            req.headers_mut()
                .insert(tungstenite::http::header::AUTHORIZATION, v);
        }
        Ok(req)
    }

    /// Runs `start` in VM `name`: its stdout and stderr are written to `stdout` and
    /// `stderr` as they arrive, and `stdin` (when given; `start.stdin` should say so)
    /// is forwarded until it ends. Returns how the command ended. `stdout` and
    /// `stderr` are flushed before this returns, whatever it returns.
    pub async fn exec<I, O, E>(
        &self,
        name: &str,
        start: &ExecStart,
        stdin: Option<I>,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExecStatus, ExecError>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let status = self.exec_inner(name, start, stdin, stdout, stderr).await;
        let _ = stdout.flush().await;
        let _ = stderr.flush().await;
        status
    }

    async fn exec_inner<I, O, E>(
        &self,
        name: &str,
        start: &ExecStart,
        stdin: Option<I>,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExecStatus, ExecError>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let connect = |source| ExecError::Connect {
            url: self.exec_url(name),
            source,
        };
        let mut ws = match self.ws_connect(routes::EXEC, name).await {
            Ok(ws) => ws,
            Err(tungstenite::Error::Http(resp)) => {
                return Err(ExecError::Refused(refused_upgrade(&resp)));
            }
            Err(e) => return Err(connect(e)),
        };
        let text = serde_json::to_string(start).map_err(|e| ExecError::Remote(e.to_string()))?;
        ws.send(Message::Text(text.into()))
            .await
            .map_err(ExecError::Stream)?;
        let (mut tx, mut rx) = ws.split();
        if let Some(stdin) = stdin {
            // Its own task: a read of the local stdin cannot be cancelled, and must not
            // hold up the output.
            tokio::spawn(async move {
                if pump_to_websocket(stdin, &mut tx).await {
                    let _ = tx.send(Message::Text(r#"{"eof":true}"#.into())).await;
                }
            });
        }
        while let Some(msg) = rx.next().await {
            match msg.map_err(ExecError::Stream)? {
                Message::Binary(b) if !b.is_empty() => {
                    let out = if b[0] == STDERR {
                        stderr.write_all(&b[1..]).await
                    } else {
                        stdout.write_all(&b[1..]).await
                    };
                    out.map_err(ExecError::Output)?;
                }
                Message::Text(t) => {
                    return match serde_json::from_str(&t) {
                        Ok(ExecEvent::Exit {
                            code,
                            signal,
                            timed_out,
                        }) => Ok(ExecStatus::from_event(code, signal, timed_out)),
                        Ok(ExecEvent::Error { message }) => Err(ExecError::Remote(message)),
                        Err(source) => Err(ExecError::BadEvent {
                            text: t.to_string(),
                            source,
                        }),
                    };
                }
                _ => {}
            }
        }
        Err(ExecError::NoStatus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_ssh_and_timeout_conventions() {
        for (code, status) in [
            (0, 0),
            (1, 1),
            (42, 42),
            (255, 255),
            (256, 0),
            (257, 1),
            (-1, 255),
        ] {
            assert_eq!(ExecStatus::Exited(code).exit_code(), status, "{code}");
        }
        assert_eq!(
            ExecStatus::from_event(None, Some(9), true),
            ExecStatus::TimedOut
        );
        assert_eq!(ExecStatus::TimedOut.exit_code(), 124);
        assert_eq!(
            ExecStatus::from_event(Some(3), None, true),
            ExecStatus::Exited(3),
            "a reported code wins"
        );
        assert_eq!(
            ExecStatus::from_event(None, Some(9), false).exit_code(),
            128
        );
    }
}
