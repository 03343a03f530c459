//! The launcher's façade: each public method is one operation of the REST API. It
//! parses names once ([`VmName`], [`crate::names::SnapshotTag`]), holds the VM for the
//! operation ([`Registry::claim`]), and drives the backend; state changes go through the
//! registry and the per-VM [`supervisor`](crate::supervisor) follows each running
//! hypervisor.
//!
//! Split by concern: this file (start, stop, pause, resume, delete, console, guest),
//! `images.rs` (which image a VM boots, verified, and what the hypervisor is handed),
//! `snapshots.rs` (snapshot, restore), `adopt.rs` (re-adoption after a restart).

mod adopt;
mod images;
mod snapshots;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clawos_service::metrics::{Counter, GaugeFamily};
use clawos_vm_launcher_api::{StartVm, Vm, VmState};

use crate::backend::{BackendError, Hypervisor, LaunchSpec, Launched};
use crate::config::Config;
use crate::host::ProcessId;
use crate::names::VmName;
use crate::registry::{Registry, StartClaim};
use crate::state::Event;
use crate::store::{self, VmDir, VmRecord};
use crate::supervisor::{self, Boot};
use crate::vsock::GuestClient;
use crate::{LauncherError, console, relays, validate};

/// The launcher's `/metrics`, in the daemon's one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: clawos_service::Metrics,
    vms: GaugeFamily,
    starts: Counter,
    images_refused: Counter,
    failures: Counter,
    pub(crate) adopted: Counter,
    pub(crate) relay_refused: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = clawos_service::Metrics::new();
        let vms = registry.gauge_family("clawos_launcher_vms", "VMs by state.");
        let starts = registry.counter("clawos_launcher_vm_starts_total", "VM boots started.");
        let images_refused = registry.counter(
            "clawos_launcher_images_refused_total",
            "Starts refused by image verification.",
        );
        let failures = registry.counter(
            "clawos_launcher_vm_failures_total",
            "VMs that ended failed.",
        );
        let adopted = registry.counter(
            "clawos_launcher_vms_adopted_total",
            "Running VMs re-adopted after a restart.",
        );
        let relay_refused = registry.counter(
            "clawos_launcher_relay_refused_total",
            "Guest connections closed for being over their VM's relay limit.",
        );
        Self {
            registry,
            vms,
            starts,
            images_refused,
            failures,
            adopted,
            relay_refused,
        }
    }

    pub(crate) fn vm_failed(&self) {
        self.failures.inc();
    }
}

/// Longest a start waits for another start of the same VM with the same idempotency
/// key to end.
pub const IDEMPOTENT_WAIT: Duration =
    Duration::from_secs(clawos_vm_launcher_api::IDEMPOTENT_WAIT_SECS);

/// What the façade, the supervisors and the relays share.
#[derive(Debug)]
pub struct Shared {
    pub cfg: Config,
    pub backend: Arc<dyn Hypervisor>,
    pub registry: Registry,
    pub metrics: Metrics,
    /// The launcher's own key for sealing snapshots (`<state>/snapshot-seal.key`, 0600).
    snapshot_key: Vec<u8>,
    host_mem_mib: u64,
    host_cpus: u32,
}

/// The launcher: every VM operation.
#[derive(Debug)]
pub struct Launcher {
    shared: Arc<Shared>,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn no_vm(name: &VmName) -> LauncherError {
    LauncherError::NotFound(format!("no VM named {name}"))
}

/// The agent's `/workspace/.env`. The agent talks to the in-guest relay on
/// 127.0.0.1:11435, which forwards to the host's inference proxy; no API key ever goes
/// here, the proxy injects it on the host.
fn agent_env(
    name: &VmName,
    model: Option<&str>,
    proxy_url: &str,
    skills: bool,
    secret: &str,
) -> String {
    let mut env = format!(
        "CLAWOS_AGENT_NAME={name}\n\
         CLAWOS_INFERENCE_PROXY_URL={proxy_url}\n\
         ANTHROPIC_BASE_URL=http://127.0.0.1:11435\n\
         OPENAI_BASE_URL=http://127.0.0.1:11435/v1\n"
    );
    // The skills relay exists only when the host runs skill-manager.
    if skills {
        env.push_str("CLAWOS_MCP_URL=http://127.0.0.1:2083/mcp\n");
    }
    if let Some(m) = model {
        env.push_str(&format!("CLAWOS_MODEL={m}\n"));
    }
    // clawos-init moves this line to /run/clawos (tmpfs, 0600); it never reaches .env.
    env.push_str(&format!("CLAWOS_CONTROL_SECRET={secret}\n"));
    env
}

impl Launcher {
    /// A launcher over `cfg`'s state directory, re-adopting VMs left by an earlier run.
    /// Must be called inside a Tokio runtime (re-adopted VMs get their supervisors).
    pub fn new(cfg: Config, backend: Arc<dyn Hypervisor>) -> Result<Arc<Self>, LauncherError> {
        let vms_dir =
            store::init_state(&cfg.state_dir).map_err(|e| LauncherError::io(&cfg.state_dir, e))?;
        let key_path = cfg.state_dir.join("snapshot-seal.key");
        let snapshot_key = clawos_service::operator_token(&key_path)
            .map_err(LauncherError::Internal)?
            .into_bytes();
        let shared = Arc::new(Shared {
            snapshot_key,
            cfg,
            backend,
            registry: Registry::new(vms_dir),
            metrics: Metrics::new(),
            host_mem_mib: crate::host::mem_total_mib(),
            host_cpus: crate::host::cpus(),
        });
        adopt::adopt_all(&shared)?;
        // What ended VMs may have left outside their directories (a cgroup whose
        // removal a crash interrupted).
        for r in shared.registry.all() {
            if !r.state.is_active()
                && let Ok(n) = VmName::parse(&r.name)
            {
                shared.backend.cleanup(&shared.registry.dir(&n));
            }
        }
        Ok(Arc::new(Self { shared }))
    }

    fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    fn record(&self, name: &VmName) -> Result<VmRecord, LauncherError> {
        self.registry().get(name).ok_or_else(|| no_vm(name))
    }

    /// All VMs, sorted by name.
    pub fn list(&self) -> Vec<Vm> {
        let mut v: Vec<Vm> = self.registry().all().iter().map(VmRecord::view).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One VM.
    pub fn get(&self, name: &str) -> Result<Vm, LauncherError> {
        let name = VmName::parse(name)?;
        self.record(&name).map(|r| r.view())
    }

    /// Creates (if new) and boots a VM. Returns once the hypervisor runs; readiness is
    /// reported by its supervisor (`starting` → `running`).
    ///
    /// With an idempotency key equal to the one recorded for the VM, nothing is booted:
    /// the answer is the VM as it is now (that start's attempt, whatever became of it).
    /// Starts with the same key arriving while one holds the VM wait for it (at most
    /// [`IDEMPOTENT_WAIT`]), so concurrent retries boot once.
    pub async fn start(&self, req: StartVm) -> Result<Vm, LauncherError> {
        let name = VmName::parse(&req.name)?;
        if let Some(m) = &req.model {
            validate::model(m)?;
        }
        if let Some(k) = &req.idempotency_key {
            validate::idempotency_key(k)?;
        }
        if let Some(n) = req.token_budget {
            validate::token_budget(n)?;
        }
        validate::resources(
            req.mem_mib,
            req.vcpus,
            self.shared.host_mem_mib,
            self.shared.host_cpus,
        )?;
        let key = req.idempotency_key.as_deref();
        let deadline = tokio::time::Instant::now() + IDEMPOTENT_WAIT;
        let _claim = loop {
            match self.registry().claim_start(&name, key)? {
                StartClaim::Claimed(c) => break c,
                StartClaim::Done(r) => {
                    tracing::info!(vm = %name, state = %r.state, "start with a known idempotency key: nothing booted");
                    return Ok(r.view());
                }
                StartClaim::Wait(mut released) => {
                    if tokio::time::timeout_at(deadline, released.changed())
                        .await
                        .is_err()
                    {
                        return Err(LauncherError::Conflict(format!(
                            "a start of VM {name} with the same idempotency key is still in progress after {} s",
                            IDEMPOTENT_WAIT.as_secs()
                        )));
                    }
                }
            }
        };
        let existing = self.registry().get(&name);
        if let Some(r) = &existing
            && r.state.is_active()
        {
            return Err(LauncherError::Conflict(format!(
                "VM {name} is already {}",
                r.state
            )));
        }
        let image = images::parse_name(req.image.as_deref())?;
        // Verified before anything is created or started: a refused image leaves no trace.
        let image = self.verify_image(&image).await?;
        // Its runtime's needs, as its signed manifest states them: still nothing made.
        let runtime = image.manifest().agent_runtime.clone();
        validate::runtime_memory(&image.name, runtime.as_ref(), req.mem_mib)?;

        let cfg = &self.shared.cfg;
        let dir = match &existing {
            Some(_) => self.registry().dir(&name),
            None => store::create(
                self.registry().vms_dir(),
                &name,
                cfg.runtime_disk_mib,
                cfg.workspace_disk_mib,
            )?,
        };
        let mut record = VmRecord {
            name: name.to_string(),
            model: req.model.clone(),
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            image: image.name.clone(),
            root_hash: image.manifest().verity.root_hash.clone(),
            backend: self.shared.backend.name().to_owned(),
            state: existing.as_ref().map_or(VmState::Stopped, |r| r.state),
            reason: existing.as_ref().and_then(|r| r.reason.clone()),
            boot_ms: None,
            started_at: existing.as_ref().and_then(|r| r.started_at),
            process: None,
            helpers: Vec::new(),
            vsock: false,
            socket_dir: None,
            snapshots: req.snapshots,
            idempotency_key: req.idempotency_key.clone(),
            token_budget: req.token_budget,
            agent_runtime: None,
            ready_timeout_secs: None,
        };
        record.set_agent_runtime(runtime.as_ref());
        if let Some(rt) = &runtime {
            tracing::info!(vm = %name, image = %image.name, runtime = %rt.name, version = %rt.version, ready_timeout_secs = rt.ready_timeout_secs, "image runs its own agent runtime");
        }
        let booted = self.boot(&name, &dir, &req, image, record).await;
        if booted.is_err() && existing.is_none() {
            self.registry().remove(&name);
            let _ = store::remove(self.registry().vms_dir(), &name);
        }
        booted
    }

    async fn boot(
        &self,
        name: &VmName,
        dir: &VmDir,
        req: &StartVm,
        image: images::Verified,
        record: VmRecord,
    ) -> Result<Vm, LauncherError> {
        let secret = dir
            .new_secret()
            .map_err(|e| LauncherError::io(&dir.secret(), e))?;
        let env = agent_env(
            name,
            req.model.as_deref(),
            &self.shared.cfg.inference_proxy_url,
            self.shared.cfg.skills_authority.is_some(),
            &secret,
        );
        store::write_config_disk(dir, &env)?;
        store::rotate_console(dir)?;
        let started = Instant::now();
        let files = self.stage_boot(dir, image).await?;
        let spec = launch_spec(name, dir, req.mem_mib, req.vcpus, &files, req.snapshots);
        let launched = self
            .shared
            .backend
            .launch(&spec)
            .await
            .map_err(|e| match e {
                BackendError::Unsupported(m) => LauncherError::image_unbootable(m),
                e => LauncherError::Internal(e.to_string()),
            })?;
        self.track(name, record, launched, started)
    }

    /// Records a launched hypervisor and hands it to a new supervisor.
    fn track(
        &self,
        name: &VmName,
        mut record: VmRecord,
        launched: Launched,
        started: Instant,
    ) -> Result<Vm, LauncherError> {
        let dir = self.registry().dir(name);
        let child = launched.child;
        let pid = child.id().unwrap_or(0);
        let process = ProcessId::of(pid).ok_or_else(|| {
            for h in &launched.helpers {
                h.signal(libc::SIGKILL);
            }
            LauncherError::Internal(format!(
                "hypervisor exited at once: {}",
                console::tail(&dir.hypervisor_log(), 2000).trim()
            ))
        })?;
        dir.write_pid(process)
            .map_err(|e| LauncherError::io(&dir.pid(), e))?;
        record.process = Some(process);
        record.helpers = launched.helpers;
        record.vsock = launched.vsock;
        record.socket_dir = launched.socket_dir;
        self.registry().put(record)?;
        let started_at = now_unix();
        self.registry()
            .apply(name, Event::Launched, |r| {
                r.reason = None;
                r.boot_ms = None;
                r.started_at = Some(started_at);
            })
            .map_err(|e| LauncherError::Internal(e.to_string()))?;
        let record = self.record(name)?;
        tracing::info!(vm = %name, pid, backend = self.shared.backend.name(), root_hash = %record.root_hash, "VM started");
        relays::register_with_monitor(&self.shared.cfg, &record);
        self.shared.metrics.starts.inc();
        let handle = supervisor::spawn(
            Arc::clone(&self.shared),
            Boot {
                name: name.clone(),
                child: Some(child),
                process,
                started,
                console_offset: 0,
            },
        );
        self.registry().set_supervisor(name, handle);
        Ok(record.view())
    }

    /// The record of a VM that exists and is not running (what `op` needs).
    fn inactive_record(&self, name: &VmName, op: &str) -> Result<VmRecord, LauncherError> {
        let record = self.record(name)?;
        if record.state.is_active() {
            return Err(LauncherError::Conflict(format!(
                "cannot {op} VM {name}: it is {}; stop it first",
                record.state
            )));
        }
        Ok(record)
    }

    /// Asks the guest to power off, waits, kills after the stop timeout. Disks stay.
    pub async fn stop(&self, name: &str) -> Result<Vm, LauncherError> {
        let name = VmName::parse(name)?;
        let _claim = self.registry().claim(&name)?;
        let record = self.record(&name)?;
        if !record.state.is_active() {
            return Ok(record.view());
        }
        let dir = self.registry().dir(&name);
        if record.state == VmState::Paused {
            // A frozen guest cannot see the power button.
            if let Err(e) = self.shared.backend.resume(&dir).await {
                tracing::warn!(vm = %name, error = %e, "resume before stop failed");
            }
        }
        if self
            .registry()
            .apply(&name, Event::StopRequested, |_| {})
            .is_ok()
            && let Err(e) = self.shared.backend.request_stop(&dir).await
        {
            tracing::warn!(vm = %name, error = %e, "clean stop request failed; will kill");
        }
        let inactive = |s: VmState| !s.is_active();
        let stop_timeout = self.shared.cfg.stop_timeout;
        if !self
            .registry()
            .wait_until(&name, stop_timeout, inactive)
            .await
        {
            tracing::warn!(vm = %name, "guest did not power off in time; killing it");
            let asked = self.registry().supervisor(&name).is_some_and(|s| s.kill());
            if !asked && let Some(p) = record.process {
                p.signal(libc::SIGKILL);
            }
            if !self
                .registry()
                .wait_until(&name, Duration::from_secs(10), inactive)
                .await
            {
                return Err(LauncherError::Internal(format!(
                    "VM {name}'s hypervisor survived SIGKILL"
                )));
            }
        }
        self.record(&name).map(|r| r.view())
    }

    /// Deletes a VM that is not running, with its disks.
    pub fn delete(&self, name: &str) -> Result<(), LauncherError> {
        let name = VmName::parse(name)?;
        let claim = self.registry().claim(&name)?;
        self.inactive_record(&name, "delete")?;
        // A token a killed launcher could not revoke when the VM ended.
        let root = self.registry().dir(&name).root;
        let leftovers: Vec<String> = crate::identity::TokenFor::ALL
            .into_iter()
            .filter_map(|purpose| crate::identity::recorded_jti(&root, purpose))
            .collect();
        store::remove(self.registry().vms_dir(), &name)?;
        for jti in leftovers {
            crate::identity::revoke_in_background(self.shared.cfg.identity.as_ref(), &name, jti);
        }
        self.registry().remove(&name);
        drop(claim);
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    /// Console bytes from `offset` (at most 1 MiB) and the next offset.
    pub fn console(&self, name: &str, offset: u64) -> Result<(Vec<u8>, u64), LauncherError> {
        use std::io::{Read, Seek, SeekFrom};
        let name = VmName::parse(name)?;
        self.record(&name)?;
        let path = self.registry().dir(&name).console();
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(LauncherError::io(&path, e)),
        };
        let len = f.metadata().map_err(|e| LauncherError::io(&path, e))?.len();
        let from = offset.min(len);
        f.seek(SeekFrom::Start(from))
            .map_err(|e| LauncherError::io(&path, e))?;
        let mut buf = Vec::new();
        f.take(1 << 20)
            .read_to_end(&mut buf)
            .map_err(|e| LauncherError::io(&path, e))?;
        let next = from + buf.len() as u64;
        Ok((buf, next))
    }

    /// Freezes a running VM.
    pub async fn pause(&self, name: &str) -> Result<Vm, LauncherError> {
        let name = VmName::parse(name)?;
        let _claim = self.registry().claim(&name)?;
        self.expect_state(&name, VmState::Running, "pause")?;
        self.shared
            .backend
            .pause(&self.registry().dir(&name))
            .await
            .map_err(|e| LauncherError::Internal(e.to_string()))?;
        self.transition(&name, Event::Paused)?;
        tracing::info!(vm = %name, "VM paused");
        self.record(&name).map(|r| r.view())
    }

    /// Lets a paused VM run again.
    pub async fn resume(&self, name: &str) -> Result<Vm, LauncherError> {
        let name = VmName::parse(name)?;
        let _claim = self.registry().claim(&name)?;
        self.expect_state(&name, VmState::Paused, "resume")?;
        self.shared
            .backend
            .resume(&self.registry().dir(&name))
            .await
            .map_err(|e| LauncherError::Internal(e.to_string()))?;
        self.transition(&name, Event::Resumed)?;
        tracing::info!(vm = %name, "VM resumed");
        self.record(&name).map(|r| r.view())
    }

    /// Applies a state event the caller has made happen; if the VM ended meanwhile
    /// (its supervisor recorded that), the operation is a conflict, not a crash.
    fn transition(&self, name: &VmName, event: Event) -> Result<VmState, LauncherError> {
        self.registry()
            .apply(name, event, |_| {})
            .map_err(|e| LauncherError::Conflict(format!("VM {name}: {e}")))
    }

    fn expect_state(
        &self,
        name: &VmName,
        want: VmState,
        op: &str,
    ) -> Result<VmRecord, LauncherError> {
        let r = self.record(name)?;
        if r.state != want {
            let hint = match r.state {
                VmState::Paused => "; resume it first",
                VmState::Starting => "; the guest is not ready yet",
                VmState::Stopped | VmState::Failed => "; start it first",
                _ => "",
            };
            return Err(LauncherError::Conflict(format!(
                "cannot {op} VM {name}: it is {}{hint}",
                r.state
            )));
        }
        Ok(r)
    }

    /// A client for a running VM's guest agent.
    pub fn guest(&self, name: &str, op: &str) -> Result<GuestClient, LauncherError> {
        let name = VmName::parse(name)?;
        let r = self.expect_state(&name, VmState::Running, op)?;
        if !r.vsock {
            return Err(LauncherError::Conflict(format!(
                "VM {name} has no control channel (vhost-device-vsock was not installed when it started)"
            )));
        }
        let dir = self.registry().dir(&name);
        let secret = dir
            .read_secret()
            .map_err(|e| LauncherError::io(&dir.secret(), e))?;
        Ok(GuestClient {
            dir: r.socket_dir.clone().unwrap_or(dir.root),
            secret,
        })
    }

    /// Prometheus text exposition.
    pub fn metrics_text(&self) -> String {
        self.refresh_vm_gauge();
        self.shared.metrics.registry.render()
    }

    /// `GET /metrics`.
    pub fn metrics_response(&self) -> axum::response::Response {
        self.refresh_vm_gauge();
        self.shared.metrics.registry.response()
    }

    /// Sets the per-state gauge from the registry; every state is set, so a state
    /// with no VM shows 0 rather than vanishing.
    fn refresh_vm_gauge(&self) {
        let counts = self.registry().counts();
        for s in [
            VmState::Starting,
            VmState::Running,
            VmState::Paused,
            VmState::Stopping,
            VmState::Stopped,
            VmState::Failed,
        ] {
            let n = counts.get(&s).copied().unwrap_or(0);
            self.shared
                .metrics
                .vms
                .get_or_create(&vec![("state", s.to_string())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

impl Drop for Launcher {
    /// VMs outlive the launcher (the next one re-adopts them); their supervisors do not,
    /// so a launcher replaced in the same process leaves no second watcher behind.
    fn drop(&mut self) {
        self.shared.registry.abort_supervisors();
    }
}

/// What a backend needs to boot (or restore) one VM: the verified copies and the
/// rootfs's checked descriptor, never an image path.
fn launch_spec(
    name: &VmName,
    dir: &VmDir,
    mem_mib: u32,
    vcpus: u32,
    files: &images::BootFiles,
    snapshots: bool,
) -> LaunchSpec {
    LaunchSpec {
        name: name.to_string(),
        dir: dir.clone(),
        mem_mib,
        vcpus,
        kernel: files.kernel.clone(),
        vmlinux: files.vmlinux.clone(),
        initramfs: files.initramfs.clone(),
        rootfs: files.rootfs_path.clone(),
        rootfs_fd: Some(Arc::clone(&files.rootfs)),
        image_cmdline: files.manifest.cmdline.clone(),
        snapshots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_never_carries_a_key() {
        let name = VmName::parse("a1").expect("name");
        let env = agent_env(
            &name,
            Some("claude-x"),
            "http://127.0.0.1:11435",
            false,
            "f00",
        );
        assert!(env.contains("CLAWOS_AGENT_NAME=a1\n"));
        assert!(env.contains("CLAWOS_MODEL=claude-x\n"));
        assert!(env.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:11435\n"));
        assert!(!env.to_lowercase().contains("api_key"));
        assert!(
            !env.contains("CLAWOS_MCP_URL"),
            "no skills relay, no skills"
        );
        let env = agent_env(&name, None, "http://127.0.0.1:11435", true, "f00");
        assert!(env.contains("CLAWOS_MCP_URL=http://127.0.0.1:2083/mcp\n"));
    }
}
