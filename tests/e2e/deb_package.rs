//! The `clawos` Debian package (`packaging/deb/build.sh`), installed on this machine
//! with dpkg and taken out again with apt: what it installs and where, the daemons'
//! users and the state directory its maintainer scripts make, an installed daemon
//! running as its unit says (as its own user `clawos-identity`, writing its own
//! directory), `apt-get remove` keeping the state and `apt-get purge` removing it and
//! the users. The units are verified against
//! the installed binaries; `deb_systemd.rs` starts and stops them under a real systemd
//! (this machine's PID 1 is not systemd).
//!
//! Root only. It refuses to run on a machine where a clawos package or a
//! `/var/lib/clawos` is already there: it would purge them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use clawos_e2e::show;

const TEST: &str = "the_package_installs_runs_and_purges_cleanly";

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn installed() -> bool {
    let o = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "clawos"]));
    String::from_utf8_lossy(&o.stdout).contains("install ok installed")
}

/// Purges the package however the test ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "clawos"]).output();
    }
}

fn uid_of(user: &str) -> Option<u32> {
    let o = run(Command::new("id").args(["-u", user]));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .flatten()
}

#[test]
fn the_package_installs_runs_and_purges_cleanly() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        clawos_test_skip::record(TEST, "installing a Debian package needs root");
        return;
    }
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        clawos_test_skip::record(TEST, "dpkg-deb is not installed (a Debian machine has it)");
        return;
    }
    assert!(
        !installed() && !Path::new("/var/lib/clawos").exists(),
        "a clawos package or /var/lib/clawos is already on this machine: this test installs \
         and purges its own, and would delete them; run it elsewhere"
    );
    let work = tempfile::tempdir().expect("tmp");
    let deb = clawos_e2e::build_deb(work.path());
    let fields = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .args(["Package", "Depends"]));
    let fields = String::from_utf8_lossy(&fields.stdout).into_owned();
    assert!(fields.contains("Package: clawos"), "{fields}");
    assert!(fields.contains("qemu-system-x86"), "{fields}");

    let _purge = Purge;
    let o = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(o.status.success(), "dpkg -i: {}", show(&o));
    assert!(installed());
    // What it tells the operator is still to do.
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/etc/clawos/credentials/anthropic-api-key"),
        "{}",
        show(&o)
    );
    for b in [
        "clawos",
        "identity-manager",
        "inference-proxy",
        "skill-manager",
        "monitor-daemon",
        "vm-launcher",
        "orchestrator",
        "control-plane",
        "vhost-device-vsock",
    ] {
        let p = Path::new("/usr/bin").join(b);
        let mode = std::fs::metadata(&p).map(|m| m.permissions().mode());
        assert_eq!(mode.ok().map(|m| m & 0o777), Some(0o755), "{}", p.display());
    }
    let o = run(Command::new("/usr/bin/clawos").arg("--version"));
    assert!(o.status.success(), "{}", show(&o));

    // The users and the state directory, as sysusers and tmpfiles made them: root's
    // directory, each daemon's own inside it.
    let uid = uid_of("clawos-identity").expect("identity-manager's user exists");
    for u in [
        "clawos-proxy",
        "clawos-skills",
        "clawos-orchestrator",
        "clawos-control-plane",
    ] {
        let other = uid_of(u).unwrap_or_else(|| panic!("{u} exists"));
        assert_ne!(other, uid, "{u} is a user of its own");
    }
    let state = std::fs::metadata("/var/lib/clawos").expect("/var/lib/clawos");
    assert_eq!((state.mode() & 0o777, state.uid()), (0o755, 0));
    let identity = std::fs::metadata("/var/lib/clawos/identity").expect("identity dir");
    assert_eq!((identity.mode() & 0o777, identity.uid()), (0o700, uid));
    let launcher = std::fs::metadata("/var/lib/clawos/launcher").expect("launcher dir");
    assert_eq!((launcher.mode() & 0o777, launcher.uid()), (0o700, 0));

    // The units, verified against the installed binaries.
    let units: Vec<String> = std::fs::read_dir("/usr/lib/systemd/system")
        .expect("units dir")
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains("/clawos"))
        .collect();
    assert_eq!(units.len(), 8, "seven services and the target: {units:?}");
    let o = run(Command::new("systemd-analyze").arg("verify").args(&units));
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "verify: {}",
        show(&o)
    );

    // identity-manager as its unit runs it (its user, /var/lib/clawos), on a free port:
    // it comes up and writes its own directory.
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/clawos-identity-manager.service")
        .expect("unit");
    assert!(
        unit.contains("User=clawos-identity\nGroup=clawos"),
        "{unit}"
    );
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let port = clawos_e2e::port();
    let exec = exec.replace("127.0.0.1:2082", &format!("127.0.0.1:{port}"));
    let mut words = exec.split_whitespace();
    // Killed if the test fails on the way: a daemon left running as its user would make
    // the purge's `userdel` fail, and every later run with it.
    let mut daemon = clawos_e2e::KillOnDrop(
        Command::new("setpriv")
            .args([
                "--reuid=clawos-identity",
                "--regid=clawos",
                "--clear-groups",
                "--",
            ])
            .arg(words.next().expect("binary"))
            .args(words)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(work.path().join("identity.log")).expect("log"))
            .spawn()
            .expect("setpriv"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://127.0.0.1:{port}/healthz");
    while !run(Command::new("curl").args(["-fsS", "-o", "/dev/null", &url]))
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "identity-manager did not come up: {}",
            std::fs::read_to_string(work.path().join("identity.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill() with the pid of a child we spawned.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let _ = daemon.0.wait();
    let db = std::fs::metadata("/var/lib/clawos/identity/identity.db").expect("its database");
    assert_eq!(db.uid(), uid, "written as its user");
    assert_eq!(db.mode() & 0o077, 0, "nobody else reads it");

    // remove: the binaries go, the state and the configuration stay.
    let o = run(Command::new("apt-get").args(["remove", "-y", "-qq", "clawos"]));
    assert!(o.status.success(), "apt-get remove: {}", show(&o));
    assert!(!Path::new("/usr/bin/clawos").exists());
    assert!(!Path::new("/usr/lib/systemd/system/clawos-vm-launcher.service").exists());
    assert!(
        Path::new("/var/lib/clawos/identity/identity.db").exists(),
        "state kept"
    );
    assert!(
        Path::new("/etc/clawos/clawos.env").exists(),
        "configuration kept"
    );
    assert!(uid_of("clawos-identity").is_some());

    // purge: the state, the configuration and the user go too.
    let o = run(Command::new("apt-get").args(["purge", "-y", "-qq", "clawos"]));
    assert!(o.status.success(), "apt-get purge: {}", show(&o));
    assert!(!installed());
    assert!(!Path::new("/var/lib/clawos").exists(), "state removed");
    assert!(!Path::new("/etc/clawos").exists(), "configuration removed");
    assert!(uid_of("clawos-identity").is_none(), "users removed");
    assert!(uid_of("clawos-control-plane").is_none(), "users removed");
}
