//! monitor-daemon end to end: the real eBPF program in this kernel, real processes
//! making known syscalls, a real rsyslog on loopback as the SIEM.
//!
//! Needs root (or CAP_BPF + CAP_PERFMON), a kernel with BTF, python3 for the workload
//! and rsyslogd for the SIEM tests; each test says loudly why it skips otherwise.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clawos_monitor::cef;
use clawos_monitor::event::{AuditEvent, Kind};

/// A workload that waits for "go" on stdin, then makes known syscalls between two
/// marker opens: N getppid calls, one failing openat; it names itself `comm` first.
const WORKLOAD: &str = r#"
import ctypes, os, sys
n, d, comm = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(comm), 0, 0, 0)  # PR_SET_NAME
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
os.close(os.open(os.path.join(d, "start-marker"), os.O_RDONLY | os.O_CREAT, 0o600))
for _ in range(n):
    os.getppid()
try:
    os.open(os.path.join(d, "missing|x=y\\z\nw"), os.O_RDONLY)
except FileNotFoundError:
    pass
os.close(os.open(os.path.join(d, "end-marker"), os.O_RDONLY | os.O_CREAT, 0o600))
sys.stdout.write("done\n"); sys.stdout.flush()
sys.stdin.readline()
"#;

fn skip(why: &str) -> bool {
    eprintln!("SKIP: {why}");
    if let Some(dir) = option_env!("CARGO_TARGET_TMPDIR") {
        let f = Path::new(&dir).join("../e2e/SKIPPED");
        if let Some(p) = f.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)
        {
            let _ = writeln!(f, "SKIP clawos-monitor: {why}");
        }
    }
    true
}

fn cannot_trace() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("monitor tests load eBPF programs and need root");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return skip("the kernel has no BTF (/sys/kernel/btf/vmlinux)");
    }
    if Command::new("python3").arg("-c").arg("0").status().is_err() {
        return skip("python3 (the workload) is not installed");
    }
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Daemon {
    child: Child,
    url: String,
    token: String,
    jsonl: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(state: &Path, extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_monitor-daemon"))
            .args(["--state-dir"])
            .arg(state)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.join("daemon.log")).expect("log"))
            .spawn()
            .expect("monitor-daemon");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http("GET", &format!("{url}/healthz"), None, None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "monitor-daemon did not come up: {}",
                std::fs::read_to_string(state.join("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let token = std::fs::read_to_string(state.join("monitor/admin.token")).expect("token");
        Self {
            child,
            url,
            token,
            jsonl: state.join("monitor/audit.jsonl"),
        }
    }

    fn watch(&self, pid: u32, agent: &str, vm: &str) {
        let body = format!(r#"{{"pid":{pid},"agent":"{agent}","vm":"{vm}"}}"#);
        let (status, text) = http(
            "POST",
            &format!("{}/v1/watch", self.url),
            Some(&self.token),
            Some(&body),
        );
        assert_eq!(status, 201, "{text}");
    }

    fn events(&self) -> Vec<AuditEvent> {
        complete_events(&self.jsonl)
    }

    fn metric(&self, name: &str) -> u64 {
        let (_, text) = http("GET", &format!("{}/metrics", self.url), None, None);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A tiny HTTP/1.1 client (curl), returning status and body.
fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]);
    if let Some(t) = token {
        c.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data", b]);
    }
    let out = c.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

struct Workload {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Workload {
    fn spawn(n: u32, dir: &Path, comm: &str) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", WORKLOAD, &n.to_string()])
            .arg(dir)
            .arg(comm)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("ready");
        assert_eq!(line, "ready\n");
        Self { child, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs the syscalls and waits until they are done.
    fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("done");
        assert_eq!(line, "done\n");
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The events of `pid` between its start and end marker opens.
fn marked(events: &[AuditEvent], pid: u32) -> Vec<AuditEvent> {
    let mine: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.pid == Some(pid) && e.kind == Kind::Syscall)
        .collect();
    let is_marker = |e: &AuditEvent, m: &str| {
        e.syscall.as_deref() == Some("openat") && e.path.as_deref().is_some_and(|p| p.ends_with(m))
    };
    let start = mine
        .iter()
        .position(|e| is_marker(e, "/start-marker"))
        .expect("start marker event");
    let end = mine
        .iter()
        .position(|e| is_marker(e, "/end-marker"))
        .expect("end marker event");
    mine[start..=end].iter().map(|e| (*e).clone()).collect()
}

/// Waits until the trail holds `pid`'s end-marker open (its workload is recorded).
fn wait_for_end_marker(d: &Daemon, pid: u32) {
    wait_until(
        Duration::from_secs(10),
        "the end marker in the JSONL",
        || {
            d.events().iter().any(|e| {
                e.pid == Some(pid)
                    && e.path
                        .as_deref()
                        .is_some_and(|p| p.ends_with("/end-marker"))
            })
        },
    );
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn known_syscalls_yield_exactly_those_events_with_tags_and_unwatched_ones_none() {
    if cannot_trace() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(state.path(), &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let mut watched = Workload::spawn(37, work.path(), "watched-wl");
    let other = tempfile::tempdir().expect("tempdir");
    let mut unwatched = Workload::spawn(37, other.path(), "unwatched-wl");
    d.watch(watched.pid(), "agent-1", "vm-1");
    watched.go();
    unwatched.go();
    let (wpid, upid) = (watched.pid(), unwatched.pid());
    watched.finish();
    unwatched.finish();
    wait_for_end_marker(&d, wpid);
    let events = d.events();
    let window = marked(&events, wpid);
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &window {
        *names
            .entry(e.syscall.as_deref().unwrap_or("?"))
            .or_default() += 1;
    }
    assert_eq!(names.get("getppid"), Some(&37), "{names:?}");
    let opens: Vec<&AuditEvent> = window
        .iter()
        .filter(|e| e.syscall.as_deref() == Some("openat"))
        .collect();
    assert_eq!(opens.len(), 3, "start, failing, end: {opens:#?}");
    assert!(opens[0].ret.is_some_and(|r| r >= 0), "{:?}", opens[0]);
    let failing = opens[1];
    assert_eq!(failing.ret, Some(-2), "ENOENT: {failing:?}");
    assert_eq!(
        failing.path.as_deref(),
        Some(format!("{}/missing|x=y\\z\nw", work.path().display()).as_str())
    );
    for e in &window {
        assert_eq!(e.agent.as_deref(), Some("agent-1"));
        assert_eq!(e.vm.as_deref(), Some("vm-1"));
        assert_eq!(e.comm.as_deref(), Some("watched-wl"));
        assert_eq!(e.tid, Some(wpid));
    }
    // getppid returns the parent: this test process.
    let ppid = std::process::id() as i64;
    assert!(
        window
            .iter()
            .filter(|e| e.syscall.as_deref() == Some("getppid"))
            .all(|e| e.ret == Some(ppid) && e.nr == Some(110))
    );
    assert!(
        events.iter().all(|e| e.pid != Some(upid)),
        "the unwatched process produced events"
    );
    // Sequence numbers are consecutive: no gap, no loss.
    for w in events.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
}

struct Rsyslog {
    child: Option<Child>,
    conf: PathBuf,
    dir: PathBuf,
}

impl Rsyslog {
    fn start(dir: &Path, tcp: u16, udp: u16) -> Self {
        let conf = dir.join("rsyslog.conf");
        let text = format!(
            r#"global(workDirectory="{d}" maxMessageSize="16k")
module(load="imtcp")
module(load="imudp")
template(name="msgonly" type="string" string="%msg%\n")
ruleset(name="tcp") {{ action(type="omfile" file="{d}/tcp.log" template="msgonly" flushOnTXEnd="on" asyncWriting="off") }}
ruleset(name="udp") {{ action(type="omfile" file="{d}/udp.log" template="msgonly" flushOnTXEnd="on" asyncWriting="off") }}
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="tcp")
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="udp")
"#,
            d = dir.display()
        );
        std::fs::write(&conf, text).expect("conf");
        let mut r = Self {
            child: None,
            conf,
            dir: dir.to_owned(),
        };
        r.resume(tcp);
        r
    }

    fn resume(&mut self, tcp: u16) {
        let child = Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&self.conf)
            .arg("-i")
            .arg(self.dir.join("rsyslog.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("rsyslogd.err")).expect("err"))
            .spawn()
            .expect("rsyslogd");
        self.child = Some(child);
        wait_until(Duration::from_secs(10), "rsyslog's TCP port", || {
            std::net::TcpStream::connect(("127.0.0.1", tcp)).is_ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a pid we spawned; no memory is involved.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("rsyslog.pid"));
    }

    /// The CEF lines received so far over `which` ("tcp" or "udp").
    fn received(&self, which: &str) -> Vec<cef::Parsed> {
        std::fs::read_to_string(self.dir.join(format!("{which}.log")))
            .unwrap_or_default()
            .lines()
            .filter_map(cef::parse)
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}

fn no_rsyslog() -> bool {
    if Command::new("rsyslogd").arg("-v").output().is_err() {
        return skip("rsyslogd is not installed (scripts/setup.sh installs rsyslog)");
    }
    false
}

/// Checks that a received CEF line carries the same fields as the JSONL event.
fn same_fields(p: &cef::Parsed, e: &AuditEvent) {
    assert_eq!(p.ext.get("externalId"), Some(&e.seq.to_string()));
    assert_eq!(p.ext.get("dvchost"), Some(&e.host));
    assert_eq!(p.ext.get("cs1").map(String::as_str), e.agent.as_deref());
    assert_eq!(p.ext.get("cs2").map(String::as_str), e.vm.as_deref());
    assert_eq!(p.ext.get("dproc").map(String::as_str), e.comm.as_deref());
    assert_eq!(p.ext.get("filePath").map(String::as_str), e.path.as_deref());
    assert_eq!(p.ext.get("cn3"), e.ret.map(|r| r.to_string()).as_ref());
    assert_eq!(p.ext.get("dvcpid"), e.pid.map(|r| r.to_string()).as_ref());
    assert_eq!(
        p.header[4],
        format!("syscall:{}", e.syscall.as_deref().unwrap_or("?"))
    );
}

/// The events of one JSONL file. The recorder may be mid-write: only complete lines
/// count.
fn complete_events(path: &Path) -> Vec<AuditEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("every JSONL line parses"))
        .collect()
}

/// The sequence numbers of what a SIEM received, in arrival order.
fn siem_seqs(got: &[cef::Parsed]) -> Vec<u64> {
    got.iter()
        .filter_map(|p| p.ext.get("externalId").and_then(|s| s.parse().ok()))
        .collect()
}

/// In order, no duplicates, no hole.
fn assert_consecutive(seqs: &[u64], what: &str) {
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}");
    }
}

#[test]
fn cef_reaches_rsyslog_over_tcp_and_udp_and_a_siem_outage_loses_nothing() {
    if cannot_trace() || no_rsyslog() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let siem = tempfile::tempdir().expect("tempdir");
    let (tcp, udp) = (free_port(), free_port());
    let mut rs = Rsyslog::start(siem.path(), tcp, udp);
    let d = Daemon::start(
        state.path(),
        &[
            "--syslog",
            &format!("tcp://127.0.0.1:{tcp}"),
            "--syslog",
            &format!("udp://127.0.0.1:{udp}"),
        ],
    );
    let work = tempfile::tempdir().expect("tempdir");
    // A name with every character CEF escapes.
    let comm = "w|k=v\\x\ny";
    let mut w = Workload::spawn(5, work.path(), comm);
    d.watch(w.pid(), "agent-cef", "vm-1");
    w.go();
    let pid = w.pid();
    let events = || -> Vec<AuditEvent> {
        d.events()
            .into_iter()
            .filter(|e| e.pid == Some(pid))
            .collect()
    };
    wait_until(
        Duration::from_secs(20),
        "all events over TCP and UDP",
        || {
            let n = events().len();
            n > 0
                && rs.received("tcp").len() >= n
                && rs
                    .received("udp")
                    .iter()
                    .filter(|p| p.ext.get("dvcpid") == Some(&pid.to_string()))
                    .count()
                    >= n
        },
    );
    let by_seq: BTreeMap<String, AuditEvent> = events()
        .into_iter()
        .map(|e| (e.seq.to_string(), e))
        .collect();
    for which in ["tcp", "udp"] {
        let got = rs.received(which);
        let mut matched = 0;
        for p in &got {
            if let Some(e) = p.ext.get("externalId").and_then(|s| by_seq.get(s)) {
                same_fields(p, e);
                matched += 1;
            }
        }
        assert_eq!(matched, by_seq.len(), "{which}: every event arrived once");
    }
    let failing = rs
        .received("tcp")
        .into_iter()
        .find(|p| {
            p.ext
                .get("filePath")
                .is_some_and(|f| f.contains("missing|"))
        })
        .expect("the failing openat arrived");
    assert_eq!(failing.ext["dproc"], comm);
    assert_eq!(failing.ext["cs2"], "vm-1");
    assert_eq!(failing.ext["cn3"], "-2");

    // The SIEM goes away; the agent keeps working; the SIEM comes back.
    let before = rs.received("tcp").len();
    rs.stop();
    let mut w2 = Workload::spawn(200, work.path(), "gap");
    d.watch(w2.pid(), "agent-cef", "vm-2");
    w2.go();
    let gap_pid = w2.pid();
    w.finish();
    w2.finish();
    wait_until(
        Duration::from_secs(10),
        "a backlog while the SIEM is down",
        || d.metric("clawos_monitor_siem_backlog_bytes") > 0,
    );
    std::thread::sleep(Duration::from_millis(500));
    rs.resume(tcp);
    let all = d.events();
    let gap: Vec<u64> = all
        .iter()
        .filter(|e| e.pid == Some(gap_pid))
        .map(|e| e.seq)
        .collect();
    assert!(gap.len() > 200, "the gap workload's events: {}", gap.len());
    let last = *gap.last().expect("gap events");
    wait_until(Duration::from_secs(30), "the gap delivered", || {
        rs.received("tcp")
            .iter()
            .any(|p| p.ext.get("externalId") == Some(&last.to_string()))
    });
    let seqs = siem_seqs(&rs.received("tcp"));
    assert!(seqs.len() > before);
    // In order, no duplicates, and no hole: every JSONL event up to the last gap event
    // arrived exactly once over TCP.
    assert_consecutive(&seqs, "TCP stream out of order, duplicated or with a hole");
    assert_eq!(seqs.first(), all.first().map(|e| e.seq).as_ref());
    assert!(seqs.contains(&last));
    assert_eq!(d.metric("clawos_monitor_siem_dropped_total"), 0);
}

#[test]
fn a_burst_beyond_the_ring_buffer_is_counted_and_reported_and_the_daemon_lives_on() {
    if cannot_trace() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    // 8 KiB of ring: a few dozen events.
    let d = Daemon::start(state.path(), &["--ring-bytes", "8192"]);
    let work = tempfile::tempdir().expect("tempdir");
    let n = 200_000;
    let mut w = Workload::spawn(n, work.path(), "burst");
    d.watch(w.pid(), "agent-burst", "vm-b");
    w.go();
    let pid = w.pid();
    w.finish();
    wait_until(Duration::from_secs(10), "a drops report", || {
        d.events().iter().any(|e| e.kind == Kind::Drops)
    });
    // The workload has exited: wait until the recorder has drained the ring and
    // reported every drop (the trail stops growing).
    let mut last_len = 0;
    wait_until(Duration::from_secs(20), "the trail to settle", || {
        std::thread::sleep(Duration::from_millis(200));
        let len = d.events().len();
        let settled = len == last_len;
        last_len = len;
        settled
    });
    let events = d.events();
    let reported: u64 = events
        .iter()
        .filter(|e| e.kind == Kind::Drops)
        .map(|e| e.dropped.unwrap_or(0))
        .sum();
    let total = events
        .iter()
        .filter_map(|e| e.dropped_total)
        .max()
        .unwrap_or(0);
    assert_eq!(reported, total, "each report carries the new drops");
    let seen = events
        .iter()
        .filter(|e| e.pid == Some(pid) && e.syscall.as_deref() == Some("getppid"))
        .count() as u64;
    assert!(seen < u64::from(n), "the ring should have overflowed");
    assert!(
        seen + total >= u64::from(n),
        "every getppid is either recorded or counted as dropped: {seen} + {total}"
    );
    assert_eq!(d.metric("clawos_monitor_kernel_drops_total"), total);
    for w in events.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "user space lost nothing it was handed"
        );
    }
    assert_eq!(
        http("GET", &format!("{}/healthz", d.url), None, None).0,
        200
    );
    // Still recording after the burst.
    let mut again = Workload::spawn(3, work.path(), "after");
    d.watch(again.pid(), "agent-burst", "vm-b");
    again.go();
    let apid = again.pid();
    again.finish();
    wait_until(Duration::from_secs(10), "events after the burst", || {
        d.events().iter().any(|e| e.pid == Some(apid))
    });
}

#[test]
fn the_api_needs_the_operator_credential_and_validates_watches() {
    if cannot_trace() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(state.path(), &[]);
    let url = format!("{}/v1/watch", d.url);
    let body = r#"{"pid":1,"agent":"a"}"#;
    let (status, text) = http("POST", &url, None, Some(body));
    assert_eq!(status, 401);
    // Every error is the one ClawOS error body, with the request's id.
    let error_of = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).expect("an error body");
        assert_eq!(
            v["error"]["request_id"].as_str().map(str::len),
            Some(32),
            "{v}"
        );
        v["error"]["code"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(error_of(&text), "unauthorized");
    let (status, text) = http("GET", &format!("{}/v1/nothing", d.url), None, None);
    assert_eq!((status, error_of(&text).as_str()), (404, "not_found"));
    let (status, text) = http(
        "DELETE",
        &format!("{url}?pid=4000000"),
        Some(&d.token),
        None,
    );
    assert_eq!((status, error_of(&text).as_str()), (404, "not_found"));
    assert_eq!(http("POST", &url, Some("wrong"), Some(body)).0, 401);
    assert_eq!(
        http("GET", &format!("{}/v1/events", d.url), None, None).0,
        401
    );
    for bad in [
        r#"{"agent":"a"}"#,
        r#"{"pid":1,"agent":"a b"}"#,
        r#"{"pid":4000000000,"agent":"a"}"#,
        r#"{"cgroup":"/etc","agent":"a"}"#,
        r#"{"pid":1,"agent":"a","extra":1}"#,
    ] {
        let (status, text) = http("POST", &url, Some(&d.token), Some(bad));
        assert!(status == 400 || status == 422, "{bad}: {status} {text}");
        assert_eq!(error_of(&text), "invalid_request", "{bad}");
    }
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(state.path().join("monitor/admin.token"))
            .expect("token")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);
}

#[test]
fn the_typed_client_uses_the_daemons_routes_and_error_codes() {
    if cannot_trace() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(state.path(), &[]);
    let mut sleeper = Command::new("sleep").arg("30").spawn().expect("sleep");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = clawos_monitor_api::MonitorClient::new(&d.url, &d.token);
    let req = clawos_monitor_api::WatchRequest {
        pid: Some(sleeper.id()),
        cgroup: None,
        agent: "typed".into(),
        vm: Some("vm-typed".into()),
    };
    rt.block_on(client.watch(&req)).expect("watch");
    assert_eq!(rt.block_on(client.watches()).expect("list"), vec![req]);
    rt.block_on(client.events(Some("typed"), 0, 10))
        .expect("events");
    rt.block_on(client.unwatch_pid(sleeper.id()))
        .expect("unwatch");
    let e = rt
        .block_on(client.unwatch_pid(sleeper.id()))
        .expect_err("no such watch any more");
    assert_eq!((e.status(), e.code()), (Some(404), "not_found"), "{e}");
    let wrong = clawos_monitor_api::MonitorClient::new(&d.url, "wrong");
    let e = rt.block_on(wrong.watches()).expect_err("wrong token");
    assert_eq!((e.status(), e.code()), (Some(401), "unauthorized"), "{e}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn a_full_siem_spool_drops_the_oldest_counts_them_and_reports_them() {
    if cannot_trace() || no_rsyslog() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let siem = tempfile::tempdir().expect("tempdir");
    let (tcp, udp) = (free_port(), free_port());
    // Nothing listens on `tcp` yet: the SIEM is down from the start.
    let d = Daemon::start(
        state.path(),
        &[
            "--syslog",
            &format!("tcp://127.0.0.1:{tcp}"),
            "--spool-max-bytes",
            "16384",
        ],
    );
    let work = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::spawn(500, work.path(), "spool");
    d.watch(w.pid(), "agent-spool", "vm-s");
    w.go();
    w.finish();
    let reported = || -> u64 {
        d.events()
            .iter()
            .filter(|e| e.kind == Kind::ForwardDrops)
            .map(|e| e.dropped.unwrap_or(0))
            .sum()
    };
    // The forwarder may skip in several steps; wait until every skip is reported.
    wait_until(Duration::from_secs(10), "the drop reports", || {
        let r = reported();
        r > 0 && d.metric("clawos_monitor_siem_dropped_total") == r
    });
    let reported = reported();
    assert!(
        reported > 400,
        "most of ~600 events could not be kept: {reported}"
    );
    assert!(d.metric("clawos_monitor_siem_backlog_bytes") <= 16384);
    // The SIEM comes up: it gets what was kept, including the drop report, up to the
    // last event of the trail.
    let rs = Rsyslog::start(siem.path(), tcp, udp);
    let last = d.events().last().map(|e| e.seq).expect("events");
    wait_until(
        Duration::from_secs(20),
        "the last event at the SIEM",
        || {
            rs.received("tcp")
                .iter()
                .any(|p| p.ext.get("externalId") == Some(&last.to_string()))
        },
    );
    let got = rs.received("tcp");
    assert!(
        got.iter()
            .any(|p| p.header[4] == "forward-drops" && p.ext.contains_key("cnt")),
        "the drop report reached the SIEM"
    );
    let seqs = siem_seqs(&got);
    assert_consecutive(&seqs, "what was kept arrives in order, once");
    assert_eq!(seqs.last(), Some(&last));
    assert_eq!(d.metric("clawos_monitor_siem_dropped_total"), reported);
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certs(dir: &Path) -> bool {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]) && run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=other CA",
        "-keyout",
        "other.key",
        "-out",
        "other.pem",
    ])
}

#[test]
fn cef_over_tls_reaches_rsyslog_and_an_untrusted_siem_gets_nothing() {
    if cannot_trace() || no_rsyslog() {
        return;
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists() {
        skip(
            "rsyslog's TLS driver is not installed (rsyslog-gnutls; scripts/setup.sh installs it)",
        );
        return;
    }
    let siem = tempfile::tempdir().expect("tempdir");
    if !make_certs(siem.path()) {
        skip("openssl could not make test certificates");
        return;
    }
    let port = free_port();
    let d = siem.path().display();
    let conf = siem.path().join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            r#"global(workDirectory="{d}" maxMessageSize="16k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{d}/ca.pem"
       defaultNetstreamDriverCertFile="{d}/server.pem"
       defaultNetstreamDriverKeyFile="{d}/server.key")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
template(name="msgonly" type="string" string="%msg%\n")
ruleset(name="tls") {{ action(type="omfile" file="{d}/tls.log" template="msgonly" flushOnTXEnd="on" asyncWriting="off") }}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="tls")
"#
        ),
    )
    .expect("conf");
    let mut rs = Rsyslog {
        child: None,
        conf,
        dir: siem.path().to_owned(),
    };
    rs.resume(port);

    // Trusting another CA: the handshake fails, nothing is sent, the backlog waits.
    let state = tempfile::tempdir().expect("tempdir");
    let target = format!("tls://127.0.0.1:{port}");
    let other = siem.path().join("other.pem");
    let bad = Daemon::start(
        state.path(),
        &[
            "--syslog",
            &target,
            "--syslog-ca",
            other.to_str().expect("utf8"),
        ],
    );
    let work = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::spawn(3, work.path(), "tls-bad");
    bad.watch(w.pid(), "agent-tls", "vm-t");
    w.go();
    w.finish();
    wait_until(Duration::from_secs(10), "failed handshakes", || {
        bad.metric("clawos_monitor_siem_backlog_bytes") > 0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(bad.metric("clawos_monitor_siem_sent_total"), 0);
    assert!(rs.received("tls").is_empty());
    drop(bad);

    // The right CA: every event arrives, fields intact.
    let state = tempfile::tempdir().expect("tempdir");
    let ca = siem.path().join("ca.pem");
    let good = Daemon::start(
        state.path(),
        &[
            "--syslog",
            &target,
            "--syslog-ca",
            ca.to_str().expect("utf8"),
        ],
    );
    let mut w = Workload::spawn(3, work.path(), "tls|x=y");
    good.watch(w.pid(), "agent-tls", "vm-t");
    w.go();
    let pid = w.pid();
    w.finish();
    wait_until(Duration::from_secs(20), "events over TLS", || {
        let n = good.events().iter().filter(|e| e.pid == Some(pid)).count();
        n > 0 && rs.received("tls").len() >= n
    });
    let by_seq: BTreeMap<String, AuditEvent> = good
        .events()
        .into_iter()
        .filter(|e| e.pid == Some(pid))
        .map(|e| (e.seq.to_string(), e))
        .collect();
    let got = rs.received("tls");
    for p in &got {
        let e = &by_seq[&p.ext["externalId"]];
        same_fields(p, e);
    }
    assert_eq!(got.len(), by_seq.len());
    assert!(got.iter().all(|p| p.ext["dproc"] == "tls|x=y"));
}

#[test]
fn watches_survive_a_daemon_restart_and_those_of_ended_processes_do_not() {
    if cannot_trace() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::spawn(4, work.path(), "survivor");
    {
        let d = Daemon::start(state.path(), &[]);
        d.watch(w.pid(), "agent-r", "vm-r");
        // A watch on a process that then exits: not re-applied later.
        let gone = Workload::spawn(1, work.path(), "gone");
        d.watch(gone.pid(), "agent-g", "vm-g");
        gone.finish();
    } // SIGKILL
    let d = Daemon::start(state.path(), &[]);
    let (_, list) = http("GET", &format!("{}/v1/watch", d.url), Some(&d.token), None);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).expect("watch list");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["agent"], "agent-r");
    w.go();
    let pid = w.pid();
    w.finish();
    wait_for_end_marker(&d, pid);
    let events = d.events();
    let window = marked(&events, pid);
    assert_eq!(
        window
            .iter()
            .filter(|e| e.syscall.as_deref() == Some("getppid"))
            .count(),
        4
    );
    assert!(window.iter().all(|e| e.agent.as_deref() == Some("agent-r")));
    // The sequence continues across the restart.
    for pair in events.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
    }
}

/// Every event in the trail: the rotated segments (oldest first), then the live file.
fn whole_trail(jsonl: &Path) -> Vec<AuditEvent> {
    clawos_monitor::trail::pieces(jsonl)
        .iter()
        .flat_map(|p| complete_events(&p.path))
        .collect()
}

#[test]
fn the_trail_rotates_without_losing_the_siems_place_or_the_numbering() {
    if cannot_trace() || no_rsyslog() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let siem = tempfile::tempdir().expect("tempdir");
    let (tcp, udp) = (free_port(), free_port());
    let mut rs = Rsyslog::start(siem.path(), tcp, udp);
    let d = Daemon::start(
        state.path(),
        &[
            "--syslog",
            &format!("tcp://127.0.0.1:{tcp}"),
            "--rotate-bytes",
            "65536",
            "--rotate-keep",
            "2",
        ],
    );
    // The SIEM is away while the trail rotates many times.
    rs.stop();
    let work = tempfile::tempdir().expect("tempdir");
    // Bursts apart in time: the recorder rotates after a flush.
    let mut pids = Vec::new();
    for _ in 0..8 {
        let mut w = Workload::spawn(400, work.path(), "rot");
        d.watch(w.pid(), "agent-rot", "vm-rot");
        w.go();
        pids.push(w.pid());
        w.finish();
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until(Duration::from_secs(20), "the workloads' events", || {
        let trail = whole_trail(&d.jsonl);
        pids.iter().all(|pid| {
            trail
                .iter()
                .filter(|e| e.pid == Some(*pid) && e.syscall.as_deref() == Some("getppid"))
                .count()
                == 400
        })
    });
    let segments = clawos_monitor::trail::segments(&d.jsonl);
    assert!(
        segments.len() > 2,
        "segments the forwarder has not read are kept beyond --rotate-keep: {}",
        segments.len()
    );
    let all = whole_trail(&d.jsonl);
    for pair in all.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "numbering across segments");
    }
    assert_eq!(all[0].seq, 1);
    let last = all.last().expect("events").seq;

    // The SIEM comes back: it gets every event, across every segment, in order, once.
    rs.resume(tcp);
    wait_until(Duration::from_secs(60), "the backlog delivered", || {
        rs.received("tcp")
            .iter()
            .any(|p| p.ext.get("externalId") == Some(&last.to_string()))
    });
    let seqs = siem_seqs(&rs.received("tcp"));
    assert_eq!(seqs.first(), Some(&1));
    assert_consecutive(&seqs, "out of order, duplicated or a hole");
    assert_eq!(d.metric("clawos_monitor_siem_dropped_total"), 0);

    // Once the forwarder is past them, old segments go at the next rotation.
    let mut w = Workload::spawn(600, work.path(), "rot2");
    d.watch(w.pid(), "agent-rot", "vm-rot");
    w.go();
    w.finish();
    wait_until(Duration::from_secs(30), "old segments pruned", || {
        clawos_monitor::trail::segments(&d.jsonl).len() <= 2
    });
    // A restarted daemon numbers on from the last event, even right after a rotation.
    let before = whole_trail(&d.jsonl).last().expect("events").seq;
    drop(d);
    let d = Daemon::start(state.path(), &["--rotate-bytes", "65536"]);
    let mut w = Workload::spawn(3, work.path(), "rot3");
    d.watch(w.pid(), "agent-rot", "vm-rot");
    w.go();
    let pid = w.pid();
    w.finish();
    wait_until(Duration::from_secs(20), "events after the restart", || {
        whole_trail(&d.jsonl).iter().any(|e| e.pid == Some(pid))
    });
    let first_new = whole_trail(&d.jsonl)
        .into_iter()
        .find(|e| e.seq > before)
        .expect("a new event");
    assert_eq!(first_new.seq, before + 1);
}
