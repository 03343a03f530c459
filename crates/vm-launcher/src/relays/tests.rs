//! The relays against real sockets: a guest on the relay's Unix socket, a loopback
//! service recording what reaches it.
use std::sync::atomic::AtomicUsize;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;

const JWT: &str = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJhZ2VudCI6ImEifQ.c2lnbmF0dXJl";

/// What the service is answered with: an SSE stream, one event a chunk.
const EVENTS: [&str; 3] = [
    "event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

const BODY: &str = r#"{"model":"claude-x","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hello"}]}"#;

fn limits(max_connections: usize) -> RelayLimits {
    RelayLimits {
        max_connections,
        first_byte: Duration::from_secs(20),
        idle: Duration::from_secs(20),
    }
}

/// One request as the service received it: the raw head, the body, and the
/// trailer section of a chunked body.
#[derive(Debug)]
struct Received {
    head: String,
    body: Vec<u8>,
    trailers: String,
}

impl Received {
    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }
    /// Every value of header `name`, as sent on the wire.
    fn values(&self, name: &str) -> Vec<&str> {
        header_values(&self.head, name)
    }
}

fn header_values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// A loopback TCP server standing in for the host service: records each request it
/// gets and answers with [`EVENTS`] chunked; with `gate`, the events after the first
/// wait for a permit (so a test can tell a relayed stream from a buffered one).
struct Upstream {
    authority: String,
    received: mpsc::UnboundedReceiver<Received>,
    /// Connections accepted, and connections open now.
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    async fn start(gated: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("addr").to_string();
        let (tx, received) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let gate = gated.then(|| Arc::new(Semaphore::new(0)));
        let (count, open2, gate2) = (Arc::clone(&connections), Arc::clone(&open), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                open2.fetch_add(1, Ordering::SeqCst);
                let (tx, gate, open) = (tx.clone(), gate2.clone(), Arc::clone(&open2));
                tokio::spawn(async move {
                    /// Counts the connection closed however its task ends.
                    struct Closed(Arc<AtomicUsize>);
                    impl Drop for Closed {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _closed = Closed(open);
                    let (r, mut w) = conn.into_split();
                    let mut r = BufReader::new(r);
                    // One connection may carry several requests.
                    while let Some(head) = read_head(&mut r).await {
                        let Some((body, trailers)) = read_body(&mut r, &head).await else {
                            return;
                        };
                        let _ = tx.send(Received {
                            head,
                            body,
                            trailers,
                        });
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: req-42\r\ntransfer-encoding: chunked\r\n\r\n";
                        if w.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        for (i, event) in EVENTS.iter().enumerate() {
                            if i == 1
                                && let Some(g) = &gate
                            {
                                let Ok(p) = g.acquire().await else { return };
                                p.forget();
                            }
                            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                            if w.write_all(chunk.as_bytes()).await.is_err()
                                || w.flush().await.is_err()
                            {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if w.write_all(b"0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            authority,
            received,
            connections,
            open,
            gate,
            task,
        }
    }

    async fn next_request(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.received.recv())
            .await
            .expect("the service got no request within 10 s")
            .expect("service running")
    }
}

/// Reads an HTTP head (up to the empty line); `None` at the end of the stream.
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(head);
        }
        head.push_str(&line);
    }
}

/// Reads one chunk of a chunked body; `None` at the last (empty) one, whose
/// trailer section is left to read (with [`read_head`]).
async fn read_chunk<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).await.expect("chunk size");
    let size = usize::from_str_radix(size.trim().split(';').next()?, 16).expect("hex size");
    if size == 0 {
        return None;
    }
    let mut data = vec![0; size + 2];
    r.read_exact(&mut data).await.expect("chunk data");
    assert_eq!(&data[size..], b"\r\n", "chunk ends with CRLF");
    data.truncate(size);
    Some(data)
}

/// Reads the body a head announces: its bytes, and the trailer section when it
/// is chunked. `None` if the connection ends first.
async fn read_body<R: AsyncBufRead + Unpin>(r: &mut R, head: &str) -> Option<(Vec<u8>, String)> {
    let mut body = Vec::new();
    if header_values(head, "transfer-encoding").contains(&"chunked") {
        while let Some(c) = read_chunk(r).await {
            body.extend(c);
        }
        let trailers = read_head(r).await?;
        return Some((body, trailers));
    }
    let len = header_values(head, "content-length")
        .first()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    body.resize(len, 0);
    r.read_exact(&mut body).await.ok()?;
    Some((body, String::new()))
}

/// A response as the guest read it.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line")
}

async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R) -> Reply {
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(r))
        .await
        .expect("an answer within 10 s")
        .expect("an answer, not the end of the connection");
    let (body, _) = read_body(r, &head).await.expect("the whole body");
    Reply {
        status: status_of(&head),
        head,
        body,
    }
}

/// A request as a guest's LLM client would send it, with everything it should not
/// be able to pass on.
fn forged_request() -> String {
    format!(
        "POST http://evil.example/v1/messages HTTP/1.1\r\n\
         Host: evil.example\r\n\
         x-api-key: forged\r\n\
         Authorization: Bearer forged\r\n\
         Proxy-Authorization: Basic Zm9yZ2Vk\r\n\
         Cookie: a=b\r\n\
         Connection: keep-alive, x-hop\r\n\
         x-hop: forged\r\n\
         anthropic-version: 2023-06-01\r\n\
         content-type: application/json\r\n\
         content-length: {}\r\n\
         \r\n{BODY}",
        BODY.len()
    )
}

/// The LLM relay of a VM in a temporary directory.
struct Relay {
    dir: tempfile::TempDir,
    refused: Counter,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    fn start(target: &str, identity: AgentIdentity, limits: RelayLimits) -> Self {
        Self::serving(target, identity, limits, &[])
    }

    /// A relay that serves only `paths`.
    fn serving(
        target: &str,
        identity: AgentIdentity,
        limits: RelayLimits,
        paths: &'static [&'static str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let refused = Counter::default();
        let relay = HttpRelay {
            name: "llm",
            port: PROXY_PORT,
            target: target.to_owned(),
            limits,
            paths,
        };
        let task = tokio::spawn(http_relay(
            dir.path().to_owned(),
            VmName::parse("relay-test").expect("name"),
            relay,
            identity,
            refused.clone(),
        ));
        Self { dir, refused, task }
    }

    /// A guest connection (as the vsock device makes one), once the relay listens.
    async fn guest(&self) -> BufReader<UnixStream> {
        let socket = format!("{VSOCK_SOCKET}_{PROXY_PORT}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match crate::backend::connect_in_dir(self.dir.path(), &socket).await {
                Ok(s) => return BufReader::new(s),
                Err(e) if Instant::now() > deadline => panic!("relay socket: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

fn fixed() -> AgentIdentity {
    AgentIdentity::fixed(JWT)
}

#[test]
fn the_relay_socket_is_the_vsock_prefix_and_the_guest_port() {
    assert_eq!(VSOCK_SOCKET, "vsock.sock");
    assert_eq!(PROXY_PORT, 11435);
}

#[tokio::test]
async fn the_guests_credentials_are_replaced_by_the_vms_token_and_the_stream_comes_back_intact() {
    let mut up = Upstream::start(true).await;
    let relay = Relay::start(&up.authority, fixed(), limits(4));
    let mut guest = relay.guest().await;
    guest
        .get_mut()
        .write_all(forged_request().as_bytes())
        .await
        .expect("send");

    // The answer's head and first event arrive while the service still holds the
    // rest: the relay streams, it does not buffer.
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut guest))
        .await
        .expect("an answer head within 10 s")
        .expect("an answer");
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(header_values(&head, "content-type"), ["text/event-stream"]);
    assert_eq!(header_values(&head, "x-request-id"), ["req-42"]);
    let mut body = Vec::new();
    while body.len() < EVENTS[0].len() {
        let chunk = tokio::time::timeout(Duration::from_secs(5), read_chunk(&mut guest))
            .await
            .expect("the first event reaches the guest before the stream ends")
            .expect("more body");
        body.extend(chunk);
    }
    assert_eq!(String::from_utf8_lossy(&body), EVENTS[0]);
    up.gate.as_ref().expect("gated").add_permits(1);
    while let Some(chunk) = read_chunk(&mut guest).await {
        body.extend(chunk);
    }
    read_head(&mut guest).await.expect("the end of the body");
    assert_eq!(String::from_utf8_lossy(&body), EVENTS.concat());

    let got = up.next_request().await;
    assert_eq!(
        got.request_line(),
        "POST /v1/messages HTTP/1.1",
        "{}",
        got.head
    );
    assert_eq!(
        got.values("authorization"),
        [format!("Bearer {JWT}")],
        "{}",
        got.head
    );
    assert_eq!(got.values("host"), [up.authority.as_str()], "{}", got.head);
    for gone in [
        "x-api-key",
        "cookie",
        "proxy-authorization",
        "connection",
        "x-hop",
    ] {
        assert!(
            got.values(gone).is_empty(),
            "{gone} reached the service: {}",
            got.head
        );
    }
    assert!(!got.head.contains("forged"), "{}", got.head);
    assert!(!got.head.contains("evil.example"), "{}", got.head);
    assert_eq!(got.values("anthropic-version"), ["2023-06-01"]);
    assert_eq!(got.values("content-type"), ["application/json"]);
    assert_eq!(String::from_utf8_lossy(&got.body), BODY);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

/// A request with a chunked body whose trailer section tries to add credentials.
fn chunked_request_with_trailers() -> String {
    let (a, b) = BODY.split_at(BODY.len() / 2);
    format!(
        "POST /v1/messages HTTP/1.1\r\n\
         Host: 127.0.0.1:11435\r\n\
         x-api-key: forged\r\n\
         content-type: application/json\r\n\
         transfer-encoding: chunked\r\n\
         te: trailers\r\n\
         trailer: authorization, x-api-key\r\n\
         \r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\
         authorization: Bearer forged\r\n\
         x-api-key: forged\r\n\
         \r\n",
        a.len(),
        b.len()
    )
}

#[tokio::test]
async fn every_request_on_a_kept_alive_guest_connection_gets_the_token() {
    let mut up = Upstream::start(false).await;
    let relay = Relay::start(&up.authority, fixed(), limits(4));
    let mut guest = relay.guest().await;
    for (i, request) in [
        forged_request(),
        chunked_request_with_trailers(),
        forged_request(),
    ]
    .iter()
    .enumerate()
    {
        guest
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .expect("send");
        let reply = read_reply(&mut guest).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.head);
        assert_eq!(String::from_utf8_lossy(&reply.body), EVENTS.concat());
        let got = up.next_request().await;
        assert_eq!(
            got.request_line(),
            "POST /v1/messages HTTP/1.1",
            "request {i}"
        );
        assert_eq!(
            got.values("authorization"),
            [format!("Bearer {JWT}")],
            "request {i}: {}",
            got.head
        );
        assert!(
            got.values("x-api-key").is_empty(),
            "request {i}: {}",
            got.head
        );
        assert!(
            !got.head.contains("forged") && !got.trailers.contains("forged"),
            "request {i}: {}{}",
            got.head,
            got.trailers
        );
        assert_eq!(String::from_utf8_lossy(&got.body), BODY, "request {i}");
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        3,
        "a new service connection per request"
    );
    assert_eq!(relay.refused.get(), 0);
}

#[tokio::test]
async fn without_an_identity_the_guest_gets_503_and_the_service_no_connection() {
    let up = Upstream::start(false).await;
    let relay = Relay::start(&up.authority, AgentIdentity::unconfigured(), limits(4));
    let mut guest = relay.guest().await;
    let started = Instant::now();
    guest
        .get_mut()
        .write_all(forged_request().as_bytes())
        .await
        .expect("send");
    let reply = read_reply(&mut guest).await;
    assert_eq!(reply.status, 503, "{}", reply.head);
    assert!(
        started.elapsed() < TOKEN_WAIT,
        "no identity configured is final: nothing to wait for ({:?})",
        started.elapsed()
    );
    assert_eq!(
        header_values(&reply.head, "content-type"),
        ["application/json"]
    );
    let v = reply.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    let message = v["error"]["message"].as_str().expect("a message");
    assert!(message.starts_with("ClawOS relay: "), "{message}");
    assert!(message.contains("CLAWOS_IDENTITY_URL"), "{message}");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        0,
        "a request without a token reached the service"
    );
}

#[tokio::test]
async fn a_path_the_relay_does_not_serve_is_404_and_never_reaches_the_service() {
    let mut up = Upstream::start(false).await;
    let relay = Relay::serving(&up.authority, fixed(), limits(4), &["/v1/messages"]);
    let mut guest = relay.guest().await;
    let other = forged_request().replace("/v1/messages HTTP", "/metrics HTTP");
    guest
        .get_mut()
        .write_all(other.as_bytes())
        .await
        .expect("send");
    let reply = read_reply(&mut guest).await;
    assert_eq!(reply.status, 404, "{}", reply.head);
    let message = reply.json()["error"]["message"].to_string();
    assert!(message.contains("serves only /v1/messages"), "{message}");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        0,
        "a refused path reached the service"
    );
    // The served path, on the same kept-alive connection, with a query: relayed.
    let served = forged_request().replace("/v1/messages HTTP", "/v1/messages?beta=1 HTTP");
    guest
        .get_mut()
        .write_all(served.as_bytes())
        .await
        .expect("send");
    let seen = up.next_request().await;
    assert!(
        seen.request_line().starts_with("POST /v1/messages?beta=1 "),
        "{}",
        seen.request_line()
    );
}

#[tokio::test]
async fn a_service_that_refuses_connections_is_a_502_the_guest_can_read() {
    // A port nothing listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .to_string();
    let relay = Relay::start(&closed, fixed(), limits(4));
    let mut guest = relay.guest().await;
    guest
        .get_mut()
        .write_all(forged_request().as_bytes())
        .await
        .expect("send");
    let reply = read_reply(&mut guest).await;
    assert_eq!(reply.status, 502, "{}", reply.head);
    let v = reply.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    assert_eq!(
        v["error"]["message"], "ClawOS relay: the host's llm service is unreachable",
        "{v}"
    );
}

#[tokio::test]
async fn a_guest_connection_that_goes_quiet_mid_request_is_closed_after_the_idle_limit() {
    let up = Upstream::start(false).await;
    let limits = RelayLimits {
        idle: Duration::from_millis(300),
        ..limits(2)
    };
    let relay = Relay::start(&up.authority, fixed(), limits);
    let mut guest = relay.guest().await;
    // A head announcing 1000 bytes of body, then 10 of them, then nothing.
    let started = Instant::now();
    guest
        .get_mut()
        .write_all(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"model\":",
        )
        .await
        .expect("send");
    let mut rest = Vec::new();
    // Closed (an end of stream or a reset, whichever the close makes).
    let _ = tokio::time::timeout(Duration::from_secs(10), guest.read_to_end(&mut rest))
        .await
        .expect("a quiet guest connection is closed, not held for ever");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // The service's connection, waiting for the rest of the body, is closed too.
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.open.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "the service's connection stays open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before the idle limit: {:?}",
        started.elapsed()
    );
    // Its slot is free again: two more connections are served, none refused.
    let (mut a, mut b) = (relay.guest().await, relay.guest().await);
    for g in [&mut a, &mut b] {
        g.get_mut()
            .write_all(forged_request().as_bytes())
            .await
            .expect("send");
        assert_eq!(read_reply(g).await.status, 200);
    }
    assert_eq!(relay.refused.get(), 0);
}

#[tokio::test]
async fn a_guest_over_its_connection_limit_has_the_new_connection_closed_and_counted() {
    let mut up = Upstream::start(false).await;
    let relay = Relay::start(&up.authority, fixed(), limits(2));
    let mut first = relay.guest().await;
    let _second = relay.guest().await;
    let mut third = relay.guest().await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("the third connection is closed at once");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the third connection got data: {n:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.refused.get() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(relay.refused.get(), 1);

    // The connections within the limit are served.
    first
        .get_mut()
        .write_all(forged_request().as_bytes())
        .await
        .expect("send");
    let reply = read_reply(&mut first).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(
        up.next_request().await.values("authorization"),
        [format!("Bearer {JWT}")]
    );

    // A connection that ends gives its slot back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = relay.guest().await;
        if again
            .get_mut()
            .write_all(forged_request().as_bytes())
            .await
            .is_ok()
            && let Ok(Some(head)) =
                tokio::time::timeout(Duration::from_secs(5), read_head(&mut again)).await
        {
            assert_eq!(status_of(&head), 200, "{head}");
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay.refused.get() >= 1);
}
