//! The WebSocket client of [`routes::GATEWAY`]: TCP connections tunnelled to a VM's
//! agent gateway (guest port 18789), one WebSocket per connection.

use std::net::SocketAddr;

use clawos_api::{ClientError, code};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::exec::{pump_to_websocket, refused_upgrade};
use crate::{LauncherClient, routes};

/// Why a tunnel could not be opened, or forwarding stopped.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The launcher refused the tunnel (no such VM, not running, …).
    #[error(transparent)]
    Refused(ClientError),
    /// The launcher could not be reached.
    #[error("gateway unreachable at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tungstenite::Error,
    },
    /// The local listener failed.
    #[error("accept: {0}")]
    Accept(#[source] std::io::Error),
}

impl TunnelError {
    /// The machine-readable code (`clawos_api::code`).
    pub fn code(&self) -> &str {
        match self {
            Self::Refused(e) => e.code(),
            Self::Connect { .. } => code::UNAVAILABLE,
            Self::Accept(_) => code::INTERNAL,
        }
    }

    /// The `clawos` exit status for this error ([`clawos_api::exit_code`]).
    pub fn exit_code(&self) -> u8 {
        clawos_api::exit_code(self.code())
    }
}

impl LauncherClient {
    /// Tunnels one TCP connection to VM `name`'s agent gateway until either side
    /// closes. Errors only if the tunnel could not be opened.
    pub async fn tunnel_gateway(&self, name: &str, tcp: TcpStream) -> Result<(), TunnelError> {
        let connect = |source| TunnelError::Connect {
            url: self.gateway_url(name),
            source,
        };
        let ws = match self.ws_connect(routes::GATEWAY, name).await {
            Ok(ws) => ws,
            Err(tungstenite::Error::Http(resp)) => {
                return Err(TunnelError::Refused(refused_upgrade(&resp)));
            }
            Err(e) => return Err(connect(e)),
        };
        let (mut tx, mut rx) = ws.split();
        let (mut tr, mut tw) = tcp.into_split();
        let up = async move {
            pump_to_websocket(&mut tr, &mut tx).await;
            let _ = tx.send(Message::Close(None)).await;
        };
        let down = async move {
            while let Some(Ok(m)) = rx.next().await {
                match m {
                    Message::Binary(b) if tw.write_all(&b).await.is_err() => break,
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = tw.shutdown().await;
        };
        // A half close through the guest's vsock ends the whole connection, so the
        // tunnel ends when either direction does.
        tokio::select! {
            () = up => {}
            () = down => {}
        }
        Ok(())
    }

    /// Accepts connections on `listener` and tunnels each to VM `name`'s agent gateway
    /// on its own task; a connection whose tunnel cannot be opened is closed and
    /// reported to `on_error`. Returns only when the listener fails.
    pub async fn forward_gateway<F>(
        &self,
        name: &str,
        listener: TcpListener,
        on_error: F,
    ) -> Result<(), TunnelError>
    where
        F: Fn(SocketAddr, TunnelError) + Clone + Send + 'static,
    {
        loop {
            let (tcp, peer) = listener.accept().await.map_err(TunnelError::Accept)?;
            let (client, name, on_error) = (self.clone(), name.to_owned(), on_error.clone());
            tokio::spawn(async move {
                if let Err(e) = client.tunnel_gateway(&name, tcp).await {
                    on_error(peer, e);
                }
            });
        }
    }
}
