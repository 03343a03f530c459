//! A hostile program inside a real VM opens 2,000 vsock connections to the host's LLM
//! relay and holds them. Each VM's relay admits a bounded number of connections and
//! closes the rest at once, so the launcher keeps its file descriptors: another VM's
//! LLM relay and the launcher's `/healthz` still answer within a second, and no VM
//! changes state.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clawos_e2e::{Launcher, can_boot_vms, can_use_vsock, is, port, runtime, static_c_program};
use clawos_vm_launcher_api::{StartVm, VmState};

/// Opens N vsock connections to host (CID 2) port 11435, sends nothing, holds them for
/// S seconds; prints how many the guest kernel saw connect and fail.
const FLOOD_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]), hold = atoi(argv[2]), ok = 0, failed = 0;
    struct rlimit r = { n + 64, n + 64 };
    setrlimit(RLIMIT_NOFILE, &r);
    for (int i = 0; i < n; i++) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) { failed++; continue; }
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = 11435 };
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) ok++; else { close(s); failed++; }
    }
    printf("%d %d\n", ok, failed);
    fflush(stdout);
    sleep(hold);
    return 0;
}
"#;

fn start(l: &Launcher, name: &str) {
    runtime()
        .block_on(l.client().start(&StartVm {
            name: name.into(),
            model: None,
            mem_mib: 256,
            vcpus: 1,
            image: None,
            snapshots: false,
            idempotency_key: None,
            token_budget: None,
        }))
        .expect("start");
}

/// One HTTP/1.1 request over a stream; the time to the status line.
fn http_get(mut s: impl Read + Write, host: &str, path: &str) -> (Duration, String) {
    let t = Instant::now();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("send");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).expect("answer");
    let line = String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    (t.elapsed(), line)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn a_guest_holding_2000_relay_connections_starves_no_one_else() {
    let name = "a_guest_holding_2000_relay_connections_starves_no_one_else";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let flood = static_c_program(work.path(), "flood", FLOOD_C).expect("flood program");

    // The relays' upstream: a real inference-proxy (its /healthz needs no agent).
    let tokens = work.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"agent-token":"a"}"#).expect("tokens");
    let px_port = port();
    let _proxy = clawos_e2e::KillOnDrop(
        clawos_e2e::spawn_proxy_with_static_tokens(
            &state,
            px_port,
            ("http://127.0.0.1:9", "sk-host"),
            &tokens,
            &[],
            &work.path().join("proxy.log"),
        )
        .expect("inference-proxy"),
    );
    let proxy_url = format!("http://127.0.0.1:{px_port}");
    // The relays attach each VM's token from identity-manager (without one they answer
    // 503 themselves, and the proxy would not be in the path).
    let (_identity, identity_url) =
        clawos_e2e::start_identity_manager(&state, &work.path().join("identity.log"))
            .expect("identity-manager");
    let l = Launcher::start_with(
        &state,
        &[
            ("CLAWOS_INFERENCE_PROXY_URL", &proxy_url),
            ("CLAWOS_IDENTITY_URL", &identity_url),
        ],
    )
    .expect("launcher");
    for n in ["hostile", "bystander"] {
        start(&l, n);
    }
    for n in ["hostile", "bystander"] {
        l.wait_for(n, Duration::from_secs(240), is(VmState::Running))
            .expect("running");
    }
    let o = l.clawos(&["vm", "cp", flood.to_str().expect("utf8"), "hostile:flood"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = l.clawos(&[
        "vm",
        "exec",
        "hostile",
        "--",
        "chmod",
        "755",
        "/workspace/flood",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let launcher_pid = l.child.as_ref().expect("launcher").id();
    let fds_before = open_fds(launcher_pid);

    let hold_secs = 40;
    let attacker = {
        let url = l.url.clone();
        let state = state.clone();
        std::thread::spawn(move || {
            std::process::Command::new(clawos_e2e::bin("clawos"))
                .args(["vm", "exec", "hostile", "--", "/workspace/flood", "2000"])
                .arg(hold_secs.to_string())
                .env("CLAWOS_LAUNCHER_URL", url)
                .env("CLAWOS_STATE_DIR", state)
                .output()
                .expect("run the flood")
        })
    };
    // The launcher is sampled while the flood is at its peak: once the relay has
    // refused a connection as over its limit, it holds as many as it ever will (and
    // with no limit, once the launcher holds 200 more descriptors, the bound below
    // fails).
    let peak = std::time::Instant::now();
    loop {
        let metrics = clawos_e2e::metrics_text(&l.url);
        let refused = clawos_e2e::metric(&metrics, "clawos_launcher_relay_refused_total");
        if refused > 0 || open_fds(launcher_pid) >= fds_before + 200 {
            break;
        }
        if attacker.is_finished() {
            let out = attacker.join().expect("attacker thread");
            panic!(
                "the flood ended and no connection was refused as over the limit: {}\n{metrics}",
                clawos_e2e::show(&out)
            );
        }
        assert!(
            peak.elapsed() < Duration::from_secs(120),
            "the flood ran 120 s and no connection was refused as over the limit:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let bystander_relay = clawos_e2e::vsock_dir(&state, "bystander").join("vsock.sock_11435");
    let launcher_addr = l.url.trim_start_matches("http://").to_owned();
    let mut worst_relay = Duration::ZERO;
    let mut worst_health = Duration::ZERO;
    let mut fds_during = 0;
    for _ in 0..20 {
        fds_during = fds_during.max(open_fds(launcher_pid));
        let s = std::os::unix::net::UnixStream::connect(&bystander_relay).expect("bystander relay");
        let (t, line) = http_get(s, &format!("127.0.0.1:{px_port}"), "/healthz");
        assert!(line.contains(" 200"), "the bystander's LLM relay: {line:?}");
        worst_relay = worst_relay.max(t);
        let s = std::net::TcpStream::connect(&launcher_addr).expect("launcher");
        let (t, line) = http_get(s, &launcher_addr, "/healthz");
        assert!(line.contains(" 200"), "launcher /healthz: {line:?}");
        worst_health = worst_health.max(t);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = attacker.join().expect("attacker thread");
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "flood: guest saw (connected failed) {printed:?}; launcher fds {fds_before} -> {fds_during}; worst bystander relay {worst_relay:?}, worst /healthz {worst_health:?}"
    );
    clawos_e2e::measured(&format!(
        "guest flood (2,000 held relay connections): worst of 20 through another VM's relay {worst_relay:?}, launcher /healthz {worst_health:?}; launcher descriptors {fds_before} -> {fds_during}"
    ));
    // Served, not starved: a second is hundreds of times what each takes (about 2 ms
    // here), and far less than a starved relay or API would (it would not answer).
    assert!(
        worst_relay < Duration::from_secs(1),
        "another VM's LLM relay took {worst_relay:?}"
    );
    assert!(
        worst_health < Duration::from_secs(1),
        "the launcher's /healthz took {worst_health:?}"
    );
    assert!(
        fds_during < fds_before + 200,
        "the launcher holds {fds_during} descriptors (had {fds_before}): the guest's connections are not bounded"
    );
    let vms = runtime().block_on(l.client().list()).expect("list");
    for v in &vms {
        assert_eq!(
            v.state,
            VmState::Running,
            "{v:?} changed state under the flood"
        );
    }
}
