//! One supervisor task per active VM. It owns the VM's hypervisor process and relays
//! and sleeps until something happens: the process exits (its `Child`, or a pidfd for a
//! re-adopted process), a kill is requested, the boot deadline passes, or — only while
//! the guest is starting — the next readiness probe is due. When the process ends it
//! records the outcome through the registry and ends what lived with the VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_guest_protocol::frames::Reply;
use clawos_vm_launcher_api::VmState;
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::console;
use crate::host::ProcessId;
use crate::launcher::Shared;
use crate::names::VmName;
use crate::state::Event;
use crate::store::VmDir;
use crate::vsock::GuestClient;

/// What a supervisor can be asked.
#[derive(Debug)]
enum Request {
    /// End the hypervisor now (SIGKILL).
    Kill,
}

/// The way to reach a VM's supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    requests: mpsc::UnboundedSender<Request>,
    task: tokio::task::AbortHandle,
}

impl SupervisorHandle {
    /// Asks the supervisor to kill the hypervisor; false if it has already ended.
    pub fn kill(&self) -> bool {
        self.requests.send(Request::Kill).is_ok()
    }

    /// Ends the supervisor task (not the VM).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// A hypervisor to follow.
#[derive(Debug)]
pub struct Boot {
    pub name: VmName,
    /// The process when this launcher started it (so its exit status is known).
    pub child: Option<Child>,
    pub process: ProcessId,
    /// When the start was requested (boot time and the boot deadline count from it).
    pub started: Instant,
    /// Where in the console log this boot's output starts.
    pub console_offset: u64,
}

/// Starts the supervisor of a launched or re-adopted VM, with its relays.
pub fn spawn(shared: Arc<Shared>, boot: Boot) -> SupervisorHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(shared, boot, rx));
    SupervisorHandle {
        requests: tx,
        task: task.abort_handle(),
    }
}

async fn run(shared: Arc<Shared>, boot: Boot, mut requests: mpsc::UnboundedReceiver<Request>) {
    let Boot {
        name,
        mut child,
        process,
        started,
        console_offset,
    } = boot;
    let registry = &shared.registry;
    let dir = registry.dir(&name);
    let record = registry.get(&name);
    let sockets = record
        .as_ref()
        .and_then(|r| r.socket_dir.clone())
        .unwrap_or_else(|| dir.root.clone());
    let guest = record.as_ref().filter(|r| r.vsock).map(|_| GuestClient {
        dir: sockets.clone(),
        secret: dir.read_secret().unwrap_or_default(),
    });
    // The VM's agent identities (one token per host service it reaches) live exactly as
    // long as this supervisor's VM.
    let hold = |purpose| match (&guest, &record) {
        (Some(_), Some(r)) => crate::identity::hold(
            shared.cfg.identity.as_ref(),
            crate::identity::VmIdentityClaims::of(&name, r),
            &dir.root,
            purpose,
        ),
        _ => (crate::identity::AgentIdentity::unconfigured(), None),
    };
    let (identity, identity_holder) = hold(crate::identity::TokenFor::Llm);
    let (skills_identity, skills_holder) = match shared.cfg.skills_authority {
        Some(_) => hold(crate::identity::TokenFor::Skills),
        None => {
            // Skills off now, maybe not when a killed launcher left this VM a token.
            let (settings, vm, root) =
                (shared.cfg.identity.clone(), name.clone(), dir.root.clone());
            tokio::spawn(async move {
                crate::identity::revoke_leftover(
                    settings.as_ref(),
                    &vm,
                    &root,
                    crate::identity::TokenFor::Skills,
                )
                .await;
            });
            (crate::identity::AgentIdentity::unconfigured(), None)
        }
    };
    let relays = guest.is_some().then(|| {
        let refused = shared.metrics.relay_refused.clone();
        crate::relays::start(
            &shared.cfg,
            &name,
            sockets.clone(),
            crate::relays::Identities {
                llm: identity,
                skills: skills_identity,
            },
            refused,
        )
    });

    let mut console_ready = console::ReadyWatch::new(console_offset);
    // A health probe is a vsock round trip; the console marker is a file read.
    let probe_every = match guest {
        Some(_) => shared.cfg.ready_probe_interval,
        None => shared.cfg.ready_probe_interval / 8,
    };
    let mut probe = tokio::time::interval(probe_every.max(Duration::from_millis(1)));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let boot_timeout = boot_deadline(
        shared.cfg.boot_timeout,
        record.as_ref().and_then(|r| r.ready_timeout_secs),
    );
    let boot_deadline = tokio::time::Instant::from_std(started + boot_timeout);
    // Rate of a guest's console writes is bounded only by the host's CPU, so the log's
    // size is looked at often; the cap can be overshot by what is written in between.
    let mut console_check = tokio::time::interval(Duration::from_millis(250));
    console_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut timed_out: Option<BootTimedOut> = None;
    let mut killed = false;
    // Why the last readiness probe failed, for the log when the boot times out (a guest
    // whose console says ready while its channel never answers is told apart so).
    let mut last_probe: Option<String> = None;

    let exit_code = {
        let exited = async {
            match child.as_mut() {
                Some(c) => c.wait().await.ok().and_then(|s| s.code()),
                None => {
                    process.exited().await;
                    None
                }
            }
        };
        tokio::pin!(exited);
        loop {
            let starting = registry
                .get(&name)
                .is_some_and(|r| r.state == VmState::Starting);
            tokio::select! {
                code = &mut exited => break code,
                Some(Request::Kill) = requests.recv(), if !killed => {
                    killed = true;
                    tracing::info!(vm = %name, "killing the hypervisor");
                    process.signal(libc::SIGKILL);
                }
                _ = tokio::time::sleep_until(boot_deadline), if starting && timed_out.is_none() => {
                    let console_says_ready = guest.is_some()
                        && console::ReadyWatch::new(console_offset).poll(&dir.console());
                    tracing::warn!(
                        vm = %name,
                        console_says_ready,
                        last_probe = last_probe.as_deref().unwrap_or("-"),
                        "guest did not report ready in time; killing it"
                    );
                    timed_out = Some(BootTimedOut {
                        after: boot_timeout,
                        console_says_ready,
                        last_probe: last_probe.take(),
                    });
                    process.signal(libc::SIGKILL);
                }
                _ = console_check.tick() => {
                    match console::cap(&dir.console(), shared.cfg.console_max_bytes) {
                        Ok(true) => tracing::info!(vm = %name, max_bytes = shared.cfg.console_max_bytes, "console log capped; the earlier part is console.log.1"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(vm = %name, error = %e, "cannot cap the console log"),
                    }
                }
                _ = probe.tick(), if starting && timed_out.is_none() => {
                    let ready = match &guest {
                        Some(g) => match tokio::time::timeout(Duration::from_secs(1), g.health()).await {
                            Ok(Ok(Reply::Health { .. })) => true,
                            Ok(Ok(other)) => {
                                last_probe = Some(format!("unexpected reply {other:?}"));
                                false
                            }
                            Ok(Err(e)) => {
                                last_probe = Some(e.to_string());
                                false
                            }
                            Err(_) => {
                                last_probe = Some("no answer within 1 s".into());
                                false
                            }
                        },
                        None => console_ready.poll(&dir.console()),
                    };
                    if ready {
                        let ms = started.elapsed().as_millis() as u64;
                        if registry
                            .apply(&name, Event::GuestReady, |r| r.boot_ms = Some(ms))
                            .is_ok()
                        {
                            tracing::info!(vm = %name, boot_ms = ms, "guest ready");
                        }
                    }
                }
            }
        }
    };

    let console_text = console::tail(&dir.console(), 64 * 1024);
    dir.remove_pid();
    if let Some(r) = relays {
        r.abort();
    }
    // Both released at once: each waits for identity-manager's answer.
    let release = |h: Option<crate::identity::IdentityHolder>| async move {
        if let Some(h) = h {
            h.release().await;
        }
    };
    tokio::join!(release(identity_holder), release(skills_holder));
    for h in registry.get(&name).map(|r| r.helpers).unwrap_or_default() {
        h.signal(libc::SIGTERM);
    }
    crate::relays::remove_sockets(&dir.root);
    shared.backend.cleanup(&dir);
    let before = registry.get(&name).map_or(VmState::Stopping, |r| r.state);
    let (state, reason) = outcome(before, exit_code, &console_text, timed_out.as_ref(), &dir);
    let failed = state == VmState::Failed;
    if let Err(e) = registry.apply(&name, Event::Exited { failed }, |r| {
        r.reason = reason.clone()
    }) {
        tracing::error!(vm = %name, error = %e, "cannot record the VM's end");
    }
    if failed {
        shared.metrics.vm_failed();
        tracing::warn!(vm = %name, reason = reason.as_deref().unwrap_or(""), "VM failed");
    } else {
        tracing::info!(vm = %name, "VM stopped");
    }
}

/// What a VM's image runtime gets on top of its own readiness timeout: the boot of the
/// guest itself before the runtime starts.
pub const RUNTIME_BOOT_MARGIN: Duration = Duration::from_secs(60);

/// How long a VM may take from its start to the guest's ready report: the launcher's
/// boot timeout, or — for an image whose agent runtime states a readiness timeout
/// (`ready_timeout_secs`, OpenClaw takes minutes under software emulation) — that
/// timeout plus [`RUNTIME_BOOT_MARGIN`] when it is longer. A runtime's timeout counts
/// up to the most the guest accepts (`MAX_READY_TIMEOUT_SECS`).
pub fn boot_deadline(boot_timeout: Duration, ready_timeout_secs: Option<u64>) -> Duration {
    use clawos_guest_protocol::runtime::MAX_READY_TIMEOUT_SECS;
    match ready_timeout_secs {
        Some(s) => boot_timeout
            .max(Duration::from_secs(s.min(MAX_READY_TIMEOUT_SECS)) + RUNTIME_BOOT_MARGIN),
        None => boot_timeout,
    }
}

/// Polls the guest agent's health until it answers or `limit` passes (used after a
/// snapshot re-plugs the vsock device, when the guest takes a moment to find it).
pub async fn wait_healthy(guest: &GuestClient, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Ok(Reply::Health { .. })) =
            tokio::time::timeout(Duration::from_secs(1), guest.health()).await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A boot the launcher ended because the guest did not report ready in time, with
/// what tells a guest that never came up from one whose channel never answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootTimedOut {
    /// The deadline that passed.
    pub after: Duration,
    /// The guest's console shows its ready marker.
    pub console_says_ready: bool,
    /// Why the last readiness probe over the channel failed, when one did.
    pub last_probe: Option<String>,
}

impl std::fmt::Display for BootTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest did not report ready within {}s ({}",
            self.after.as_secs(),
            if self.console_says_ready {
                "its console says ready, its channel did not answer"
            } else {
                "its console shows no ready marker"
            }
        )?;
        // A VM without a channel is only watched on its console: no probe to name.
        match &self.last_probe {
            Some(p) => write!(f, "; last readiness probe: {p})"),
            None => write!(f, ")"),
        }
    }
}

/// Final state of a VM whose hypervisor exited.
pub fn outcome(
    state_before: VmState,
    exit_code: Option<i32>,
    console_text: &str,
    boot_timeout: Option<&BootTimedOut>,
    dir: &VmDir,
) -> (VmState, Option<String>) {
    // A VM being stopped ends stopped, whatever its console says: a line the guest
    // printed cannot turn the operator's stop into a failure.
    if state_before == VmState::Stopping {
        return (VmState::Stopped, None);
    }
    if let Some(reason) = console::failure_reason(console_text) {
        return (VmState::Failed, Some(reason));
    }
    if let Some(t) = boot_timeout {
        return (VmState::Failed, Some(t.to_string()));
    }
    if console::powered_off(console_text) && exit_code.is_none_or(|c| c == 0) {
        return (VmState::Stopped, Some("guest powered off".into()));
    }
    let log = console::tail(&dir.hypervisor_log(), 400);
    let last = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let code = exit_code.map_or("unknown".to_owned(), |c| c.to_string());
    (
        VmState::Failed,
        Some(
            format!("hypervisor exited unexpectedly (status {code}) {last}")
                .trim()
                .to_owned(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtimes_readiness_timeout_stretches_the_boot_deadline() {
        let s = Duration::from_secs;
        // The built-in runtime: the launcher's own timeout.
        assert_eq!(boot_deadline(s(60), None), s(60));
        // A slow runtime: its timeout plus the guest's boot.
        assert_eq!(boot_deadline(s(60), Some(180)), s(240));
        assert_eq!(boot_deadline(s(60), Some(600)), s(660));
        // The launcher's timeout when that is longer.
        assert_eq!(boot_deadline(s(900), Some(180)), s(900));
        assert_eq!(boot_deadline(s(5), Some(1)), s(61));
        // Bounded by what the guest accepts: no overflow, no VM starting forever.
        assert_eq!(boot_deadline(s(60), Some(u64::MAX)), s(3660));
    }

    #[test]
    fn outcomes() {
        let dir = VmDir {
            root: "/nonexistent".into(),
        };
        let (s, r) = outcome(
            VmState::Running,
            Some(1),
            "[ 1.0] device-mapper: verity: 254:0: data block 3 is corrupted\n",
            None,
            &dir,
        );
        assert_eq!(s, VmState::Failed);
        assert!(r.expect("reason").contains("dm-verity"));
        assert_eq!(
            outcome(VmState::Stopping, Some(0), "CLAWOS_POWEROFF\n", None, &dir).0,
            VmState::Stopped
        );
        assert_eq!(
            outcome(VmState::Stopping, None, "", None, &dir).0,
            VmState::Stopped
        );
        // A stop stays a stop, whatever the console says.
        assert_eq!(
            outcome(
                VmState::Stopping,
                Some(0),
                "[ 9.0] Kernel panic - not syncing: Attempted to kill init!\n",
                None,
                &dir
            ),
            (VmState::Stopped, None)
        );
        assert_eq!(
            outcome(VmState::Running, Some(0), "CLAWOS_POWEROFF\n", None, &dir).0,
            VmState::Stopped
        );
        let (s, r) = outcome(VmState::Running, Some(137), "", None, &dir);
        assert_eq!(s, VmState::Failed);
        assert!(r.expect("reason").contains("137"));
        let timed_out = BootTimedOut {
            after: Duration::from_secs(9),
            console_says_ready: true,
            last_probe: Some("no answer within 1 s".into()),
        };
        let (s, r) = outcome(VmState::Starting, None, "", Some(&timed_out), &dir);
        assert_eq!(s, VmState::Failed);
        assert_eq!(
            r.expect("reason"),
            "guest did not report ready within 9s (its console says ready, its channel \
             did not answer; last readiness probe: no answer within 1 s)"
        );
        let console_only = BootTimedOut {
            after: Duration::from_secs(9),
            console_says_ready: false,
            last_probe: None,
        };
        assert_eq!(
            console_only.to_string(),
            "guest did not report ready within 9s (its console shows no ready marker)"
        );
    }
}
