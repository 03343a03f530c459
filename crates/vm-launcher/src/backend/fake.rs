//! A hypervisor that boots no VM, for testing the launcher's state machine in
//! milliseconds: each "VM" is a real `/bin/sh` process in its own process group that
//! writes the console markers a guest would (`CLAWOS_READY`, `CLAWOS_POWEROFF`,
//! `CLAWOS_FATAL: …`) and reacts to signals as a guest reacts to the power button.
//! Pause and resume are SIGSTOP and SIGCONT; a snapshot writes a state file. Being
//! real processes, fake VMs outlive a launcher and are re-adopted like real ones.
//!
//! Not selectable by configuration: tests construct it and hand it to
//! [`crate::launcher::Launcher::new`].

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;

use tokio::process::Command;

use super::{BackendError, BoxFuture, Hypervisor, LaunchSpec, Launched, log_file};
use crate::host::ProcessId;
use crate::store::VmDir;

/// How a fake guest behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeGuest {
    /// Boots, reports ready, powers off cleanly when asked.
    #[default]
    Healthy,
    /// Its init fails: a `CLAWOS_FATAL` line, then the hypervisor exits 1.
    FailsToBoot,
    /// Never reports ready (the launcher's boot timeout ends it).
    NeverReady,
    /// Reports ready but ignores the power button (the launcher must kill it).
    IgnoresPowerButton,
}

/// The fake backend. Guests are [`FakeGuest::Healthy`] unless told otherwise.
#[derive(Debug, Default)]
pub struct FakeHypervisor {
    guests: Mutex<HashMap<String, FakeGuest>>,
    /// Fake VMs launched, per VM name.
    launches: Mutex<HashMap<String, usize>>,
}

/// The state file a fake snapshot writes.
const STATE_FILE: &str = "state.bin";

impl FakeHypervisor {
    /// How the VM named `vm` behaves from its next boot on.
    pub fn set_guest(&self, vm: &str, guest: FakeGuest) {
        self.guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.to_owned(), guest);
    }

    /// How many times the VM named `vm` was launched (booted or restored).
    pub fn launches(&self, vm: &str) -> usize {
        self.launches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm)
            .copied()
            .unwrap_or(0)
    }

    fn guest(&self, vm: &str) -> FakeGuest {
        self.guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm)
            .copied()
            .unwrap_or_default()
    }

    fn spawn(&self, spec: &LaunchSpec) -> Result<Launched, BackendError> {
        // `sleep 1 & wait` rather than `exec sleep`: the shell must stay to run the
        // trap, and a trap runs only between commands.
        let wait = "while :; do sleep 1 & wait $!; done";
        let script = match self.guest(&spec.name) {
            FakeGuest::Healthy => {
                format!("trap 'echo CLAWOS_POWEROFF; exit 0' TERM; echo CLAWOS_READY; {wait}")
            }
            // A guest's init fails after its kernel booted, never the instant the
            // hypervisor starts (that is a launch failure, reported as such).
            FakeGuest::FailsToBoot => {
                "sleep 0.2; echo 'CLAWOS_FATAL: cannot mount /workspace (fake)'; exit 1".to_owned()
            }
            FakeGuest::NeverReady => format!("trap 'exit 0' TERM; {wait}"),
            FakeGuest::IgnoresPowerButton => format!("trap '' TERM; echo CLAWOS_READY; {wait}"),
        };
        let console = log_file(&spec.dir.console())?;
        let log = log_file(&spec.dir.hypervisor_log())?;
        let child = Command::new("/bin/sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| BackendError::Spawn {
                bin: "/bin/sh".into(),
                source,
            })?;
        *self
            .launches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(spec.name.clone())
            .or_default() += 1;
        Ok(Launched {
            child,
            helpers: Vec::new(),
            vsock: false,
            socket_dir: None,
        })
    }
}

/// Signals the fake VM's process, if it runs.
fn signal(dir: &VmDir, sig: libc::c_int) -> Result<(), BackendError> {
    let running = dir.read_pid().filter(ProcessId::is_alive);
    match running {
        Some(p) if p.signal(sig) => Ok(()),
        _ => Err(BackendError::Control {
            backend: "fake",
            detail: format!("no running fake VM in {}", dir.root.display()),
        }),
    }
}

impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Launched, BackendError>> {
        Box::pin(async move { self.spawn(spec) })
    }

    fn request_stop<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { signal(dir, libc::SIGTERM) })
    }

    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { signal(dir, libc::SIGSTOP) })
    }

    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { signal(dir, libc::SIGCONT) })
    }

    fn snapshot_unsupported(&self, _snapshots: bool) -> Option<String> {
        None
    }

    fn save<'a>(
        &'a self,
        dir: &'a VmDir,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(async move {
            signal(dir, libc::SIGSTOP)?;
            let state = b"fake guest memory\n";
            std::fs::write(dir.root.join(snap).join(STATE_FILE), state).map_err(|e| {
                BackendError::Control {
                    backend: "fake",
                    detail: format!("write state: {e}"),
                }
            })?;
            Ok(state.len() as u64)
        })
    }

    fn after_save<'a>(
        &'a self,
        dir: &'a VmDir,
        helpers: &'a [ProcessId],
        resume: bool,
    ) -> BoxFuture<'a, Result<Vec<ProcessId>, BackendError>> {
        Box::pin(async move {
            if resume {
                signal(dir, libc::SIGCONT)?;
            }
            Ok(helpers.to_vec())
        })
    }

    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<Launched, BackendError>> {
        Box::pin(async move {
            let state = spec.dir.root.join(snap).join(STATE_FILE);
            if !state.is_file() {
                return Err(BackendError::Control {
                    backend: "fake",
                    detail: format!("no saved state at {}", state.display()),
                });
            }
            self.spawn(spec)
        })
    }
}
