use super::*;

fn msg(vm: &str, boot: &str, body: GuestBody) -> GuestMessage {
    GuestMessage {
        stream: Arc::new(StreamInfo {
            agent: "a".into(),
            vm: vm.into(),
            boot_id: boot.into(),
            clock_offset_ns: 0,
        }),
        body,
        ack: Ack::default(),
    }
}

fn ev(seq: u64) -> GuestBody {
    let raw = RawEvent::parse(&[0u8; RawEvent::HEAD_SIZE]).expect("raw");
    GuestBody::Event {
        seq,
        raw: Box::new(raw),
    }
}

#[test]
fn resends_are_skipped_gaps_and_kernel_drops_reported() {
    let mut g = GuestStreams::default();
    let j = |g: &mut GuestStreams, vm, boot, body| g.judge(&msg(vm, boot, body));
    assert_eq!(j(&mut g, "v1", "b1", ev(1)), Verdict::Record { lost: 0 });
    assert_eq!(j(&mut g, "v1", "b1", ev(2)), Verdict::Record { lost: 0 });
    // A reconnect re-sends 2, then 3 and 4 were discarded in the guest.
    assert_eq!(j(&mut g, "v1", "b1", ev(2)), Verdict::Duplicate);
    assert_eq!(j(&mut g, "v1", "b1", ev(5)), Verdict::Record { lost: 2 });
    // Another VM has its own numbering.
    assert_eq!(j(&mut g, "v2", "c1", ev(1)), Verdict::Record { lost: 0 });
    let drops = |t| GuestBody::Drops { total: t };
    assert_eq!(
        j(&mut g, "v1", "b1", drops(7)),
        Verdict::KernelDrops { new: 7, total: 7 }
    );
    assert_eq!(j(&mut g, "v1", "b1", drops(7)), Verdict::Nothing);
    assert_eq!(
        j(&mut g, "v1", "b1", drops(9)),
        Verdict::KernelDrops { new: 2, total: 9 }
    );
    // The guest rebooted: numbering and drop totals start over.
    assert_eq!(j(&mut g, "v1", "b2", ev(1)), Verdict::Record { lost: 0 });
    assert_eq!(
        j(&mut g, "v1", "b2", drops(1)),
        Verdict::KernelDrops { new: 1, total: 1 }
    );
}

#[test]
fn a_restarted_daemon_picks_up_where_the_trail_ends() {
    let mut g = GuestStreams::default();
    let mut e = AuditEvent::new(1, String::new(), "h", Kind::Syscall);
    e.vm = Some("v1".into());
    e.guest_boot = Some("b1".into());
    e.guest_seq = Some(41);
    g.replay(&e);
    let mut d = AuditEvent::new(2, String::new(), "h", Kind::GuestDrops);
    d.vm = Some("v1".into());
    d.guest_boot = Some("b1".into());
    d.dropped_total = Some(5);
    g.replay(&d);
    assert_eq!(g.judge(&msg("v1", "b1", ev(41))), Verdict::Duplicate);
    assert_eq!(
        g.judge(&msg("v1", "b1", ev(44))),
        Verdict::Record { lost: 2 }
    );
    assert_eq!(
        g.judge(&msg("v1", "b1", GuestBody::Drops { total: 5 })),
        Verdict::Nothing
    );
    // A quota report names the last event it covers: those are not a gap later.
    let mut q = AuditEvent::new(3, String::new(), "h", Kind::GuestDrops);
    q.vm = Some("v1".into());
    q.guest_boot = Some("b1".into());
    q.guest_seq = Some(60);
    g.replay(&q);
    assert_eq!(
        g.judge(&msg("v1", "b1", ev(61))),
        Verdict::Record { lost: 0 }
    );
}

const BOOT: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

/// A guest socket served on a runtime, as the daemon serves it.
struct Socket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    rx: mpsc::Receiver<GuestMessage>,
    metrics: IngestMetrics,
}

fn socket(limits: Limits) -> Socket {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("guest.sock");
    let listener = bind(&path).expect("bind");
    let (tx, rx) = mpsc::channel(1024);
    let metrics = IngestMetrics::default();
    tokio::spawn(serve(listener, "tok".into(), limits, tx, metrics.clone()));
    Socket {
        _dir: dir,
        path,
        rx,
        metrics,
    }
}

fn header(t: &str, vm: &str) -> Vec<u8> {
    format!("{{\"token\":\"{t}\",\"agent\":\"a\",\"vm\":\"{vm}\"}}\n").into_bytes()
}

fn hello(out: &mut Vec<u8>) {
    Frame::Hello {
        version: stream::VERSION,
        boot_id: BOOT.into(),
        clock_offset_ns: 5,
    }
    .encode(out);
}

fn events(out: &mut Vec<u8>, seqs: impl IntoIterator<Item = u64>) {
    for seq in seqs {
        Frame::Event {
            seq,
            record: vec![0; RawEvent::HEAD_SIZE],
        }
        .encode(out);
    }
}

async fn connect(s: &Socket, bytes: &[u8]) -> tokio::net::UnixStream {
    let mut c = tokio::net::UnixStream::connect(&s.path)
        .await
        .expect("connect");
    c.write_all(bytes).await.expect("write");
    c
}

/// Whether the daemon side closed `c` within `limit` (acknowledgements are read
/// and ignored).
async fn closed(c: &mut tokio::net::UnixStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn next(s: &mut Socket) -> GuestMessage {
    tokio::time::timeout(Duration::from_secs(5), s.rx.recv())
        .await
        .expect("a message in time")
        .expect("a message")
}

fn seq_of(m: &GuestMessage) -> u64 {
    match m.body {
        GuestBody::Event { seq, .. } => seq,
        GuestBody::Drops { .. } => 0,
    }
}

#[tokio::test]
async fn streams_without_the_token_or_a_hello_are_refused() {
    let mut s = socket(Limits::default());
    let mut no_hello = header("tok", "v");
    Frame::Drops { total: 1 }.encode(&mut no_hello);
    for bad in [
        header("nope", "v"),
        header("tok", "../etc"),
        b"garbage\n".to_vec(),
        no_hello,
        vec![b'x'; 5000],
    ] {
        let mut c = connect(&s, &bad).await;
        assert!(closed(&mut c, Duration::from_secs(5)).await);
    }
    assert!(s.rx.try_recv().is_err(), "nothing reached the recorder");
    assert_eq!(s.metrics.refused.get(), 5);
    // A good stream: header, hello, one event; its acknowledgement comes back.
    let mut ok = header("tok", "v");
    hello(&mut ok);
    events(&mut ok, [1]);
    let mut c = connect(&s, &ok).await;
    let m = next(&mut s).await;
    assert_eq!(
        (m.stream.vm.as_str(), m.stream.clock_offset_ns, seq_of(&m)),
        ("v", 5, 1)
    );
    m.ack.raise(1);
    let mut ack = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut ack))
        .await
        .expect("ack in time")
        .expect("ack");
    assert_eq!(u64::from_le_bytes(ack), 1);
    assert_eq!(s.metrics.streams.get(), 1);
}

#[tokio::test]
async fn a_newer_stream_of_a_vm_replaces_the_older_one_after_its_last_message() {
    let mut s = socket(Limits::default());
    let mut first = header("tok", "v");
    hello(&mut first);
    events(&mut first, 1..=3);
    let mut c1 = connect(&s, &first).await;
    for want in 1..=3 {
        assert_eq!(seq_of(&next(&mut s).await), want);
    }
    // Another VM's stream is not disturbed by any of this.
    let mut other = header("tok", "w");
    hello(&mut other);
    let mut cw = connect(&s, &other).await;
    // The newer one re-sends 3 and goes on.
    let mut second = header("tok", "v");
    hello(&mut second);
    events(&mut second, 3..=5);
    let mut c2 = connect(&s, &second).await;
    assert!(
        closed(&mut c1, Duration::from_secs(5)).await,
        "older closed"
    );
    let got: Vec<u64> = [next(&mut s).await, next(&mut s).await, next(&mut s).await]
        .iter()
        .map(seq_of)
        .collect();
    assert_eq!(got, [3, 4, 5]);
    // What the older one sends now reaches nobody.
    let mut late = Vec::new();
    events(&mut late, 6..=9);
    let _ = c1.write_all(&late).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.rx.try_recv().is_err());
    assert!(!closed(&mut c2, Duration::from_millis(100)).await);
    assert!(!closed(&mut cw, Duration::from_millis(100)).await);
    assert_eq!(s.metrics.replaced.get(), 1);
    assert_eq!(s.metrics.streams.get(), 2);
}

#[tokio::test]
async fn handshakes_are_bounded_in_time_and_number_and_per_vm() {
    let mut s = socket(Limits {
        max_pending: 3,
        handshake: Duration::from_millis(300),
    });
    // Silent ones: the fourth closes the oldest.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect(&s, b"").await);
    }
    assert!(closed(&mut silent[0], Duration::from_secs(2)).await);
    // Headers for one VM without a hello: a newer one closes the older.
    let mut a = connect(&s, &header("tok", "v")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut b = connect(&s, &header("tok", "v")).await;
    assert!(closed(&mut a, Duration::from_millis(200)).await);
    // After the handshake time, every one of them is closed.
    for c in silent.iter_mut().skip(1).chain([&mut b]) {
        assert!(closed(c, Duration::from_secs(2)).await);
    }
    assert_eq!(s.metrics.pending.get(), 0);
    // A real stream is still taken.
    let mut ok = header("tok", "v");
    hello(&mut ok);
    events(&mut ok, [1]);
    let _c = connect(&s, &ok).await;
    assert_eq!(seq_of(&next(&mut s).await), 1);
}
