//! The launcher's VM state machine on the fake hypervisor: every transition (start,
//! ready, pause, resume, stop, kill after the stop timeout, crash, failed boot, boot
//! timeout, snapshot, restore, delete, re-adoption after a launcher restart) and
//! concurrent requests on one VM, idempotent starts (a key recorded per VM: a retry
//! answers the VM, concurrent retries boot once, the key outlives a launcher restart),
//! in milliseconds and without QEMU; then property tests over random request sequences.
//!
//! The image each fake VM "boots" is a real signed bundle, verified as usual.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_image::manifest::files;
use clawos_vm_launcher::backend::fake::{FakeGuest, FakeHypervisor};
use clawos_vm_launcher::host::ProcessId;
use clawos_vm_launcher::store::VmDir;
use clawos_vm_launcher::{Config, Launcher, LauncherError};
use clawos_vm_launcher_api::{StartVm, VmState};
use proptest::prelude::*;

/// A launcher's configuration over `state`, with timeouts short enough for tests.
fn config(state: &Path, image: &Path, pubkey: &str) -> Config {
    let mut cfg = common::raw_config(state, image, pubkey, 1)
        .validate()
        .expect("config");
    // Generous: the machine may be busy. Tests of the timeouts themselves shorten them.
    cfg.stop_timeout = Duration::from_secs(3);
    cfg.boot_timeout = Duration::from_secs(5);
    cfg.ready_probe_interval = Duration::from_millis(16);
    cfg.runtime_disk_mib = 4;
    cfg.workspace_disk_mib = 4;
    cfg
}

struct Host {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    image: PathBuf,
    pubkey: String,
    fake: Arc<FakeHypervisor>,
}

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let image = tmp.path().join("image");
        let pubkey = common::signed_bundle(&image);
        Self {
            state: tmp.path().join("state"),
            image,
            pubkey,
            fake: Arc::new(FakeHypervisor::default()),
            _tmp: tmp,
        }
    }

    /// A launcher over this host's state (a second call is a launcher restart).
    fn launcher(&self) -> Arc<Launcher> {
        self.launcher_with(|_| {})
    }

    /// The same, with changed settings.
    fn launcher_with(&self, change: impl FnOnce(&mut Config)) -> Arc<Launcher> {
        let mut cfg = config(&self.state, &self.image, &self.pubkey);
        change(&mut cfg);
        Launcher::new(cfg, self.fake.clone()).expect("launcher")
    }

    fn dir(&self, name: &str) -> VmDir {
        VmDir {
            root: self.state.join("vms").join(name),
        }
    }

    /// The fake VM's process, while its pid file names a live one.
    fn process(&self, name: &str) -> Option<ProcessId> {
        self.dir(name).read_pid().filter(ProcessId::is_alive)
    }

    /// Kills every fake VM left running (a test's end).
    fn kill_all(&self) {
        common::kill_fake_vms(&self.state);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn start_req(name: &str) -> StartVm {
    StartVm {
        name: name.into(),
        model: None,
        mem_mib: 128,
        vcpus: 1,
        image: None,
        snapshots: false,
        idempotency_key: None,
        token_budget: None,
    }
}

/// A start of `name` with idempotency key `key`.
fn keyed(name: &str, key: &str) -> StartVm {
    StartVm {
        idempotency_key: Some(key.into()),
        ..start_req(name)
    }
}

/// Waits until `name` is in a state `done` accepts; returns that state.
async fn settle(l: &Launcher, name: &str, done: impl Fn(VmState) -> bool) -> VmState {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = l.get(name).expect("vm").state;
        if done(s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{name} stuck in {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// `/proc/<pid>/stat` state letter (T = stopped by a signal: a paused fake VM).
fn proc_state(p: ProcessId) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).unwrap_or_default();
    stat.rsplit_once(") ")
        .and_then(|(_, r)| r.chars().next())
        .unwrap_or('?')
}

/// The process's state once it is (or, after 5 s, is still not) `want`: a signal is
/// delivered when the process next runs, not when `kill` returns, so a loaded machine
/// shows the old state for a moment.
fn proc_state_settled(p: ProcessId, want: char) -> char {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let s = proc_state(p);
        if s == want || std::time::Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_vm_goes_through_its_whole_life_and_disk_agrees_with_memory() {
    let host = Host::new();
    runtime().block_on(async {
        let l = host.launcher();
        let vm = l.start(start_req("a")).await.expect("start");
        assert_eq!(vm.state, VmState::Starting);
        assert_eq!(
            settle(&l, "a", |s| s != VmState::Starting).await,
            VmState::Running
        );
        let p = host.process("a").expect("a process");
        assert_eq!(
            host.dir("a").load().expect("record").state,
            VmState::Running
        );

        assert_eq!(l.pause("a").await.expect("pause").state, VmState::Paused);
        assert_eq!(
            proc_state_settled(p, 'T'),
            'T',
            "paused means the process is frozen"
        );
        let e = l.pause("a").await.expect_err("pause twice");
        assert!(matches!(e, LauncherError::Conflict(_)), "{e}");
        assert_eq!(l.resume("a").await.expect("resume").state, VmState::Running);
        assert_ne!(proc_state(p), 'T');

        let t = Instant::now();
        let vm = l.stop("a").await.expect("stop");
        assert_eq!(vm.state, VmState::Stopped);
        assert_eq!(vm.reason, None, "a requested stop is clean");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "a guest that honours the power button is not waited out"
        );
        assert!(!p.is_alive(), "stopped means the process is gone");
        assert!(!host.dir("a").pid().exists(), "no orphaned process record");
        assert_eq!(
            host.dir("a").load().expect("record").state,
            VmState::Stopped
        );

        // Start again: same VM, same disks, new process.
        l.start(start_req("a")).await.expect("restart");
        settle(&l, "a", |s| s == VmState::Running).await;
        assert_ne!(host.process("a"), Some(p));
        let e = l.delete("a").expect_err("delete while running");
        assert!(matches!(e, LauncherError::Conflict(_)), "{e}");
        l.stop("a").await.expect("stop");
        l.delete("a").expect("delete");
        assert!(
            !host.dir("a").root.exists(),
            "delete removes the VM and its disks"
        );
        assert!(matches!(l.get("a"), Err(LauncherError::NotFound(_))));
        assert!(l.list().is_empty());
    });
}

#[test]
fn failures_are_recorded_with_their_reason() {
    let host = Host::new();
    host.fake.set_guest("broken", FakeGuest::FailsToBoot);
    host.fake.set_guest("mute", FakeGuest::NeverReady);
    runtime().block_on(async {
        let l = host.launcher_with(|c| c.boot_timeout = Duration::from_secs(2));
        l.start(start_req("broken")).await.expect("launch");
        l.start(start_req("mute")).await.expect("launch");
        l.start(start_req("crashy")).await.expect("launch");

        assert_eq!(
            settle(&l, "broken", |s| !s.is_active()).await,
            VmState::Failed
        );
        let reason = l.get("broken").expect("vm").reason.unwrap_or_default();
        assert!(reason.contains("guest init failed"), "{reason}");

        assert_eq!(
            settle(&l, "mute", |s| !s.is_active()).await,
            VmState::Failed
        );
        let reason = l.get("mute").expect("vm").reason.unwrap_or_default();
        assert!(reason.contains("did not report ready"), "{reason}");

        settle(&l, "crashy", |s| s == VmState::Running).await;
        let p = host.process("crashy").expect("process");
        p.signal(libc::SIGKILL);
        assert_eq!(
            settle(&l, "crashy", |s| !s.is_active()).await,
            VmState::Failed
        );
        let reason = l.get("crashy").expect("vm").reason.unwrap_or_default();
        assert!(reason.contains("exited unexpectedly"), "{reason}");
        for name in ["broken", "mute", "crashy"] {
            assert!(
                !host.dir(name).pid().exists(),
                "{name}: no orphaned process record"
            );
        }
        // A failed VM starts again.
        host.fake.set_guest("broken", FakeGuest::Healthy);
        l.start(start_req("broken")).await.expect("start again");
        settle(&l, "broken", |s| s == VmState::Running).await;
        assert_eq!(l.get("broken").expect("vm").reason, None);
    });
}

#[test]
fn a_guest_deaf_to_the_power_button_is_killed_and_a_second_request_is_refused() {
    let host = Host::new();
    host.fake.set_guest("deaf", FakeGuest::IgnoresPowerButton);
    runtime().block_on(async {
        let l = host.launcher_with(|c| c.stop_timeout = Duration::from_millis(400));
        l.start(start_req("deaf")).await.expect("start");
        settle(&l, "deaf", |s| s == VmState::Running).await;
        let p = host.process("deaf").expect("process");
        let t = Instant::now();
        // join! polls in order: the stop claims the VM before the others ask.
        let (stop, second_stop, pause, delete) =
            tokio::join!(l.stop("deaf"), l.stop("deaf"), l.pause("deaf"), async {
                l.delete("deaf")
            });
        let stop = stop.expect("stop");
        assert_eq!(stop.state, VmState::Stopped);
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "waited the stop timeout"
        );
        assert!(!p.is_alive(), "killed");
        for e in [
            second_stop.map(drop).expect_err("second stop"),
            pause.map(drop).expect_err("pause"),
            delete.expect_err("delete"),
        ] {
            assert!(
                matches!(&e, LauncherError::Conflict(m) if m.contains("another operation")),
                "{e}"
            );
        }
        // The claim is released once the stop ended.
        l.delete("deaf").expect("delete after the stop");
    });
}

#[test]
fn a_restarted_launcher_re_adopts_running_vms_and_records_the_ones_that_ended() {
    let host = Host::new();
    let (alive, dead) = runtime().block_on(async {
        let l = host.launcher();
        for n in ["keeps", "dies", "idle"] {
            l.start(start_req(n)).await.expect("start");
            settle(&l, n, |s| s == VmState::Running).await;
        }
        l.stop("idle").await.expect("stop");
        (
            host.process("keeps").expect("keeps"),
            host.process("dies").expect("dies"),
        )
    });
    // The launcher is gone; one VM dies meanwhile.
    dead.signal(libc::SIGKILL);
    while dead.is_alive() {
        std::thread::sleep(Duration::from_millis(2));
    }
    runtime().block_on(async {
        let l = host.launcher();
        let keeps = l.get("keeps").expect("keeps");
        assert_eq!(keeps.state, VmState::Running);
        assert_eq!(
            keeps.pid,
            Some(alive.pid),
            "the same hypervisor, not a new one"
        );
        let dies = l.get("dies").expect("dies");
        assert_eq!(dies.state, VmState::Failed);
        assert!(
            dies.reason
                .as_deref()
                .unwrap_or("")
                .contains("while vm-launcher was down"),
            "{dies:?}"
        );
        assert_eq!(l.get("idle").expect("idle").state, VmState::Stopped);
        assert!(
            l.metrics_text()
                .contains("clawos_launcher_vms_adopted_total 1")
        );
        // The re-adopted VM is supervised: a stop works, and so does noticing a crash.
        l.stop("keeps").await.expect("stop adopted");
        assert!(!alive.is_alive());
        l.start(start_req("keeps")).await.expect("start");
        settle(&l, "keeps", |s| s == VmState::Running).await;
    });
    let p = host.process("keeps").expect("keeps");
    runtime().block_on(async {
        let l = host.launcher();
        p.signal(libc::SIGKILL);
        // Woken by the pidfd, not by polling: well within the deadline.
        assert_eq!(
            settle(&l, "keeps", |s| !s.is_active()).await,
            VmState::Failed
        );
    });
}

#[test]
fn a_start_with_the_recorded_idempotency_key_answers_the_vm_and_never_boots_it_again() {
    let host = Host::new();
    host.fake.set_guest("broken", FakeGuest::FailsToBoot);
    runtime().block_on(async {
        let l = host.launcher();
        let first = l.start(keyed("a", "step-1")).await.expect("start");
        assert_eq!(first.state, VmState::Starting);
        assert_eq!(first.idempotency_key.as_deref(), Some("step-1"));
        // Still starting, or running by now: the same VM, the same process.
        let again = l.start(keyed("a", "step-1")).await.expect("same key");
        assert_eq!(again.pid, first.pid);
        assert!(again.state.is_active(), "{again:?}");
        settle(&l, "a", |s| s == VmState::Running).await;
        let again = l.start(keyed("a", "step-1")).await.expect("same key");
        assert_eq!((again.state, again.pid), (VmState::Running, first.pid));
        assert_eq!(host.fake.launches("a"), 1, "one boot");

        // Another key, or none: as without keys.
        for other in [keyed("a", "step-2"), start_req("a")] {
            let e = l.start(other).await.expect_err("running");
            assert!(
                matches!(&e, LauncherError::Conflict(m) if m.contains("already running")),
                "{e}"
            );
        }

        // The attempt is over once the VM stopped: answered as it is, not booted again.
        let p = host.process("a").expect("process");
        l.stop("a").await.expect("stop");
        let again = l.start(keyed("a", "step-1")).await.expect("same key");
        assert_eq!((again.state, again.pid), (VmState::Stopped, None));
        assert!(!p.is_alive());
        assert_eq!(host.fake.launches("a"), 1, "not booted again");
        assert!(host.process("a").is_none());

        // A new key boots it, and becomes the one recorded.
        let next = l.start(keyed("a", "step-2")).await.expect("new key");
        assert_eq!(next.idempotency_key.as_deref(), Some("step-2"));
        assert_eq!(host.fake.launches("a"), 2);
        let again = l.start(keyed("a", "step-2")).await.expect("same key");
        assert_eq!(again.pid, next.pid);
        let e = l
            .start(keyed("a", "step-1"))
            .await
            .expect_err("old key, running");
        assert!(matches!(e, LauncherError::Conflict(_)), "{e}");
        assert_eq!(host.fake.launches("a"), 2);
        settle(&l, "a", |s| s == VmState::Running).await;
        l.stop("a").await.expect("stop");
        // A start without a key boots it and clears the key: no retry matches it.
        l.start(start_req("a")).await.expect("start without a key");
        assert_eq!(host.fake.launches("a"), 3);
        assert_eq!(l.get("a").expect("a").idempotency_key, None);
        let e = l.start(keyed("a", "step-2")).await.expect_err("running");
        assert!(matches!(e, LauncherError::Conflict(_)), "{e}");

        // A keyed start whose VM failed: the failure is the answer.
        l.start(keyed("broken", "step-9")).await.expect("launch");
        assert_eq!(
            settle(&l, "broken", |s| !s.is_active()).await,
            VmState::Failed
        );
        let again = l.start(keyed("broken", "step-9")).await.expect("same key");
        assert_eq!(again.state, VmState::Failed);
        assert!(again.reason.is_some(), "{again:?}");
        assert_eq!(
            host.fake.launches("broken"),
            1,
            "a failed attempt is not retried"
        );

        // Bad keys and budgets: 400, nothing created or booted.
        for (bad, what) in [
            (keyed("c", ""), "idempotency_key"),
            (keyed("c", &"k".repeat(129)), "idempotency_key"),
            (keyed("c", "with space"), "idempotency_key"),
            (keyed("c", "new\nline"), "idempotency_key"),
            (keyed("c", "semi;colon"), "idempotency_key"),
            (
                StartVm {
                    token_budget: Some(0),
                    ..start_req("c")
                },
                "token_budget",
            ),
            (
                StartVm {
                    token_budget: Some(1_000_000_000_001),
                    ..start_req("c")
                },
                "token_budget",
            ),
        ] {
            let e = l.start(bad).await.expect_err(what);
            assert!(
                matches!(&e, LauncherError::Invalid(m) if m.contains(what)),
                "{e}"
            );
        }
        assert!(l.get("c").is_err());
        assert!(!host.dir("c").root.exists());
        assert_eq!(host.fake.launches("c"), 0);
        l.stop("a").await.expect("stop");
    });
}

#[test]
fn twenty_concurrent_starts_with_one_key_boot_once() {
    let host = Host::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let l = host.launcher();
        // A new VM: its disks are made while the others wait.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let l = Arc::clone(&l);
                tokio::spawn(async move { l.start(keyed("c", "wf-7/step-3")).await })
            })
            .collect();
        let mut pids = std::collections::HashSet::new();
        for t in tasks {
            let vm = t.await.expect("task").expect("every retry is answered 202");
            assert_eq!(vm.idempotency_key.as_deref(), Some("wf-7/step-3"));
            pids.insert(vm.pid.expect("a running process"));
        }
        assert_eq!(pids.len(), 1, "one VM process: {pids:?}");
        assert_eq!(host.fake.launches("c"), 1, "one boot");
        assert_eq!(host.process("c").map(|p| p.pid), pids.into_iter().next());
        settle(&l, "c", |s| s == VmState::Running).await;
        l.stop("c").await.expect("stop");

        // Stopped, two keys racing: one boots; its retries are answered, the other
        // key's are refused as without keys (409).
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let l = Arc::clone(&l);
                let key = if i % 2 == 0 { "even" } else { "odd" };
                tokio::spawn(async move { (key, l.start(keyed("c", key)).await) })
            })
            .collect();
        let mut won = std::collections::HashMap::<&str, usize>::new();
        for t in tasks {
            let (key, r) = t.await.expect("task");
            match r {
                Ok(vm) => {
                    assert_eq!(vm.idempotency_key.as_deref(), Some(key));
                    *won.entry(key).or_default() += 1;
                }
                Err(e) => assert!(matches!(e, LauncherError::Conflict(_)), "{e}"),
            }
        }
        assert_eq!(host.fake.launches("c"), 2, "one more boot: {won:?}");
        assert_eq!(won.len(), 1, "only one key's starts succeed: {won:?}");
        assert_eq!(
            won.values().sum::<usize>(),
            10,
            "all of that key's: {won:?}"
        );
        settle(&l, "c", |s| s == VmState::Running).await;
        l.stop("c").await.expect("stop");
    });
}

#[test]
fn an_idempotency_key_and_a_token_budget_survive_a_launcher_restart() {
    let host = Host::new();
    let first = runtime().block_on(async {
        let l = host.launcher();
        let vm = l
            .start(StartVm {
                token_budget: Some(5_000),
                ..keyed("kept", "run-1")
            })
            .await
            .expect("start");
        assert_eq!(vm.token_budget, Some(5_000));
        l.start(keyed("ended", "run-1")).await.expect("start");
        for n in ["kept", "ended"] {
            settle(&l, n, |s| s == VmState::Running).await;
        }
        l.stop("ended").await.expect("stop");
        host.process("kept").expect("kept")
    });
    let on_disk = host.dir("kept").load().expect("record");
    assert_eq!(on_disk.idempotency_key.as_deref(), Some("run-1"));
    assert_eq!(on_disk.token_budget, Some(5_000));
    // A record written before keys and budgets existed still loads, without either.
    let mut old = serde_json::to_value(&on_disk).expect("json");
    let fields = old.as_object_mut().expect("object");
    fields.remove("idempotency_key");
    fields.remove("token_budget");
    let old: clawos_vm_launcher::store::VmRecord = serde_json::from_value(old).expect("old");
    assert_eq!((old.idempotency_key, old.token_budget), (None, None));

    runtime().block_on(async {
        let l = host.launcher();
        let vm = l.start(keyed("kept", "run-1")).await.expect("re-adopted");
        assert_eq!(vm.state, VmState::Running);
        assert_eq!(
            vm.pid,
            Some(first.pid),
            "the re-adopted process, no new boot"
        );
        assert_eq!(vm.token_budget, Some(5_000));
        let ended = l.start(keyed("ended", "run-1")).await.expect("ended");
        assert_eq!(ended.state, VmState::Stopped);
        assert_eq!(host.fake.launches("kept"), 1);
        assert_eq!(host.fake.launches("ended"), 1);
        let e = l.start(keyed("kept", "run-2")).await.expect_err("running");
        assert!(matches!(e, LauncherError::Conflict(_)), "{e}");
        l.stop("kept").await.expect("stop");
    });
}

#[test]
fn snapshot_and_restore_return_the_vm_to_its_state() {
    let host = Host::new();
    runtime().block_on(async {
        let l = host.launcher();
        l.start(start_req("s")).await.expect("start");
        settle(&l, "s", |s| s == VmState::Running).await;
        let snap = l.snapshot("s", Some("t1")).await.expect("snapshot");
        assert_eq!((snap.tag.as_str(), snap.backend.as_str()), ("t1", "fake"));
        assert_eq!(l.get("s").expect("vm").state, VmState::Running, "resumed");
        l.pause("s").await.expect("pause");
        l.snapshot("s", Some("t2")).await.expect("snapshot paused");
        assert_eq!(
            l.get("s").expect("vm").state,
            VmState::Paused,
            "stays paused"
        );
        let e = l.snapshot("s", Some("t2")).await.expect_err("same tag");
        assert!(matches!(e, LauncherError::Conflict(_)), "{e}");
        let e = l.snapshot("s", Some("../x")).await.expect_err("a path");
        assert!(matches!(e, LauncherError::Invalid(_)), "{e}");
        let e = l
            .restore("s", "t1")
            .await
            .expect_err("restore while active");
        assert!(matches!(e, LauncherError::Conflict(_)), "{e}");
        l.stop("s").await.expect("stop");
        l.restore("s", "t1").await.expect("restore");
        settle(&l, "s", |s| s == VmState::Running).await;
        let tags: Vec<String> = l
            .snapshots("s")
            .expect("list")
            .into_iter()
            .map(|s| s.tag)
            .collect();
        assert_eq!(tags, ["t1", "t2"]);
        l.delete_snapshot("s", "t2").expect("delete snapshot");
        let e = l.restore("s", "t2").await.expect_err("deleted");
        assert!(
            matches!(e, LauncherError::Conflict(_) | LauncherError::NotFound(_)),
            "{e}"
        );
        l.stop("s").await.expect("stop");
        let e = l.restore("s", "t2").await.expect_err("deleted");
        assert!(matches!(e, LauncherError::NotFound(_)), "{e}");
    });
}

#[test]
fn a_snapshot_changed_after_it_was_taken_is_not_restored_and_snapshots_are_capped() {
    let host = Host::new();
    runtime().block_on(async {
        let l = host.launcher_with(|c| c.max_snapshots_per_vm = 3);
        l.start(start_req("s")).await.expect("start");
        settle(&l, "s", |s| s == VmState::Running).await;
        for t in ["mem", "disk", "rec"] {
            l.snapshot("s", Some(t)).await.expect("snapshot");
        }
        let e = l.snapshot("s", Some("more")).await.expect_err("over the cap");
        assert!(matches!(&e, LauncherError::Conflict(m) if m.contains("delete one")), "{e}");
        l.stop("s").await.expect("stop");
        let snaps = host.dir("s").root.join("snapshots");
        // Something other than the launcher edits one file of each snapshot.
        let append = |p: PathBuf| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&p).expect("open");
            f.write_all(b"x").expect("tamper");
        };
        append(snaps.join("mem/state.bin"));
        append(snaps.join("disk/workspace.img"));
        let rec = snaps.join("rec/snapshot.json");
        let text = std::fs::read_to_string(&rec).expect("record");
        let forged = text.replace("\"mem_mib\": 128", "\"mem_mib\": 4096");
        assert_ne!(forged, text, "the record names its memory size");
        std::fs::write(&rec, forged).expect("tamper");
        for t in ["mem", "disk", "rec"] {
            let e = l.restore("s", t).await.expect_err("tampered");
            assert!(
                matches!(&e, LauncherError::Conflict(m) if m.contains("changed since it was taken")),
                "{t}: {e}"
            );
            assert_eq!(l.get("s").expect("vm").state, VmState::Stopped, "nothing started");
        }
        // An untouched snapshot still restores.
        l.delete_snapshot("s", "mem").expect("delete");
        l.start(start_req("s")).await.expect("start");
        settle(&l, "s", |s| s == VmState::Running).await;
        l.snapshot("s", Some("good")).await.expect("snapshot");
        l.stop("s").await.expect("stop");
        l.restore("s", "good").await.expect("restore");
        settle(&l, "s", |s| s == VmState::Running).await;
    });
}

#[test]
fn a_refused_image_or_bad_name_leaves_nothing_behind() {
    let host = Host::new();
    runtime().block_on(async {
        let l = host.launcher();
        for bad in ["../etc", "A", "", "x/y"] {
            let e = l.start(start_req(bad)).await.expect_err("bad name");
            assert!(matches!(e, LauncherError::Invalid(_)), "{bad:?}: {e}");
        }
        std::fs::write(host.image.join(files::KERNEL), b"tampered").expect("tamper");
        let e = l.start(start_req("t")).await.expect_err("tampered image");
        assert!(matches!(e, LauncherError::ImageRefused { .. }), "{e}");
        assert!(l.list().is_empty());
        let leftovers: Vec<_> = std::fs::read_dir(host.state.join("vms"))
            .expect("vms dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    });
    // The name is free again: a re-signed bundle (new key) boots under it.
    let mut host = host;
    host.pubkey = common::signed_bundle(&host.image);
    runtime().block_on(async {
        let l = host.launcher();
        l.start(start_req("t")).await.expect("start");
        settle(&l, "t", |s| s == VmState::Running).await;
    });
}

// ---- property tests ----

#[derive(Debug, Clone, Copy)]
enum Op {
    Start(usize),
    Stop(usize),
    Pause(usize),
    Resume(usize),
    Delete(usize),
    Crash(usize),
    Snapshot(usize),
    Restore(usize),
    RestartLauncher,
}

const NAMES: [&str; 2] = ["p0", "p1"];

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..NAMES.len();
    prop_oneof![
        4 => vm.clone().prop_map(Op::Start),
        3 => vm.clone().prop_map(Op::Stop),
        2 => vm.clone().prop_map(Op::Pause),
        2 => vm.clone().prop_map(Op::Resume),
        1 => vm.clone().prop_map(Op::Delete),
        1 => vm.clone().prop_map(Op::Crash),
        1 => vm.clone().prop_map(Op::Snapshot),
        1 => vm.prop_map(Op::Restore),
        1 => Just(Op::RestartLauncher),
    ]
}

/// What must hold after every operation, once no VM is mid-transition.
fn check_invariants(host: &Host, l: &Launcher) -> Result<(), TestCaseError> {
    let listed: HashMap<String, VmState> =
        l.list().into_iter().map(|v| (v.name, v.state)).collect();
    for name in NAMES {
        let dir = host.dir(name);
        match listed.get(name) {
            None => prop_assert!(!dir.root.exists(), "{name}: unlisted but on disk"),
            Some(&state) => {
                // One state: memory and disk agree.
                let on_disk = dir.load().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(on_disk.state, state, "{}: disk vs memory", name);
                let process = host.process(name);
                if state.is_active() {
                    prop_assert!(process.is_some(), "{name}: {state} without a live process");
                } else {
                    prop_assert!(process.is_none(), "{name}: {state} with a live process");
                    prop_assert!(!dir.pid().exists(), "{name}: orphaned process record");
                    if let Some(p) = on_disk.process {
                        prop_assert!(!p.is_alive(), "{name}: its last hypervisor still runs");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn settle_all(l: &Launcher) {
    for name in NAMES {
        if l.get(name).is_ok() {
            settle(l, name, |s| {
                !matches!(s, VmState::Starting | VmState::Stopping)
            })
            .await;
        }
    }
}

fn run_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let host = Host::new();
    let rt = runtime();
    let mut l = rt.block_on(async { host.launcher() });
    let mut snapshots: HashMap<usize, u32> = HashMap::new();
    for &op in ops {
        let result: Result<(), LauncherError> = rt.block_on(async {
            match op {
                Op::Start(i) => l.start(start_req(NAMES[i])).await.map(drop),
                Op::Stop(i) => {
                    let r = l.stop(NAMES[i]).await;
                    if let Ok(vm) = &r {
                        // No lost stop: a stop that succeeded left the VM ended.
                        assert!(!vm.state.is_active(), "{vm:?} after a stop");
                    }
                    r.map(drop)
                }
                Op::Pause(i) => l.pause(NAMES[i]).await.map(drop),
                Op::Resume(i) => l.resume(NAMES[i]).await.map(drop),
                Op::Delete(i) => l.delete(NAMES[i]),
                Op::Crash(i) => {
                    if let Some(p) = host.process(NAMES[i]) {
                        p.signal(libc::SIGKILL);
                        // The process is gone; its supervisor records the end.
                        if l.get(NAMES[i]).is_ok() {
                            settle(&l, NAMES[i], |s| !s.is_active()).await;
                        }
                    }
                    Ok(())
                }
                Op::Snapshot(i) => {
                    let n = snapshots.entry(i).or_default();
                    *n += 1;
                    l.snapshot(NAMES[i], Some(&format!("s{n}"))).await.map(drop)
                }
                Op::Restore(i) => {
                    let n = snapshots.get(&i).copied().unwrap_or(1);
                    l.restore(NAMES[i], &format!("s{n}")).await.map(drop)
                }
                Op::RestartLauncher => Ok(()),
            }
        });
        if let Op::RestartLauncher = op {
            drop(l);
            l = rt.block_on(async { host.launcher() });
        }
        match result {
            Ok(()) | Err(LauncherError::Conflict(_) | LauncherError::NotFound(_)) => {}
            Err(e) => prop_assert!(false, "{op:?}: unexpected error {e}"),
        }
        rt.block_on(settle_all(&l));
        check_invariants(&host, &l)?;
        // A deleted VM forgets its snapshots.
        for (i, name) in NAMES.iter().enumerate() {
            if l.get(name).is_err() {
                snapshots.remove(&i);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_request_sequences_keep_every_vm_in_one_consistent_state(
        ops in proptest::collection::vec(op(), 1..14)
    ) {
        run_ops(&ops)?;
    }
}
