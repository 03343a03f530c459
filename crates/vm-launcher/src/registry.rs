//! The registry of VMs: every VM's record, in memory and on disk, the one place a
//! state changes (through [`crate::state::next`]), and a watch per VM so callers wait
//! for a state instead of polling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use clawos_vm_launcher_api::VmState;
use tokio::sync::watch;

use crate::LauncherError;
use crate::names::VmName;
use crate::state::{self, Event, Illegal};
use crate::store::{VmDir, VmRecord};
use crate::supervisor::SupervisorHandle;

#[derive(Debug)]
struct Entry {
    record: VmRecord,
    /// An operation (start, stop, snapshot, …) holds the VM.
    busy: bool,
    /// The idempotency key of the start holding the VM, while one does.
    starting_key: Option<String>,
    /// Every state the VM takes, for [`Registry::wait_until`].
    state: watch::Sender<VmState>,
    /// The task following the VM's hypervisor while it is active.
    supervisor: Option<SupervisorHandle>,
}

/// All VMs of this launcher.
#[derive(Debug)]
pub struct Registry {
    vms_dir: PathBuf,
    inner: Mutex<HashMap<VmName, Entry>>,
    /// Counts released claims, so a start waiting for another with its idempotency key
    /// wakes when that one ends.
    released: watch::Sender<u64>,
}

/// What [`Registry::claim_start`] found.
#[derive(Debug)]
pub enum StartClaim<'a> {
    /// The VM is held for this start.
    Claimed(Claim<'a>),
    /// The VM was booted by a start with the same idempotency key: its record now.
    Done(Box<VmRecord>),
    /// A start with the same idempotency key holds the VM: wait for a change, then ask
    /// again.
    Wait(watch::Receiver<u64>),
}

/// Holds a VM for one operation; released when dropped, however the operation ends.
#[derive(Debug)]
pub struct Claim<'a> {
    registry: &'a Registry,
    name: VmName,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        {
            let mut inner = self.registry.lock();
            match inner.get(&self.name) {
                // A name claimed for a create that failed has no record: forget it.
                Some(e) if e.record.name.is_empty() => {
                    inner.remove(&self.name);
                }
                Some(_) => {
                    if let Some(e) = inner.get_mut(&self.name) {
                        e.busy = false;
                        e.starting_key = None;
                    }
                }
                None => {}
            }
        }
        self.registry
            .released
            .send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Registry {
    pub fn new(vms_dir: PathBuf) -> Self {
        Self {
            vms_dir,
            inner: Mutex::new(HashMap::new()),
            released: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<VmName, Entry>> {
        // Every update below is a single assignment or insert, so a panic while the
        // lock is held cannot leave an entry half-changed: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where VM directories live.
    pub fn vms_dir(&self) -> &Path {
        &self.vms_dir
    }

    /// A VM's directory.
    pub fn dir(&self, name: &VmName) -> VmDir {
        VmDir::new(&self.vms_dir, name)
    }

    /// Marks `name` busy for one operation (creating a placeholder for a new VM); a
    /// second operation on the same VM is a conflict.
    pub fn claim(&self, name: &VmName) -> Result<Claim<'_>, LauncherError> {
        match self.claim_start(name, None)? {
            StartClaim::Claimed(c) => Ok(c),
            // Only a start with a key is answered otherwise.
            StartClaim::Done(_) | StartClaim::Wait(_) => Err(busy(name)),
        }
    }

    /// [`Registry::claim`] for a start with idempotency key `key`, in one step with
    /// looking at the key: the VM's record if a start with the same key booted it; a
    /// receiver to wait on if such a start holds it now; else a claim (remembering the
    /// key, so starts with the same key that come meanwhile wait for this one).
    pub fn claim_start(
        &self,
        name: &VmName,
        key: Option<&str>,
    ) -> Result<StartClaim<'_>, LauncherError> {
        let mut inner = self.lock();
        if let (Some(key), Some(e)) = (key, inner.get(name)) {
            if !e.record.name.is_empty() && e.record.idempotency_key.as_deref() == Some(key) {
                return Ok(StartClaim::Done(Box::new(e.record.clone())));
            }
            if e.busy && e.starting_key.as_deref() == Some(key) {
                // Subscribed under the lock: the holder's release comes after.
                return Ok(StartClaim::Wait(self.released.subscribe()));
            }
        }
        let entry = inner.entry(name.clone()).or_insert_with(|| Entry {
            record: placeholder(),
            busy: false,
            starting_key: None,
            state: watch::Sender::new(VmState::Stopped),
            supervisor: None,
        });
        if entry.busy {
            return Err(busy(name));
        }
        entry.busy = true;
        entry.starting_key = key.map(str::to_owned);
        Ok(StartClaim::Claimed(Claim {
            registry: self,
            name: name.clone(),
        }))
    }

    /// Adds or replaces a VM's whole record (a new VM, a launch, an adoption) and
    /// persists it.
    pub fn put(&self, record: VmRecord) -> Result<(), LauncherError> {
        let name = VmName::parse(&record.name)?;
        let dir = self.dir(&name);
        dir.save(&record)
            .map_err(|e| LauncherError::io(&dir.record(), e))?;
        let mut inner = self.lock();
        let state = record.state;
        match inner.get_mut(&name) {
            Some(e) => {
                e.record = record;
                e.state.send_replace(state);
            }
            None => {
                inner.insert(
                    name,
                    Entry {
                        record,
                        busy: false,
                        starting_key: None,
                        state: watch::Sender::new(state),
                        supervisor: None,
                    },
                );
            }
        }
        Ok(())
    }

    /// A VM's record (a VM being created for the first time has none yet).
    pub fn get(&self, name: &VmName) -> Option<VmRecord> {
        self.lock()
            .get(name)
            .map(|e| e.record.clone())
            .filter(|r| !r.name.is_empty())
    }

    /// Every VM's record.
    pub fn all(&self) -> Vec<VmRecord> {
        self.lock()
            .values()
            .map(|e| e.record.clone())
            .filter(|r| !r.name.is_empty())
            .collect()
    }

    /// Changes a VM's record other than its state, and persists it.
    pub fn update(&self, name: &VmName, f: impl FnOnce(&mut VmRecord)) {
        let record = {
            let mut inner = self.lock();
            let Some(e) = inner.get_mut(name) else {
                return;
            };
            let state = e.record.state;
            f(&mut e.record);
            // States change only through `apply`.
            e.record.state = state;
            e.record.clone()
        };
        self.persist(name, &record);
    }

    /// Applies a state event (and `f` to the rest of the record in the same step),
    /// persists, and wakes everyone waiting on the VM. An event the state machine
    /// refuses changes nothing.
    pub fn apply(
        &self,
        name: &VmName,
        event: Event,
        f: impl FnOnce(&mut VmRecord),
    ) -> Result<VmState, Illegal> {
        let record = {
            let mut inner = self.lock();
            let Some(e) = inner.get_mut(name) else {
                return Err(Illegal {
                    state: VmState::Stopped,
                    event,
                });
            };
            let to = state::next(e.record.state, event)?;
            e.record.state = to;
            f(&mut e.record);
            e.record.state = to;
            e.state.send_replace(to);
            e.record.clone()
        };
        self.persist(name, &record);
        Ok(record.state)
    }

    fn persist(&self, name: &VmName, record: &VmRecord) {
        if let Err(e) = self.dir(name).save(record) {
            tracing::error!(vm = %name, error = %e, "cannot persist VM state");
        }
    }

    /// Forgets a deleted VM.
    pub fn remove(&self, name: &VmName) {
        self.lock().remove(name);
    }

    /// Waits until the VM's state satisfies `done` (or it is gone); false after `limit`.
    pub async fn wait_until(
        &self,
        name: &VmName,
        limit: Duration,
        done: impl Fn(VmState) -> bool,
    ) -> bool {
        let Some(mut rx) = self.lock().get(name).map(|e| e.state.subscribe()) else {
            return true;
        };
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|s| done(*s))).await,
            Ok(Ok(_)) | Ok(Err(_))
        )
    }

    /// Hands the VM's supervisor to the registry (replacing, and so ending, an old one).
    pub fn set_supervisor(&self, name: &VmName, handle: SupervisorHandle) {
        if let Some(e) = self.lock().get_mut(name)
            && let Some(old) = e.supervisor.replace(handle)
        {
            old.abort();
        }
    }

    /// The VM's supervisor, while it has one.
    pub fn supervisor(&self, name: &VmName) -> Option<SupervisorHandle> {
        self.lock().get(name).and_then(|e| e.supervisor.clone())
    }

    /// Ends every supervisor task (the launcher is going away; the VMs run on and the
    /// next launcher re-adopts them).
    pub fn abort_supervisors(&self) {
        for e in self.lock().values_mut() {
            if let Some(s) = e.supervisor.take() {
                s.abort();
            }
        }
    }

    /// Number of VMs in each state.
    pub fn counts(&self) -> HashMap<VmState, u64> {
        let mut counts = HashMap::new();
        for r in self.all() {
            *counts.entry(r.state).or_default() += 1;
        }
        counts
    }
}

fn busy(name: &VmName) -> LauncherError {
    LauncherError::Conflict(format!("VM {name} has another operation in progress"))
}

/// The record of a name claimed for its first start, before it has one.
fn placeholder() -> VmRecord {
    VmRecord {
        name: String::new(),
        model: None,
        mem_mib: 0,
        vcpus: 0,
        image: String::new(),
        root_hash: String::new(),
        backend: String::new(),
        state: VmState::Stopped,
        reason: None,
        boot_ms: None,
        started_at: None,
        process: None,
        helpers: Vec::new(),
        vsock: false,
        socket_dir: None,
        snapshots: false,
        idempotency_key: None,
        token_budget: None,
        agent_runtime: None,
        ready_timeout_secs: None,
    }
}
