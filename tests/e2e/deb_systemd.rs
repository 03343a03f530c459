//! The `clawos` Debian package under a real systemd: this machine's operating system
//! booted in a container (`systemd-nspawn`, systemd as its PID 1, its own network
//! namespace with only `lo`), on an overlay whose writes go to a tmpfs, so no file the
//! package writes reaches this machine's (the kernel is shared: monitor-daemon's eBPF
//! programs load into it while the container runs; nspawn's cgroups are removed again
//! when it ends). In it:
//!
//! 1. `dpkg -i` makes the users and `/var/lib/clawos`, enables `clawos.target` and
//!    starts nothing while the API key is missing, saying what to do;
//! 2. with the key and the image key in place, `systemctl start clawos.target` starts
//!    every daemon under its unit — each answers its health check, runs as its unit's
//!    user with no way to gain privileges — and the control plane's API reaches the
//!    launcher with the credential systemd handed it;
//! 3. `systemctl stop` drains them: each logs its SIGTERM and exits 0 on its own (no
//!    time-out, no SIGKILL), and no daemon process is left; started again, they reuse
//!    their state (the identity keys unsealed by the same master key);
//! 4. `apt-get remove` stops them and keeps the state; `apt-get purge` removes the
//!    state, the configuration and the users;
//! 5. installed once more with the key already there, `dpkg -i` starts the host itself.
//!
//! Root only (mounts, the container); refuses to run where a clawos package is
//! installed on the machine itself (the container starts from this machine's files).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clawos_e2e::show;

const TEST: &str = "the_package_runs_under_systemd_and_stop_drains_it";

/// The daemons of `clawos.target`: unit, health URL, the user its unit names.
const DAEMONS: [(&str, &str, &str); 6] = [
    (
        "clawos-identity-manager",
        "http://127.0.0.1:2082/healthz",
        "clawos-identity",
    ),
    (
        "clawos-inference-proxy",
        "http://127.0.0.1:11435/healthz",
        "clawos-proxy",
    ),
    (
        "clawos-skill-manager",
        "http://127.0.0.1:2083/healthz",
        "clawos-skills",
    ),
    ("clawos-monitor", "http://127.0.0.1:2084/healthz", "root"),
    (
        "clawos-vm-launcher",
        "http://127.0.0.1:2080/healthz",
        "root",
    ),
    (
        "clawos-orchestrator",
        "http://127.0.0.1:2081/healthz",
        "clawos-orchestrator",
    ),
];

/// Exits 1 when no ClawOS daemon runs in the container.
const DAEMON_PROCESSES: &str = "pgrep -f '^/usr/bin/(identity-manager|inference-proxy|skill-manager|monitor-daemon|vm-launcher|orchestrator|control-plane)'";

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// This machine's OS, booted under systemd-nspawn on a tmpfs-backed overlay. Dropping
/// it powers the container off and unmounts everything.
struct Container {
    /// Holds the mount points and the tmpfs.
    dir: tempfile::TempDir,
    nspawn: Option<Child>,
    /// The container's PID 1 (systemd), as this machine sees it.
    leader: u32,
}

/// Where systemd-nspawn makes the container's cgroups on a machine whose PID 1 is not
/// systemd (with `--keep-unit`, at the top of these hybrid-layout hierarchies, which
/// it needs to find mounted), and the cgroups it makes in each.
const NSPAWN_HIERARCHIES: [&str; 2] = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"];
const NSPAWN_CGROUPS: [&str; 3] = ["payload/init.scope", "payload", "supervisor"];

/// Whether `path` is a mount point now.
fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(path))
}

/// How long one command in the container may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(180);

impl Container {
    fn merged(&self) -> PathBuf {
        self.dir.path().join("merged")
    }

    fn boot() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (rw, merged) = (dir.path().join("rw"), dir.path().join("merged"));
        for d in [&rw, &merged] {
            std::fs::create_dir(d).map_err(|e| e.to_string())?;
        }
        let mut c = Self {
            dir,
            nspawn: None,
            leader: 0,
        };
        // The writable layer on a tmpfs of its own: a file system apart from `/`, so
        // the overlay's layers do not overlap, and everything written is gone with it.
        let o = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "mode=0755,size=2g", "clawos-test"])
            .arg(&rw));
        if !o.status.success() {
            return Err(format!("mounting a tmpfs: {}", show(&o)));
        }
        for d in ["upper", "work"] {
            std::fs::create_dir(rw.join(d)).map_err(|e| e.to_string())?;
        }
        let o = run(Command::new("mount")
            .args(["-t", "overlay", "clawos-test", "-o"])
            .arg(format!(
                "lowerdir=/,upperdir={},workdir={}",
                rw.join("upper").display(),
                rw.join("work").display()
            ))
            .arg(&merged));
        if !o.status.success() {
            return Err(format!("mounting the overlay: {}", show(&o)));
        }
        let log =
            std::fs::File::create(c.dir.path().join("console.log")).map_err(|e| e.to_string())?;
        let child = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(&merged)
            .args([
                "--machine=clawos-test",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=passive",
                // monitor-daemon loads eBPF programs: what its unit grants it must be
                // there to grant.
                "--capability=CAP_BPF,CAP_PERFMON",
                "--system-call-filter=bpf perf_event_open",
                "--boot",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("systemd-nspawn: {e}"))?;
        let nspawn_pid = child.id();
        c.nspawn = Some(child);
        // The container's PID 1: the descendant of nspawn that has become systemd
        // (nspawn's helper children come and go before it).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = descendant_named(nspawn_pid, "systemd") {
                c.leader = pid;
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the container did not start: {}", c.console()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Until its manager socket is up, systemctl cannot even ask (and `--wait` does
        // not wait for that): ask again until it answers that booting is over.
        let deadline = Instant::now() + Duration::from_secs(180);
        let state = loop {
            let o = c.sh("systemctl is-system-running");
            let state = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if ["running", "degraded", "maintenance", "stopping"].contains(&state.as_str()) {
                break state;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the container's systemd is still {state:?} ({}): {}",
                    String::from_utf8_lossy(&o.stderr).trim(),
                    c.console()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if state != "running" && state != "degraded" {
            return Err(format!(
                "the container's systemd is {state:?}: {}",
                c.console()
            ));
        }
        if state == "degraded" {
            // Units of this machine's own that cannot run in a container; not ours.
            eprintln!(
                "container degraded: {}",
                String::from_utf8_lossy(&c.sh("systemctl --failed --no-legend").stdout)
            );
        }
        Ok(c)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// `nsenter` into every namespace of the container's PID 1, ready for a command.
    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a", "--"]);
        c
    }

    /// Runs a shell command in the container (all its namespaces, as its root, with an
    /// environment of its own, not the test's); fails the test if it outlives
    /// [`COMMAND_LIMIT`].
    fn sh(&self, script: &str) -> Output {
        clawos_e2e::deadline::output_within(
            self.nsenter()
                .args([
                    "env",
                    "-i",
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                    "LC_ALL=C",
                ])
                .args(["DEBIAN_FRONTEND=noninteractive", "sh", "-c", script]),
            None,
            COMMAND_LIMIT,
            || clawos_e2e::deadline::tail(&self.console(), 6000).to_owned(),
        )
    }

    /// Whether a check in the container said no (exit 1), as opposed to failing to
    /// run at all (which fails the test).
    fn says_no(&self, script: &str) -> bool {
        let o = self.sh(script);
        assert!(
            o.status.success() || o.status.code() == Some(1),
            "{script} did not run: {}",
            show(&o)
        );
        o.status.code() == Some(1)
    }

    /// Runs a shell command in the container; asserts it succeeded; its stdout.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(o.status.success(), "{script}: {}", show(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A unit's property, as `systemctl show` gives it.
    fn property(&self, unit: &str, name: &str) -> String {
        self.ok(&format!("systemctl show -p {name} --value {unit}"))
            .trim()
            .to_owned()
    }

    /// Polls `check` until it holds; fails with `what` and the units' journals.
    fn wait_until(&self, what: &str, limit: Duration, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "{what} within {limit:?}:\n{}",
                self.journals()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn journals(&self) -> String {
        String::from_utf8_lossy(
            &self
                .sh("systemctl --no-pager --all list-units 'clawos*'; journalctl --sync; journalctl --no-pager -n 200 -u 'clawos*'")
                .stdout,
        )
        .into_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            if self.leader == 0 {
                self.leader = descendant_named(child.id(), "systemd").unwrap_or(0);
            }
            if self.leader != 0 {
                // Not `sh`: it panics on its time limit, and a panic while the test
                // is already failing aborts the process with the container running.
                if let Ok(mut ask) = self
                    .nsenter()
                    .args(["systemctl", "poweroff", "--no-block"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                {
                    let asked = Instant::now();
                    while matches!(ask.try_wait(), Ok(None))
                        && asked.elapsed() < Duration::from_secs(10)
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let _ = ask.kill();
                    let _ = ask.wait();
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if matches!(child.try_wait(), Ok(None)) {
                // Killing nspawn alone would leave the container running; its PID 1
                // killed, the kernel ends every process in its PID namespace.
                if self.leader != 0 {
                    // SAFETY: kill takes plain integers; the pid is the container's
                    // init, found under our nspawn child, which has not been reaped.
                    unsafe { libc::kill(self.leader as i32, libc::SIGKILL) };
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // The cgroups nspawn made for the container (empty once it ended).
        for h in NSPAWN_HIERARCHIES {
            for cg in NSPAWN_CGROUPS {
                let _ = std::fs::remove_dir(Path::new(h).join(cg));
            }
        }
        let merged = self.merged();
        let rw = self.dir.path().join("rw");
        let mut left = false;
        for m in [&merged, &rw] {
            let done = |lazy: bool| {
                let mut cmd = Command::new("umount");
                if lazy {
                    cmd.arg("-l");
                }
                cmd.arg(m).status().is_ok_and(|s| s.success())
            };
            if !done(false) && !done(true) {
                left |= mounted(&m.display().to_string());
            }
        }
        if left {
            // Deleting the directory would walk through a live overlay of `/`: keep it.
            if let Ok(spare) = tempfile::tempdir() {
                let kept = std::mem::replace(&mut self.dir, spare).keep();
                eprintln!("{} is still mounted; left in place", kept.display());
            }
        }
    }
}

/// The first descendant of `pid` whose command is `comm`.
fn descendant_named(pid: u32, comm: &str) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find_map(|child: u32| {
            let name = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if name.trim() == comm {
                Some(child)
            } else {
                descendant_named(child, comm)
            }
        })
}

/// The stand-in Anthropic API key the test gives the package.
const API_KEY: &str = "sk-ant-not-a-real-key";

/// What the package asks the operator for: the API key (0600, in the credentials
/// directory) and the image signing public key (in `clawos.env`).
fn put_keys(c: &Container, public: &str) {
    c.ok(&format!(
        "mkdir -p /etc/clawos/credentials && umask 077 && \
         printf {API_KEY} > /etc/clawos/credentials/anthropic-api-key && \
         echo CLAWOS_SIGNING_PUBKEY={public} >> /etc/clawos/clawos.env"
    ));
}

/// Asserts that `unit`'s main process runs as `user` and cannot gain privileges;
/// returns its pid.
fn runs_as(c: &Container, unit: &str, user: &str) -> String {
    let pid = c.property(unit, "MainPID");
    let status = c.ok(&format!("cat /proc/{pid}/status"));
    let uid = c.ok(&format!("id -u {user}"));
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(uid.trim())),
        "{unit} runs as {user}: {status}"
    );
    assert!(
        status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "{unit} cannot gain privileges: {status}"
    );
    pid
}

fn all_healthy(c: &Container) -> bool {
    DAEMONS.iter().all(|(unit, url, _)| {
        c.property(unit, "ActiveState") == "active"
            && c.sh(&format!("curl -fsS -m 2 -o /dev/null {url}"))
                .status
                .success()
    })
}

fn none_active(c: &Container, units: &[&str]) -> bool {
    units
        .iter()
        .all(|u| c.property(u, "ActiveState") == "inactive")
}

#[test]
fn the_package_runs_under_systemd_and_stop_drains_it() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        clawos_test_skip::record(TEST, "mounting and booting a container needs root");
        return;
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("dpkg-deb", "dpkg"),
        ("nsenter", "util-linux"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            clawos_test_skip::record(
                TEST,
                &format!("{tool} is not installed (Debian package {package})"),
            );
            return;
        }
    }
    let o = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "clawos"]));
    let status = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        !(status.contains("ok installed")
            || status.contains("config-files")
            || Path::new("/var/lib/clawos").exists()
            || Path::new("/etc/clawos").exists()),
        "clawos ({status:?}) or its state is on this machine; the container starts from \
         its files: run this test elsewhere"
    );

    let work = tempfile::tempdir().expect("tmp");
    let deb = clawos_e2e::build_deb(work.path());

    let started = Instant::now();
    let c = Container::boot().unwrap_or_else(|e| panic!("booting the container: {e}"));
    clawos_e2e::measured(&format!(
        "systemd container booted in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(
        c.ok("cat /proc/1/comm").trim(),
        "systemd",
        "systemd is the container's PID 1"
    );
    let inside = c.merged().join("root/clawos.deb");
    std::fs::copy(&deb, &inside).expect("copy the package in");

    // 1. Installed without the API key: users, state, the target enabled, nothing
    // started, and the operator told what is missing.
    let out = c.ok("dpkg -i /root/clawos.deb 2>&1");
    assert!(
        out.contains("/etc/clawos/credentials/anthropic-api-key"),
        "{out}"
    );
    assert_eq!(c.property("clawos.target", "UnitFileState"), "enabled");
    for (unit, _, _) in DAEMONS {
        assert_eq!(c.property(unit, "ActiveState"), "inactive", "{unit}");
    }

    // 2. The keys in place, the target started: every daemon healthy under its unit.
    let key = c.ok("clawos keygen --out /root/signing.key --json");
    let key: serde_json::Value = serde_json::from_str(&key).expect("keygen json");
    let public = key["public_key"].as_str().expect("public_key").to_owned();
    put_keys(&c, &public);
    let t = Instant::now();
    c.ok("systemctl start clawos.target");
    c.wait_until(
        "every daemon of clawos.target active and healthy",
        Duration::from_secs(60),
        all_healthy,
    );
    clawos_e2e::measured(&format!(
        "systemctl start clawos.target: six daemons healthy in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let mut pids = Vec::new();
    for (unit, _, user) in DAEMONS {
        pids.push(runs_as(&c, unit, user));
    }
    // The unit's users own their state; the API key is the proxy's credential only.
    let owner = c.ok("stat -c %U /var/lib/clawos/identity/identity.db");
    assert_eq!(owner.trim(), "clawos-identity");
    let proxy_pid = c.property("clawos-inference-proxy", "MainPID");
    let env = c.ok(&format!("tr '\\0' '\\n' < /proc/{proxy_pid}/environ"));
    assert!(
        env.contains("ANTHROPIC_API_KEY_FILE=/run/credentials/clawos-inference-proxy.service/"),
        "{env}"
    );
    assert!(!env.contains(API_KEY), "the key is not in the environment");
    // The control plane (not started by the target; enabled as the README says)
    // reaches the launcher with the credential its unit loads.
    c.ok("systemctl enable --now clawos-control-plane");
    c.wait_until(
        "the control plane answering over TLS",
        Duration::from_secs(30),
        |c| {
            c.sh("curl -fsSk -m 2 -o /dev/null https://127.0.0.1:8080/healthz")
                .status
                .success()
        },
    );
    let vms = c.ok(
        "curl -fsSk -m 5 -H \"Authorization: Bearer $(cat /var/lib/clawos/control-plane/admin.token)\" \
         https://127.0.0.1:8080/api/v1/vms",
    );
    assert_eq!(
        vms.trim(),
        "[]",
        "the launcher's VM list through the control plane"
    );
    pids.push(runs_as(&c, "clawos-control-plane", "clawos-control-plane"));
    // The operator's CLI as root, as `sudo` runs it (no CLAWOS_STATE_DIR, no state of
    // root's own): it finds the packaged host's credential by itself.
    c.ok("rm -rf /root/.clawos");
    let listed = c.ok("env -u CLAWOS_STATE_DIR clawos vm list --json");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&listed).ok(),
        Some(serde_json::json!([])),
        "clawos vm list as root on the packaged host: {listed}"
    );
    // The package's tmpfiles made the credentials' directory root's alone.
    assert_eq!(
        c.ok("stat -c '%a %U' /etc/clawos/credentials").trim(),
        "700 root"
    );

    // 3. systemctl stop drains: each daemon ends on its own after SIGTERM, exit 0.
    let mut units: Vec<&str> = DAEMONS.iter().map(|(u, _, _)| *u).collect();
    units.push("clawos-control-plane");
    let t = Instant::now();
    c.ok("systemctl stop clawos.target clawos-control-plane");
    c.wait_until("every daemon stopped", Duration::from_secs(60), |c| {
        none_active(c, &units)
    });
    let drained = t.elapsed();
    for unit in &units {
        let (result, code, status) = (
            c.property(unit, "Result"),
            c.property(unit, "ExecMainCode"),
            c.property(unit, "ExecMainStatus"),
        );
        // ExecMainCode 1 is CLD_EXITED: it exited, it was not killed.
        assert_eq!(
            (result.as_str(), code.as_str(), status.as_str()),
            ("success", "1", "0"),
            "{unit} ended on its own with 0:\n{}",
            c.journals()
        );
        let log = c.ok(&format!(
            "journalctl --sync; journalctl --no-pager -u {unit}"
        ));
        assert!(log.contains("SIGTERM: draining"), "{unit}: {log}");
        assert!(!log.contains("SIGKILL"), "{unit}: {log}");
    }
    for pid in &pids {
        assert!(
            c.says_no(&format!("kill -0 {pid} 2>/dev/null")),
            "daemon pid {pid} is gone"
        );
    }
    assert!(
        c.says_no(DAEMON_PROCESSES),
        "nothing left running: {}",
        c.ok("ps -ef")
    );
    clawos_e2e::measured(&format!(
        "systemctl stop: seven daemons drained in {:.2} s",
        drained.as_secs_f64()
    ));
    // Started again: the same state, the identity keys unsealed by the same master key.
    c.ok("systemctl start clawos.target");
    c.wait_until(
        "every daemon healthy again",
        Duration::from_secs(60),
        all_healthy,
    );
    let log = c.ok("journalctl --sync; journalctl --no-pager -u clawos-identity-manager");
    assert_eq!(
        log.matches("created a new master key").count(),
        1,
        "the master key is made once and reused: {log}"
    );

    // 4. remove: stopped, binaries gone, state kept; purge: state, configuration and
    // users gone.
    c.ok("apt-get remove -y -qq clawos 2>&1");
    assert!(none_active(&c, &units), "{}", c.journals());
    assert!(c.says_no("test -e /usr/bin/vm-launcher"));
    c.ok("test -s /var/lib/clawos/identity/identity.db && test -s /etc/clawos/credentials/anthropic-api-key && id clawos-proxy");
    c.ok("apt-get purge -y -qq clawos 2>&1");
    for gone in [
        "test -e /var/lib/clawos",
        "test -e /etc/clawos",
        "id clawos-proxy 2>/dev/null",
    ] {
        assert!(c.says_no(gone), "after purge: {gone}");
    }

    // 5. Installed with the keys already there: the package starts the host itself.
    put_keys(&c, &public);
    c.ok("dpkg -i --force-confold /root/clawos.deb 2>&1");
    c.wait_until(
        "the package's own start: every daemon healthy",
        Duration::from_secs(60),
        all_healthy,
    );
    c.ok("apt-get purge -y -qq clawos 2>&1");
    assert!(none_active(&c, &units), "{}", c.journals());
    assert!(
        c.says_no(DAEMON_PROCESSES),
        "nothing left running: {}",
        c.ok("ps -ef")
    );
}
