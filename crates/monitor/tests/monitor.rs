//! monitor-daemon end to end: the real eBPF program in this kernel, real processes
//! making known syscalls, a real rsyslog on loopback as the SIEM.
//!
//! Needs root (or CAP_BPF + CAP_PERFMON), a kernel with BTF, python3 for the workload
//! and rsyslogd for the SIEM tests; each test says loudly why it skips otherwise.

use clawos_test_ports::free_port;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
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

/// Records the skip (as `clawos-monitor`) and returns `true`, so a caller can
/// `return skip(...)` from a check.
fn skip(why: &str) -> bool {
    clawos_test_skip::record("clawos-monitor", why);
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

struct Daemon {
    child: Child,
    url: String,
    token: String,
    jsonl: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(state: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(state, extra, &[])
    }

    fn start_with_env(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        // Log lines and panics both go to stderr; stdout too, should anything print there.
        let log = std::fs::File::create(state.join("daemon.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_monitor-daemon"))
            .args(["--state-dir"])
            .arg(state)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
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
            log: state.join("daemon.log"),
        }
    }

    /// Waits until `n` of the daemon's lines on stderr contain every one of `parts`.
    fn wait_for_log(&self, parts: &[&str], n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = log
                .lines()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .count();
            if found >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {found} of {n} lines with {parts:?} in\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
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

    /// The value of the unlabelled metric `name` in `/metrics`, as text. A failed
    /// scrape (a dead daemon) or a missing metric fails the test: read as 0, they would
    /// make every `== 0` check pass without looking at anything.
    fn scrape(&self, name: &str) -> String {
        let (status, text) = http("GET", &format!("{}/metrics", self.url), None, None);
        assert_eq!(status, 200, "GET {}/metrics failed: {text:?}", self.url);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
            .trim()
            .to_owned()
    }

    /// A counter (or a gauge that cannot go below 0) from `/metrics`.
    fn metric(&self, name: &str) -> u64 {
        let v = self.scrape(name);
        v.parse()
            .unwrap_or_else(|e| panic!("{name}: {v:?} is not a count ({e})"))
    }

    /// A gauge from `/metrics`.
    fn gauge(&self, name: &str) -> i64 {
        let v = self.scrape(name);
        v.parse()
            .unwrap_or_else(|e| panic!("{name}: {v:?} is not a number ({e})"))
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

/// Whether `e` is `pid`'s end-marker open (its workload's last traced syscall).
fn is_end_marker(e: &AuditEvent, pid: u32) -> bool {
    e.pid == Some(pid)
        && e.path
            .as_deref()
            .is_some_and(|p| p.ends_with("/end-marker"))
}

/// Waits until the trail holds `pid`'s end-marker open (its workload is recorded).
fn wait_for_end_marker(d: &Daemon, pid: u32) {
    wait_until(
        Duration::from_secs(10),
        "the end marker in the JSONL",
        || d.events().iter().any(|e| is_end_marker(e, pid)),
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
    // The TCP forwarder has noticed the SIEM is gone (its own line says so), so what
    // follows is a reconnect, not a connection that never broke.
    let tcp_target = format!("target=tcp://127.0.0.1:{tcp}");
    d.wait_for_log(
        &["SIEM connection lost", &tcp_target],
        1,
        "the TCP forwarder to lose the SIEM",
    );
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
    // The workload has exited, so the kernel's drop count is final. A second watched
    // workload runs after it: once its end marker is in the trail the recorder has
    // drained everything the ring held before it (the ring is first in, first out), and
    // the drop report it writes after each drain, before the flush that made the marker
    // visible, carries every drop.
    let mut end = Workload::spawn(0, work.path(), "after-burst");
    d.watch(end.pid(), "agent-burst", "vm-b");
    end.go();
    wait_for_end_marker(&d, end.pid());
    end.finish();
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
    // The forwarder's failed connects are debug lines: on for this daemon.
    let bad = Daemon::start_with_env(
        state.path(),
        &[
            "--syslog",
            &target,
            "--syslog-ca",
            other.to_str().expect("utf8"),
        ],
        &[("RUST_LOG", "info,clawos_monitor::forward=debug")],
    );
    let work = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::spawn(3, work.path(), "tls-bad");
    bad.watch(w.pid(), "agent-tls", "vm-t");
    w.go();
    w.finish();
    wait_until(Duration::from_secs(10), "a backlog", || {
        bad.metric("clawos_monitor_siem_backlog_bytes") > 0
    });
    // Two handshakes were tried and refused the server's certificate (the second one
    // after a back-off), and nothing went out.
    let target_field = format!("target={target}");
    bad.wait_for_log(
        &["SIEM unreachable", &target_field, "certificate"],
        2,
        "two failed handshakes",
    );
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

/// A line of skill-manager's audit trail, as skill-manager writes it.
fn skill_record(skill: &str, agent: &str, allowed: bool) -> String {
    use clawos_skill_manager_api::{CallerKind, RecordKind, RequestSummary, SkillCallRecord};
    let r = SkillCallRecord {
        time: "2026-12-02T10:00:00.5Z".into(),
        kind: RecordKind::SkillCall,
        skill: skill.into(),
        version: "0.1.0".into(),
        caller: CallerKind::Agent,
        agent: Some(agent.into()),
        vm_id: Some(format!("{agent}-1764669600")),
        ok: allowed,
        error: (!allowed).then(|| "request to evil.example:443 refused".into()),
        refused: None,
        refused_unrecorded_before: None,
        aborted: false,
        duration_ms: 4,
        input_bytes: 17,
        output_bytes: 120,
        requests: vec![RequestSummary {
            destination: if allowed {
                "http://127.0.0.1:8888".into()
            } else {
                "https://evil.example:443".into()
            },
            allowed,
            status: allowed.then_some(200),
            bytes: if allowed { 100 } else { 0 },
        }],
        log: vec!["info: searched".into()],
    };
    let mut line = serde_json::to_string(&r).expect("record");
    line.push('\n');
    line
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open");
    f.write_all(text.as_bytes()).expect("append");
}

#[test]
fn skill_calls_reach_the_trail_and_the_siem_once_each_across_a_kill() {
    if cannot_trace() || no_rsyslog() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let siem = tempfile::tempdir().expect("tempdir");
    let (tcp, udp) = (free_port(), free_port());
    let rs = Rsyslog::start(siem.path(), tcp, udp);
    let skills_audit = state.path().join("skills/audit.jsonl");
    std::fs::create_dir_all(skills_audit.parent().expect("dir")).expect("skills dir");
    // Calls made before the daemon ever ran are followed too.
    append(&skills_audit, &skill_record("web-search", "agent-s", true));
    let syslog = format!("tcp://127.0.0.1:{tcp}");
    let skill_events = |d: &Daemon| -> Vec<AuditEvent> {
        d.events()
            .into_iter()
            .filter(|e| e.kind == Kind::SkillCall)
            .collect()
    };
    {
        let d = Daemon::start(state.path(), &["--syslog", &syslog]);
        append(&skills_audit, &skill_record("web-search", "agent-s", false));
        wait_until(
            Duration::from_secs(10),
            "two skill calls in the trail",
            || skill_events(&d).len() == 2,
        );
        let got = skill_events(&d);
        let c = got[1].skill_call.as_ref().expect("skill_call");
        assert_eq!(got[1].agent.as_deref(), Some("agent-s"));
        assert_eq!(c.outcome, "failed");
        assert_eq!(c.vm_id.as_deref(), Some("agent-s-1764669600"));
        assert!(!c.requests[0].allowed);
        assert_eq!(got[1].ts, "2026-12-02T10:00:00.5Z", "the call's own time");
        assert_eq!(
            got[1].source.map(|p| p.offset),
            Some(std::fs::metadata(&skills_audit).expect("meta").len())
        );
        wait_until(
            Duration::from_secs(10),
            "two skill calls at the SIEM",
            || {
                rs.received("tcp")
                    .iter()
                    .filter(|p| p.header[4] == "skill:web-search")
                    .count()
                    == 2
            },
        );
        let refused = rs
            .received("tcp")
            .into_iter()
            .find(|p| p.ext.get("act").map(String::as_str) == Some("failed"))
            .expect("the failed call at the SIEM");
        assert_eq!(
            refused.header[6], "7",
            "a refused destination is severity 7"
        );
        assert_eq!(refused.ext["cs1"], "agent-s");
        assert_eq!(refused.ext["request"], "https://evil.example:443 refused");
        assert_eq!(refused.ext["msg"], "request to evil.example:443 refused");
        assert_eq!(d.metric("clawos_monitor_skill_calls_total"), 2);
    } // SIGKILL

    // While the daemon is away: two more calls and a line that is no record.
    append(&skills_audit, &skill_record("web-search", "agent-t", true));
    append(&skills_audit, "{\"kind\": \"something else\"}\n");
    append(&skills_audit, &skill_record("fetch", "agent-t", true));
    let d = Daemon::start(state.path(), &["--syslog", &syslog]);
    wait_until(
        Duration::from_secs(10),
        "five skill events in the trail",
        || skill_events(&d).len() >= 5,
    );
    std::thread::sleep(Duration::from_millis(500));
    let got = skill_events(&d);
    let names: Vec<String> = got
        .iter()
        .map(|e| {
            e.skill_call.as_ref().map_or_else(
                || "?".into(),
                |c| format!("{}/{}", c.skill, e.agent.as_deref().unwrap_or("-")),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "web-search/agent-s",
            "web-search/agent-s",
            "web-search/agent-t",
            "?",
            "fetch/agent-t"
        ],
        "each record once, in order, across the kill"
    );
    assert!(
        got[3].detail.as_deref().is_some_and(
            |d| d.starts_with("unreadable skill-manager audit record: not a skill call record")
        ),
        "{:?}",
        got[3].detail
    );
    assert_eq!(d.metric("clawos_monitor_skill_records_unreadable_total"), 1);
    let place: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(state.path().join("monitor/skills.place")).expect("place file"),
    )
    .expect("place");
    assert_eq!(
        place["offset"],
        std::fs::metadata(&skills_audit).expect("meta").len()
    );
    wait_until(
        Duration::from_secs(10),
        "five skill events at the SIEM",
        || {
            rs.received("tcp")
                .iter()
                .filter(|p| p.header[4].starts_with("skill:"))
                .count()
                >= 5
        },
    );
    let seqs: Vec<u64> = siem_seqs(
        &rs.received("tcp")
            .into_iter()
            .filter(|p| p.header[4].starts_with("skill:"))
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        seqs,
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        "the SIEM got each skill event once"
    );
    // What the skill logged stays in skill-manager's trail.
    assert!(
        !std::fs::read_to_string(&d.jsonl)
            .expect("trail")
            .contains("searched")
    );
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
    // Bursts apart in time: the recorder rotates after a flush, and each burst starts
    // once the one before is flushed (its end marker is in the trail).
    let mut pids = Vec::new();
    for _ in 0..8 {
        let mut w = Workload::spawn(400, work.path(), "rot");
        d.watch(w.pid(), "agent-rot", "vm-rot");
        w.go();
        let pid = w.pid();
        pids.push(pid);
        w.finish();
        wait_until(Duration::from_secs(10), "the burst's end marker", || {
            whole_trail(&d.jsonl).iter().any(|e| is_end_marker(e, pid))
        });
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

// ---------------------------------------------------------------------------------
// Hostile guests on the guest socket (issue 12, item 4). A guest's audit stream is
// driven here without a VM: a connection to `<state>/monitor/guest.sock` carrying the
// header line vm-launcher's relay sends, then the frames `clawos-audit` would send.
// Everything after the header is the guest's to choose.
// ---------------------------------------------------------------------------------

use std::os::unix::net::UnixStream;

use clawos_syscall_probe::RawEvent;
use clawos_syscall_probe::stream::{self, Frame};

/// What starting the daemon needs (the guest-stream tests run no workload).
fn cannot_run_daemon() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("monitor tests load eBPF programs and need root");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return skip("the kernel has no BTF (/sys/kernel/btf/vmlinux)");
    }
    false
}

/// A record as a guest's `clawos-audit` ships it: `comm` names it, and with `path` it
/// is the 192-byte form.
fn guest_record(comm: &str, path: bool) -> Vec<u8> {
    let mut r = vec![
        0u8;
        if path {
            RawEvent::SIZE
        } else {
            RawEvent::HEAD_SIZE
        }
    ];
    r[20..24].copy_from_slice(&110i32.to_ne_bytes()); // getppid
    let c = comm.as_bytes();
    r[80..80 + c.len().min(15)].copy_from_slice(&c[..c.len().min(15)]);
    if path {
        r[96..96 + 40].copy_from_slice(&[b'f'; 40]);
    }
    r
}

/// A relayed guest stream: the relay's header line for `vm`, then the guest's bytes.
struct Guest {
    conn: UnixStream,
}

impl Guest {
    /// Connects and sends the relay's header line only.
    fn header_only(state: &Path, token: &str, vm: &str) -> Self {
        let conn = UnixStream::connect(clawos_monitor_api::guest_socket_path(state))
            .expect("guest socket");
        let header = clawos_monitor_api::GuestStreamHeader {
            token: token.trim().to_owned(),
            agent: vm.to_owned(),
            vm: vm.to_owned(),
        };
        let mut line = serde_json::to_vec(&header).expect("header");
        line.push(b'\n');
        let mut g = Self { conn };
        g.conn.write_all(&line).expect("header");
        g
    }

    /// Header and hello: a stream as a guest opens it.
    fn open(state: &Path, token: &str, vm: &str, boot: &str) -> Self {
        let mut g = Self::header_only(state, token, vm);
        let mut hello = Vec::new();
        Frame::Hello {
            version: stream::VERSION,
            boot_id: boot.into(),
            clock_offset_ns: 0,
        }
        .encode(&mut hello);
        g.conn.write_all(&hello).expect("hello");
        g
    }

    /// Sends events `seqs`, each named `comm`.
    fn send(&mut self, seqs: impl IntoIterator<Item = u64>, comm: &str) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for seq in seqs {
            Frame::Event {
                seq,
                record: guest_record(comm, false),
            }
            .encode(&mut buf);
        }
        self.conn.write_all(&buf)
    }

    /// Whether the daemon closed this connection within `limit` (acknowledgements it
    /// sent before are read and ignored).
    fn closed_within(&mut self, limit: Duration) -> bool {
        use std::io::Read;
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.conn.set_read_timeout(Some(left));
            match self.conn.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

const BOOT_A: &str = "0a0a0a0a-0000-4000-8000-00000000000a";
const BOOT_B: &str = "0b0b0b0b-0000-4000-8000-00000000000b";

/// The guest sequence numbers of `vm`'s syscall events, in trail order.
fn guest_seqs(trail: &[AuditEvent], vm: &str) -> Vec<u64> {
    trail
        .iter()
        .filter(|e| e.vm.as_deref() == Some(vm) && e.kind == Kind::Syscall)
        .filter_map(|e| e.guest_seq)
        .collect()
}

/// The per-VM quota the flood tests run with: 100 events/s, 64 KiB/s, 1 s of burst.
/// Against `--rotate-bytes 65536 --rotate-keep 8` a flooding guest can write at most
/// ~100 + 100/s events (≤ 64 KiB + 64 KiB/s): far less than the 512 KiB retained.
const FLOOD_QUOTA: &[&str] = &[
    "--guest-events-per-sec",
    "100",
    "--guest-bytes-per-sec",
    "65536",
    "--guest-burst-secs",
    "1",
];

/// One flood (or 2,000 connections) at a time: this binary runs two tests at once, and
/// two of these side by side would take both cores for seconds, so that what each
/// times (another VM's stream recorded "at once") would measure the other.
fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// VM A writes forged records for `secs`, in bursts (`paced`) or as fast as the
/// daemon reads them; returns how many it sent.
fn flood(state: &Path, token: &str, secs: u64, paced: bool) -> u64 {
    let mut a = Guest::open(state, token, "vm-a", BOOT_A);
    let start = Instant::now();
    let mut seq = 0u64;
    let mut buf = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        buf.clear();
        for _ in 0..512 {
            seq += 1;
            Frame::Event {
                seq,
                record: guest_record("forged", true),
            }
            .encode(&mut buf);
        }
        if a.conn.write_all(&buf).is_err() {
            break;
        }
        // Bursts of 512 every 50 ms (~10,000 a second, 100 times the quota), as a
        // guest's queue sends them: slow enough that even an unoptimised recorder
        // finishes batches, and rotates, while the flood goes on.
        if paced {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    seq
}

/// The quota lines of `vm` (guest_drops whose detail says quota) and what they count.
fn quota_dropped(trail: &[AuditEvent], vm: &str) -> u64 {
    trail
        .iter()
        .filter(|e| {
            e.kind == Kind::GuestDrops
                && e.vm.as_deref() == Some(vm)
                && e.detail.as_deref().is_some_and(|d| d.contains("quota"))
        })
        .map(|e| e.dropped.unwrap_or(0))
        .sum()
}

#[test]
fn a_guest_flooding_forged_records_is_held_to_its_quota_and_other_vms_history_stays() {
    let _heavy = heavy();
    if cannot_run_daemon() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mut args = vec!["--rotate-bytes", "65536", "--rotate-keep", "8"];
    args.extend_from_slice(FLOOD_QUOTA);
    let d = Daemon::start(state.path(), &args);
    // VM B's history: 20 events, in the trail before the flood.
    let mut b = Guest::open(state.path(), &d.token, "vm-b", BOOT_B);
    b.send(1..=20, "b-before").expect("send");
    wait_until(Duration::from_secs(10), "VM B's events", || {
        guest_seqs(&whole_trail(&d.jsonl), "vm-b").len() == 20
    });
    // VM A floods at full speed.
    let started = Instant::now();
    let sent = flood(state.path(), &d.token, 3, true);
    assert!(sent > 10_000, "the flood was a flood: {sent}");
    // The flood's last event is in the trail, written or reported as over quota.
    wait_until(
        Duration::from_secs(30),
        "the flood's end in the trail",
        || {
            whole_trail(&d.jsonl)
                .iter()
                .any(|e| e.vm.as_deref() == Some("vm-a") && e.guest_seq == Some(sent))
        },
    );
    let elapsed = started.elapsed().as_secs() + 1;
    assert_eq!(
        guest_seqs(&whole_trail(&d.jsonl), "vm-b"),
        (1..=20).collect::<Vec<_>>(),
        "VM B's history survived VM A's flood"
    );
    // Every forged event is either written or counted as over quota (the last
    // report comes within a second).
    wait_until(
        Duration::from_secs(5),
        "every flood event accounted for",
        || {
            let trail = whole_trail(&d.jsonl);
            guest_seqs(&trail, "vm-a").len() as u64 + quota_dropped(&trail, "vm-a") == sent
        },
    );
    let trail = whole_trail(&d.jsonl);
    let written = guest_seqs(&trail, "vm-a").len() as u64;
    let dropped = quota_dropped(&trail, "vm-a");
    assert!(
        written <= 100 + 100 * elapsed,
        "VM A wrote {written} events in {elapsed} s, beyond its quota"
    );
    assert!(dropped > 0, "the excess is reported");
    assert_eq!(
        d.metric("clawos_monitor_guest_quota_dropped_total"),
        dropped
    );
    assert_eq!(quota_dropped(&trail, "vm-b"), 0);
    // The quota lines themselves are few (at most about one a second).
    let lines = trail
        .iter()
        .filter(|e| e.kind == Kind::GuestDrops && e.vm.as_deref() == Some("vm-a"))
        .count() as u64;
    assert!(lines <= 2 * elapsed + 2, "{lines} quota lines");
    // VM B is still heard, at once.
    let t = Instant::now();
    b.send(21..=25, "b-after").expect("send");
    wait_until(Duration::from_secs(5), "VM B after the flood", || {
        guest_seqs(&whole_trail(&d.jsonl), "vm-b").len() == 25
    });
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    for pair in whole_trail(&d.jsonl).windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "numbering across segments");
    }
}

#[test]
fn a_guest_flood_while_the_siem_is_away_does_not_push_other_vms_events_out_of_the_spool() {
    let _heavy = heavy();
    if cannot_run_daemon() || no_rsyslog() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let siem = tempfile::tempdir().expect("tempdir");
    let (tcp, udp) = (free_port(), free_port());
    let target = format!("tcp://127.0.0.1:{tcp}");
    let mut args = vec![
        "--syslog",
        &target,
        "--spool-max-bytes",
        "1048576",
        "--rotate-bytes",
        "65536",
        "--rotate-keep",
        "2",
    ];
    args.extend_from_slice(FLOOD_QUOTA);
    // The SIEM is away from the start: everything below is unshipped.
    let d = Daemon::start(state.path(), &args);
    let mut b = Guest::open(state.path(), &d.token, "vm-b", BOOT_B);
    b.send(1..=20, "b-before").expect("send");
    wait_until(Duration::from_secs(10), "VM B's events", || {
        guest_seqs(&whole_trail(&d.jsonl), "vm-b").len() == 20
    });
    let b_seqs: Vec<u64> = whole_trail(&d.jsonl)
        .iter()
        .filter(|e| e.vm.as_deref() == Some("vm-b"))
        .map(|e| e.seq)
        .collect();
    let sent = flood(state.path(), &d.token, 3, true);
    wait_until(
        Duration::from_secs(30),
        "the flood's end in the trail",
        || {
            whole_trail(&d.jsonl)
                .iter()
                .any(|e| e.vm.as_deref() == Some("vm-a") && e.guest_seq == Some(sent))
        },
    );
    // The SIEM comes back: it gets VM B's events, and nothing was skipped.
    let rs = Rsyslog::start(siem.path(), tcp, udp);
    let last = d.events().last().map(|e| e.seq).expect("events");
    wait_until(Duration::from_secs(30), "the backlog at the SIEM", || {
        rs.received("tcp")
            .iter()
            .any(|p| p.ext.get("externalId") == Some(&last.to_string()))
    });
    let got = siem_seqs(&rs.received("tcp"));
    for s in &b_seqs {
        assert!(got.contains(s), "VM B's event {s} reached the SIEM");
    }
    assert_eq!(got.first(), Some(&1));
    assert_consecutive(&got, "out of order, duplicated or a hole");
    assert_eq!(d.metric("clawos_monitor_siem_dropped_total"), 0);
}

#[test]
fn a_second_stream_for_a_vm_replaces_the_first_and_each_event_is_recorded_once_in_order() {
    if cannot_run_daemon() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(state.path(), &[]);
    let vm = "vm-r";
    let mut first = Guest::open(state.path(), &d.token, vm, BOOT_A);
    first.send(1..=10, "first").expect("send");
    wait_until(Duration::from_secs(10), "the first stream's events", || {
        guest_seqs(&d.events(), vm).len() == 10
    });
    // The guest opens more connections for the same VM through its relay and leaves
    // them open, then one more that goes on where the first left off (re-sending 6..10,
    // as a reconnecting guest re-sends what was not yet acknowledged).
    let mut extra: Vec<Guest> = (0..20)
        .map(|_| Guest::open(state.path(), &d.token, vm, BOOT_A))
        .collect();
    let t = Instant::now();
    let mut last = Guest::open(state.path(), &d.token, vm, BOOT_A);
    last.send(6..=30, "last").expect("send");
    wait_until(
        Duration::from_secs(20),
        "the newest stream's events",
        || guest_seqs(&d.events(), vm).len() == 30,
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the newest stream waited {:?} behind the older ones",
        t.elapsed()
    );
    // Only the newest stream is open: the daemon closed the others.
    assert!(
        first.closed_within(Duration::from_secs(3)),
        "the replaced stream is still open"
    );
    for (i, g) in extra.iter_mut().enumerate() {
        assert!(
            g.closed_within(Duration::from_secs(1)),
            "extra stream {i} is still open"
        );
    }
    // What the replaced connections send now goes nowhere: the daemon closed them, so
    // the socket refuses it (EPIPE) and there is nothing to wait for.
    for (which, g) in [("first", &mut first), ("extra", &mut extra[0])] {
        let e = g
            .send(31..=40, "stale")
            .expect_err("a replaced stream's socket still takes events");
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{which}: {e}");
    }
    last.send(31..=35, "last").expect("send");
    wait_until(Duration::from_secs(10), "the newest stream goes on", || {
        guest_seqs(&d.events(), vm).len() == 35
    });
    let events = d.events();
    assert_eq!(
        guest_seqs(&events, vm),
        (1..=35).collect::<Vec<_>>(),
        "each event once, in order"
    );
    assert!(
        events
            .iter()
            .all(|e| e.comm.as_deref() != Some("stale") && e.kind != Kind::GuestDrops),
        "nothing from a replaced stream, no gap"
    );
}

/// Threads of process `pid` (`/proc/PID/status`); a process that is gone fails the
/// test rather than counting 0 threads.
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e} (the daemon is gone?)"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no thread count in /proc/{pid}/status:\n{status}"))
}

/// Raises this process's open-file limit to its hard limit (the daemon inherits it).
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

#[test]
fn two_thousand_idle_guest_connections_cost_no_threads_and_keep_no_vm_out() {
    let _heavy = heavy();
    if cannot_run_daemon() {
        return;
    }
    if raise_nofile() < 4500 {
        skip("the open-file limit is below 4500; cannot open 2,000 connections");
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(state.path(), &["--guest-handshake-secs", "3"]);
    let pid = d.child.id();
    let before = threads(pid);
    // 1,000 connections that say nothing, 1,000 that send the relay's header for one
    // VM and then nothing.
    let mut idle: Vec<UnixStream> = Vec::new();
    for i in 0..2000 {
        if i % 2 == 0 {
            idle.push(
                UnixStream::connect(clawos_monitor_api::guest_socket_path(state.path()))
                    .expect("connect"),
            );
        } else {
            idle.push(Guest::header_only(state.path(), &d.token, "vm-idle").conn);
        }
    }
    // All 2,000 accepted: each is in its handshake or already closed (the pending cap
    // and the one-per-VM rule close some at once).
    let idle_seen = || {
        i64::try_from(d.metric("clawos_monitor_guest_refused_total")).expect("count")
            + d.gauge("clawos_monitor_guest_pending_connections")
    };
    wait_until(
        Duration::from_secs(20),
        "2,000 connections accepted",
        || idle_seen() == 2000,
    );
    let during = threads(pid);
    assert!(
        during <= before + 4,
        "2,000 idle connections cost {} threads ({before} before)",
        during.saturating_sub(before)
    );
    // Another VM's real stream is taken and recorded at once.
    let t = Instant::now();
    let mut live = Guest::open(state.path(), &d.token, "vm-live", BOOT_B);
    live.send(1..=5, "live").expect("send");
    wait_until(Duration::from_secs(10), "the live VM's events", || {
        guest_seqs(&d.events(), "vm-live").len() == 5
    });
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the live stream took {:?}",
        t.elapsed()
    );
    assert!(threads(pid) <= before + 4);
    // Connections that never finish their handshake are closed after its timeout (3 s):
    // the daemon counts all 2,000 closed, and each one reads as closed here; the live
    // stream stays.
    wait_until(
        Duration::from_secs(20),
        "every idle connection closed",
        || {
            d.metric("clawos_monitor_guest_refused_total") == 2000
                && d.gauge("clawos_monitor_guest_pending_connections") == 0
        },
    );
    let mut open = 0;
    for c in &mut idle {
        let mut g = Guest {
            conn: c.try_clone().expect("clone"),
        };
        if !g.closed_within(Duration::from_millis(100)) {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "idle connections left open past the handshake timeout"
    );
    live.send(6..=7, "live")
        .expect("the live stream is still open");
    wait_until(Duration::from_secs(5), "the live VM's later events", || {
        guest_seqs(&d.events(), "vm-live").len() == 7
    });
}

#[test]
fn a_full_speed_guest_flood_does_not_hold_up_another_vms_stream() {
    let _heavy = heavy();
    if cannot_run_daemon() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(state.path(), FLOOD_QUOTA);
    let mut b = Guest::open(state.path(), &d.token, "vm-b", BOOT_B);
    b.send(1..=5, "b-before").expect("send");
    wait_until(Duration::from_secs(10), "VM B's events", || {
        guest_seqs(&d.events(), "vm-b").len() == 5
    });
    let flooder = {
        let (state, token) = (state.path().to_owned(), d.token.clone());
        std::thread::spawn(move || flood(&state, &token, 5, false))
    };
    // In the middle of the flood (VM A's forged records are being recorded), VM B's next
    // events are recorded within two seconds.
    wait_until(Duration::from_secs(10), "VM A's flood in the trail", || {
        !guest_seqs(&d.events(), "vm-a").is_empty()
    });
    let t = Instant::now();
    b.send(6..=10, "b-during").expect("send");
    wait_until(
        Duration::from_secs(30),
        "VM B's events during the flood",
        || guest_seqs(&d.events(), "vm-b").len() == 10,
    );
    let waited = t.elapsed();
    let sent = flooder.join().expect("flooder");
    assert!(sent > 10_000, "the flood was a flood: {sent}");
    // (Before the recorder's queue was fair: 4.8 s.)
    assert!(
        waited < Duration::from_secs(2),
        "VM B waited {waited:?} behind VM A's flood"
    );
}

/// The guest's own shipper (`clawos-audit`'s queue and connection loop) on a relayed
/// connection to the daemon's guest socket, as vm-launcher's relay makes it.
fn ship_to(state: &Path, token: &str, vm: &str, queue: &std::sync::Arc<clawos_guest_audit::Queue>) {
    let (state, token, vm, queue) = (
        state.to_owned(),
        token.to_owned(),
        vm.to_owned(),
        std::sync::Arc::clone(queue),
    );
    std::thread::spawn(move || {
        clawos_guest_audit::ship(
            &queue,
            BOOT_B,
            || {
                let g = Guest::header_only(&state, &token, &vm);
                Ok((g.conn.try_clone()?, g.conn))
            },
            |_| {},
        )
    });
}

#[test]
fn the_guests_own_shipper_gets_every_record_in_once_across_a_daemon_kill() {
    if cannot_run_daemon() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(state.path(), &[]);
    let queue = std::sync::Arc::new(clawos_guest_audit::Queue::new(1 << 20));
    for _ in 0..100 {
        queue.push(&guest_record("shipped", false));
    }
    queue.notify();
    ship_to(state.path(), &d.token, "vm-s", &queue);
    wait_until(
        Duration::from_secs(10),
        "100 records in and acknowledged",
        || guest_seqs(&d.events(), "vm-s").len() == 100 && queue.is_empty(),
    );
    // The daemon is killed; the guest goes on recording; the daemon comes back.
    drop(d);
    for _ in 0..50 {
        queue.push(&guest_record("while-down", true));
    }
    queue.notify();
    let d = Daemon::start(state.path(), &[]);
    wait_until(
        Duration::from_secs(20),
        "150 records in and acknowledged",
        || guest_seqs(&d.events(), "vm-s").len() == 150 && queue.is_empty(),
    );
    let events = d.events();
    assert_eq!(guest_seqs(&events, "vm-s"), (1..=150).collect::<Vec<_>>());
    assert!(events.iter().all(|e| e.kind != Kind::GuestDrops));
}
