//! The accept loop: TCP, then TLS (within [`HANDSHAKE_TIMEOUT`]), then HTTP/1.1 with a
//! [`HEADER_TIMEOUT`] for each request's headers, each connection in its own task so a
//! slow or silent client holds only its own connection. On shutdown it stops
//! accepting, lets requests in flight finish for at most the drain time, then returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower_service::Service;

/// Longest a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers (first byte to last), and
/// an idle keep-alive connection stays open.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; past it new ones wait in the kernel's backlog.
/// One client holds at most [`crate::limits::CONNECTIONS_PER_CLIENT`] of them; past
/// that its new connections are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown`, each
/// client (see [`crate::limits::client_of`]) holding at most `per_client` connections.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
    per_client: usize,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    // Each connection task holds a sender; once the loop drops its own, `recv`
    // answers `None` when the last connection has ended.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_client = crate::limits::PerClient::new(per_client);
    let mut last_warned: Option<std::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(share) = per_client.try_take(peer.ip()) else {
            // Said once a minute at most: a flood must not flood the log too.
            if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                last_warned = Some(std::time::Instant::now());
                tracing::warn!(%peer, "connections closed at once: this client holds its share already (--max-connections-per-client; behind a proxy every client is the proxy)");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let open = open_tx.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let _held = (permit, open, share);
            match acceptor {
                None => serve_connection(tcp, peer, app, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            // A TLS-ALPN-01 validation ends with the handshake.
                            if tls.get_ref().1.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
                                tracing::info!(%peer, "answered a TLS-ALPN-01 validation");
                                return;
                            }
                            serve_connection(tls, peer, app, stop).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    drop(open_tx);
    let _ = stop_tx.send(true);
    tokio::select! {
        _ = open_rx.recv() => {}
        () = tokio::time::sleep(drain) => {
            tracing::warn!(drain_secs = drain.as_secs(), "requests still in flight after the drain timeout; exiting without them");
        }
    }
    Ok(())
}

async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move { app.call(req.map(axum::body::Body::new)).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            // Finish the request in flight, then close (keep-alive ends).
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends a keep-alive request on `c` and waits for its answer (`ok`): whether the
    /// connection is served. The connection stays open and held.
    async fn served(c: &mut TcpStream) -> bool {
        if c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while !out.ends_with(b"ok") {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
            true
        });
        read.await.unwrap_or(false)
    }

    /// One client holding its share of connections gets its next one closed at once,
    /// and is served again once it lets one go.
    #[tokio::test]
    async fn one_client_holds_at_most_its_share_of_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            None,
            app,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
            crate::limits::CONNECTIONS_PER_CLIENT,
        ));
        let mut held = Vec::new();
        for i in 0..crate::limits::CONNECTIONS_PER_CLIENT {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            assert!(served(&mut c).await, "connection {i} within the share");
            held.push(c);
        }
        let mut over = TcpStream::connect(addr).await.expect("connect");
        assert!(
            !served(&mut over).await,
            "a connection past the share was served"
        );
        // One let go: the client is served again (as soon as the server has seen it
        // close).
        drop(held.pop());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut again = TcpStream::connect(addr).await.expect("connect");
            if served(&mut again).await {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a freed share stayed taken"
            );
        }
        let _ = stop.send(());
        drop(held);
        let _ = server.await;
    }
}
