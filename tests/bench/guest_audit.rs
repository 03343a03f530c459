//! What the guest-side syscall audit costs, on a real VM (QEMU TCG here) with
//! monitor-daemon taking the stream:
//! - per system call: a `getppid` loop inside the VM, audited (in the agent cgroup
//!   `clawos-audit` watches) vs the same process after it moved itself to the root
//!   cgroup (not watched), same run, alternating rounds;
//! - at boot: how long the guest agent waits for `clawos-audit` to attach (from the
//!   console);
//! - the rate the guest ships events to the host trail (events recorded per second of
//!   the audited loop).
//!
//! ```sh
//! cargo build --release --workspace && scripts/build-guest.sh
//! sudo cargo bench -p clawos-e2e --bench guest_audit [-- CALLS]
//! ```

use std::time::{Duration, Instant};

use clawos_e2e::{Launcher, can_audit_vms, port, start_monitor, static_c_program};

/// Times `calls` getppid calls audited, then unaudited, for `rounds` rounds each; prints
/// one line per round: `audited_ns unaudited_ns`.
const COST_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static double loop_ns(long calls) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < calls; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / calls;
}
static int move_to(const char *procs) {
    int fd = open(procs, O_WRONLY);
    if (fd < 0) return -1;
    int ok = write(fd, "0", 1) == 1;
    close(fd);
    return ok ? 0 : -1;
}
int main(int argc, char **argv) {
    long calls = atol(argv[1]);
    int rounds = atoi(argv[2]);
    for (int r = 0; r < rounds; r++) {
        if (move_to("/sys/fs/cgroup/agent/cgroup.procs")) return 3;
        double audited = loop_ns(calls);
        if (move_to("/sys/fs/cgroup/cgroup.procs")) return 4;
        double plain = loop_ns(calls);
        printf("%.0f %.0f\n", audited, plain);
    }
    return 0;
}
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !can_audit_vms("bench guest_audit") {
        return;
    }
    let calls: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let state = tempfile::tempdir().expect("tempdir");
    let bin = static_c_program(state.path(), "cost", COST_C).expect("workload");
    let mport = port();
    let monitor = start_monitor(state.path(), mport, "monitor.log").expect("monitor-daemon");
    let murl = format!("http://127.0.0.1:{mport}");
    let l = Launcher::start_with(state.path(), &[("CLAWOS_MONITOR_URL", &murl)]).expect("launcher");
    let o = l.clawos(&["vm", "start", "gab", "--mem", "256"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The hypervisor's own events are not what this measures.
    clawos_e2e::monitor_unwatch_all(state.path(), &murl).expect("unwatch");
    let console =
        std::fs::read_to_string(state.path().join("vms/gab/console.log")).unwrap_or_default();
    let attach = console
        .lines()
        .find_map(|l| l.strip_prefix("clawos-agent: syscall audit on ("))
        .unwrap_or("? ms)")
        .trim_end_matches(')');
    let o = l.clawos(&["vm", "cp", bin.to_str().expect("utf8"), "gab:cost"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = l.clawos(&["vm", "exec", "gab", "--", "chmod", "755", "/workspace/cost"]);
    assert!(o.status.success());
    let trail = state.path().join("monitor/audit.jsonl");
    let guest_lines = || {
        std::fs::read_to_string(&trail)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"guest_seq\"") && l.contains("\"getppid\""))
            .count()
    };
    let rounds = 5;
    let before = guest_lines();
    let t = Instant::now();
    let o = l.clawos(&[
        "vm",
        "exec",
        "gab",
        "--",
        "/workspace/cost",
        &calls.to_string(),
        &rounds.to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (mut audited, mut plain) = (Vec::new(), Vec::new());
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        audited.push(v[0]);
        plain.push(v[1]);
    }
    let want = before + (calls as usize) * rounds;
    let deadline = Instant::now() + Duration::from_secs(300);
    while guest_lines() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let shipped_s = t.elapsed().as_secs_f64();
    let got = guest_lines() - before;
    let (a, p) = (median(audited), median(plain));
    println!("guest getppid, {calls} calls x {rounds} rounds (TCG), medians:");
    println!("  not audited (root cgroup)   {p:>8.0} ns");
    println!(
        "  audited (agent cgroup)      {a:>8.0} ns  (+{:.0} ns, ratio {:.2})",
        a - p,
        a / p
    );
    println!("  clawos-audit attach at boot {attach}");
    println!(
        "  {got} of {} audited calls in the host trail, {:.0} events/s from exec start to the last one",
        (calls as usize) * rounds,
        got as f64 / shipped_s
    );
    let _ = l.clawos(&["vm", "stop", "gab"]);
    drop(monitor);
}
