//! Re-adoption after a launcher restart: hypervisors run in their own process groups
//! and outlive the launcher, so at start every VM whose recorded process is still the
//! same one (pid and start time) gets a supervisor again; the others are recorded as
//! ended, with the reason their console gives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_vm_launcher_api::VmState;

use super::{Shared, now_unix};
use crate::host::ProcessId;
use crate::names::VmName;
use crate::supervisor::{self, Boot};
use crate::{LauncherError, console, relays, snapshot};

/// Loads every VM record; VMs whose hypervisor is still the same process are
/// supervised again, the others are marked stopped or failed.
pub(super) fn adopt_all(shared: &Arc<Shared>) -> Result<(), LauncherError> {
    let registry = &shared.registry;
    let vms_dir = registry.vms_dir().to_owned();
    let entries = std::fs::read_dir(&vms_dir).map_err(|e| LauncherError::io(&vms_dir, e))?;
    for e in entries.flatten() {
        let Ok(name) = VmName::parse(&e.file_name().to_string_lossy()) else {
            continue;
        };
        let dir = registry.dir(&name);
        snapshot::clean_leftovers(&dir);
        let mut record = match dir.load() {
            Ok(r) if r.name == name.as_str() => r,
            Ok(r) => {
                tracing::warn!(vm = %name, recorded = %r.name, "skipping VM directory whose record names another VM");
                continue;
            }
            Err(err) => {
                tracing::warn!(vm = %name, error = %err, "skipping VM directory without a readable record");
                continue;
            }
        };
        if !record.state.is_active() {
            registry.put(record)?;
            continue;
        }
        match dir.read_pid().filter(ProcessId::is_alive) {
            Some(p) => {
                tracing::info!(vm = %name, pid = p.pid, state = %record.state, "re-adopted running VM");
                shared.metrics.adopted.inc();
                record.process = Some(p);
                let age = now_unix().saturating_sub(record.started_at.unwrap_or(0));
                let started = Instant::now()
                    .checked_sub(Duration::from_secs(age))
                    .unwrap_or_else(Instant::now);
                relays::register_with_monitor(&shared.cfg, &record);
                registry.put(record)?;
                let handle = supervisor::spawn(
                    Arc::clone(shared),
                    Boot {
                        name: name.clone(),
                        child: None,
                        process: p,
                        started,
                        console_offset: 0,
                    },
                );
                registry.set_supervisor(&name, handle);
            }
            None => {
                let text = console::tail(&dir.console(), 64 * 1024);
                let (state, reason) = match console::failure_reason(&text) {
                    Some(r) => (VmState::Failed, Some(r)),
                    None if console::powered_off(&text) || record.state == VmState::Stopping => {
                        (VmState::Stopped, None)
                    }
                    None => (
                        VmState::Failed,
                        Some("hypervisor process ended while vm-launcher was down".into()),
                    ),
                };
                tracing::info!(vm = %name, %state, "VM ended while the launcher was down");
                for h in &record.helpers {
                    h.signal(libc::SIGTERM);
                }
                record.state = state;
                record.reason = reason;
                dir.remove_pid();
                registry.put(record)?;
            }
        }
    }
    Ok(())
}
