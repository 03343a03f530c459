//! The VM life cycle: verify → prepare disks → boot → watch → stop, and re-adoption of
//! running VMs after a launcher restart.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clawos_image::{ImagePaths, Manifest, VerifyPolicy};
use clawos_vm_launcher_api::{Snapshot, StartVm, Vm, VmState};
use tokio::process::Child;

use crate::backend::{BackendError, Hypervisor, LaunchSpec, VSOCK_SOCKET};
use crate::config::Config;
use crate::host::ProcessId;
use crate::store::{self, VmDir, VmRecord};
use crate::vsock::GuestClient;
use crate::{LauncherError, console, snapshot, validate};

/// How often a watcher looks at its VM.
const WATCH_INTERVAL: Duration = Duration::from_millis(25);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub starts: AtomicU64,
    pub images_refused: AtomicU64,
    pub failures: AtomicU64,
    pub adopted: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    vms: HashMap<String, VmRecord>,
    /// Names with an operation in flight (start, stop, delete).
    busy: HashSet<String>,
    /// Per-VM relay tasks (guest → host inference proxy), ended with the VM.
    relays: HashMap<String, tokio::task::JoinHandle<()>>,
}

/// The launcher: owns every VM's record and watcher.
#[derive(Debug)]
pub struct Launcher {
    cfg: Config,
    vms_dir: PathBuf,
    backend: Box<dyn Hypervisor>,
    inner: Mutex<Inner>,
    host_mem_mib: u64,
    host_cpus: u32,
    pub metrics: Metrics,
}

/// Releases a name's busy mark when an operation ends, however it ends.
struct Claim<'a> {
    launcher: &'a Launcher,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.launcher.lock().busy.remove(&self.name);
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The agent's `/workspace/.env`. The agent talks to the in-guest relay on
/// 127.0.0.1:11435, which forwards to the host's inference proxy; no API key ever goes
/// here, the proxy injects it on the host.
fn agent_env(name: &str, model: Option<&str>, proxy_url: &str, secret: &str) -> String {
    let mut env = format!(
        "CLAWOS_AGENT_NAME={name}\n\
         CLAWOS_INFERENCE_PROXY_URL={proxy_url}\n\
         ANTHROPIC_BASE_URL=http://127.0.0.1:11435\n\
         OPENAI_BASE_URL=http://127.0.0.1:11435/v1\n"
    );
    if let Some(m) = model {
        env.push_str(&format!("CLAWOS_MODEL={m}\n"));
    }
    // clawos-init moves this line to /run/clawos (tmpfs, 0600); it never reaches .env.
    env.push_str(&format!("CLAWOS_CONTROL_SECRET={secret}\n"));
    env
}

/// `host:port` of an http(s) URL.
fn url_authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let auth = rest.split('/').next()?;
    if auth.is_empty() {
        return None;
    }
    if auth
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        return Some(auth.to_owned());
    }
    Some(format!(
        "{auth}:{}",
        if scheme == "https" { 443 } else { 80 }
    ))
}

/// Relays the guest's syscall audit stream (its `clawos-audit` connects to host vsock
/// port 2084, which arrives on `<vsock>_2084` here) to monitor-daemon's guest socket.
/// The header line names the VM: the guest cannot choose where its events are filed.
/// A monitor that is down ends the guest's connection; the guest queues and retries.
async fn audit_relay(dir: PathBuf, vm: String, state_dir: PathBuf) {
    use tokio::io::AsyncWriteExt;
    let name = format!("{VSOCK_SOCKET}_{}", clawos_guest::protocol::AUDIT_PORT);
    let listener = match crate::backend::bind_in_dir(&dir, &name) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(vm = %vm, dir = %dir.display(), error = %e, "guest audit relay not available");
            return;
        }
    };
    let socket = clawos_monitor_api::guest_socket_path(&state_dir);
    let token_path = clawos_monitor_api::token_path(&state_dir);
    loop {
        let Ok((mut guest, _)) = listener.accept().await else {
            continue;
        };
        let (vm, socket, token_path) = (vm.clone(), socket.clone(), token_path.clone());
        tokio::spawn(async move {
            let token = match tokio::fs::read_to_string(&token_path).await {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    tracing::warn!(vm = %vm, path = %token_path.display(), error = %e, "no monitor-daemon token; guest audit stream waits");
                    return;
                }
            };
            let mut monitor = match tokio::net::UnixStream::connect(&socket).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(vm = %vm, socket = %socket.display(), error = %e, "monitor-daemon not taking guest streams; the guest queues");
                    return;
                }
            };
            let header = clawos_monitor_api::GuestStreamHeader {
                token,
                agent: vm.clone(),
                vm: vm.clone(),
            };
            let mut line = serde_json::to_vec(&header).unwrap_or_default();
            line.push(b'\n');
            // Both ways: records to the monitor, its acknowledgements back.
            if monitor.write_all(&line).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut guest, &mut monitor).await;
            }
        });
    }
}

/// Relays guest connections to the inference proxy: the guest agent forwards its
/// `127.0.0.1:11435` to host vsock port 11435, which arrives on `<vsock>_11435` here.
async fn proxy_relay(dir: PathBuf, target: String) {
    let name = format!("{VSOCK_SOCKET}_{}", clawos_guest::protocol::PROXY_PORT);
    let listener = match crate::backend::bind_in_dir(&dir, &name) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "LLM relay not available");
            return;
        }
    };
    loop {
        let Ok((mut guest, _)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(&target).await {
                Ok(mut upstream) => {
                    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
                }
                Err(e) => {
                    tracing::warn!(%target, error = %e, "inference proxy unreachable for a guest connection")
                }
            }
        });
    }
}

impl Launcher {
    /// A launcher over `cfg`'s state directory, re-adopting VMs left by an earlier run.
    pub fn new(cfg: Config, backend: Box<dyn Hypervisor>) -> Result<Arc<Self>, LauncherError> {
        let vms_dir =
            store::init_state(&cfg.state_dir).map_err(|e| LauncherError::io(&cfg.state_dir, e))?;
        let launcher = Arc::new(Self {
            cfg,
            vms_dir,
            backend,
            inner: Mutex::new(Inner::default()),
            host_mem_mib: crate::host::mem_total_mib(),
            host_cpus: crate::host::cpus(),
            metrics: Metrics::default(),
        });
        launcher.adopt_all()?;
        Ok(launcher)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated (every
        // update is a single insert), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self, name: &str) -> VmDir {
        VmDir::new(&self.vms_dir, name)
    }

    /// Marks `name` busy; fails if it is already.
    fn claim(&self, name: &str) -> Result<Claim<'_>, LauncherError> {
        if !self.lock().busy.insert(name.to_owned()) {
            return Err(LauncherError::Conflict(format!(
                "VM {name} has another operation in progress"
            )));
        }
        Ok(Claim {
            launcher: self,
            name: name.to_owned(),
        })
    }

    /// Stores a record in memory and on disk.
    fn commit(&self, record: VmRecord) {
        if let Err(e) = self.dir(&record.name).save(&record) {
            tracing::error!(vm = %record.name, error = %e, "cannot persist VM state");
        }
        self.lock().vms.insert(record.name.clone(), record);
    }

    fn record(&self, name: &str) -> Option<VmRecord> {
        self.lock().vms.get(name).cloned()
    }

    /// All VMs, sorted by name.
    pub fn list(&self) -> Vec<Vm> {
        let mut v: Vec<Vm> = self.lock().vms.values().map(VmRecord::view).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One VM.
    pub fn get(&self, name: &str) -> Result<Vm, LauncherError> {
        validate::name(name)?;
        self.record(name)
            .map(|r| r.view())
            .ok_or_else(|| LauncherError::NotFound(format!("no VM named {name}")))
    }

    fn image_paths(&self, image: Option<&str>) -> Result<(PathBuf, ImagePaths), LauncherError> {
        let dir = match image {
            Some(d) => {
                let p = PathBuf::from(d);
                if !p.is_absolute() {
                    return Err(LauncherError::Invalid(format!(
                        "image path {d:?} must be absolute"
                    )));
                }
                p
            }
            None => self.cfg.image_dir.clone().ok_or_else(|| {
                LauncherError::Invalid(
                    "no image given and no default image configured (CLAWOS_IMAGE_DIR)".into(),
                )
            })?,
        };
        if !dir.is_dir() {
            return Err(LauncherError::Invalid(format!(
                "image directory {} does not exist",
                dir.display()
            )));
        }
        let mut paths = ImagePaths::bundle(&dir);
        if image.is_none() {
            if let Some(k) = &self.cfg.kernel_override {
                paths.kernel = k.clone();
            }
            if let Some(r) = &self.cfg.rootfs_override {
                paths.rootfs = r.clone();
            }
        }
        Ok((dir, paths))
    }

    async fn verify(&self, paths: &ImagePaths) -> Result<Manifest, LauncherError> {
        let policy = VerifyPolicy {
            public_key: self.cfg.public_key,
            pinned_root_hash: self.cfg.pinned_root_hash.clone(),
        };
        let p = paths.clone();
        let result = tokio::task::spawn_blocking(move || clawos_image::verify(&p, &policy))
            .await
            .map_err(|e| LauncherError::Internal(format!("verification task: {e}")))?;
        result.map_err(|e| {
            self.metrics.images_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "image refused");
            LauncherError::ImageRefused(e.to_string())
        })
    }

    /// Creates (if new) and boots a VM. Returns once the hypervisor runs; readiness is
    /// reported by the watcher (`starting` → `running`).
    pub async fn start(self: &Arc<Self>, req: StartVm) -> Result<Vm, LauncherError> {
        validate::name(&req.name)?;
        if let Some(m) = &req.model {
            validate::model(m)?;
        }
        validate::resources(req.mem_mib, req.vcpus, self.host_mem_mib, self.host_cpus)?;
        let _claim = self.claim(&req.name)?;
        let existing = self.record(&req.name);
        if let Some(r) = &existing
            && r.state.is_active()
        {
            return Err(LauncherError::Conflict(format!(
                "VM {} is already {}",
                req.name, r.state
            )));
        }
        let (image_dir, paths) = self.image_paths(req.image.as_deref())?;
        // Verified before anything is created or started: a refused image leaves no trace.
        let manifest = self.verify(&paths).await?;

        let is_new = existing.is_none();
        let dir = match existing {
            Some(_) => self.dir(&req.name),
            None => store::create(
                &self.vms_dir,
                &req.name,
                self.cfg.runtime_disk_mib,
                self.cfg.workspace_disk_mib,
            )?,
        };
        let launched = self.boot(&req, &dir, &image_dir, &paths, &manifest).await;
        match launched {
            Ok(vm) => Ok(vm),
            Err(e) => {
                if is_new {
                    let _ = store::remove(&self.vms_dir, &req.name);
                }
                Err(e)
            }
        }
    }

    async fn boot(
        self: &Arc<Self>,
        req: &StartVm,
        dir: &VmDir,
        image_dir: &Path,
        paths: &ImagePaths,
        manifest: &Manifest,
    ) -> Result<Vm, LauncherError> {
        let secret = dir
            .new_secret()
            .map_err(|e| LauncherError::io(&dir.secret(), e))?;
        store::write_config_disk(
            dir,
            &agent_env(
                &req.name,
                req.model.as_deref(),
                &self.cfg.inference_proxy_url,
                &secret,
            ),
        )?;
        store::rotate_console(dir)?;
        let spec = launch_spec(
            &req.name,
            dir,
            req.mem_mib,
            req.vcpus,
            paths,
            manifest,
            req.snapshots,
        );
        let started = Instant::now();
        let launched = self.backend.launch(&spec).await.map_err(|e| match e {
            BackendError::Unsupported(m) => LauncherError::ImageRefused(m),
            e => LauncherError::Internal(e.to_string()),
        })?;
        let record = VmRecord {
            name: req.name.clone(),
            model: req.model.clone(),
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            image: image_dir.display().to_string(),
            root_hash: manifest.verity.root_hash.clone(),
            backend: self.backend.name().to_owned(),
            state: VmState::Starting,
            reason: None,
            boot_ms: None,
            started_at: Some(now_unix()),
            process: None,
            helpers: Vec::new(),
            vsock: false,
            socket_dir: None,
            snapshots: req.snapshots,
        };
        self.track(record, launched, started)
    }

    /// Records a launched VM and starts its watcher (and relay).
    fn track(
        self: &Arc<Self>,
        mut record: VmRecord,
        launched: crate::backend::Launched,
        started: Instant,
    ) -> Result<Vm, LauncherError> {
        let dir = self.dir(&record.name);
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
        let view = record.view();
        let name = record.name.clone();
        if record.vsock {
            self.start_relay(&name);
        }
        tracing::info!(vm = %name, pid, backend = self.backend.name(), root_hash = %record.root_hash, "VM started");
        self.register_with_monitor(&record);
        self.commit(record);
        self.metrics.starts.fetch_add(1, Ordering::Relaxed);
        let me = Arc::clone(self);
        tokio::spawn(async move { me.watch(name, Some(child), process, started, 0).await });
        Ok(view)
    }

    /// Saves a running or paused VM: memory and device state, and copies of the disks
    /// that state goes with. The guest is frozen meanwhile (reported `paused`) and
    /// returns to its previous state afterwards.
    pub async fn snapshot(&self, name: &str, tag: Option<&str>) -> Result<Snapshot, LauncherError> {
        validate::name(name)?;
        let tag = match tag {
            Some(t) => t.to_owned(),
            None => format!("snap-{}", now_unix()),
        };
        validate::snapshot_tag(&tag)?;
        let _claim = self.claim(name)?;
        let record = self
            .record(name)
            .ok_or_else(|| LauncherError::NotFound(format!("no VM named {name}")))?;
        if !matches!(record.state, VmState::Running | VmState::Paused) {
            return Err(LauncherError::Conflict(format!(
                "cannot snapshot VM {name}: it is {}; only a running or paused VM can be saved",
                record.state
            )));
        }
        if let Some(why) = self.backend.snapshot_unsupported(record.snapshots) {
            return Err(LauncherError::Conflict(format!(
                "cannot snapshot VM {name}: {why}"
            )));
        }
        let dir = self.dir(name);
        if snapshot::SnapshotDir::new(&dir, &tag).root.exists() {
            return Err(LauncherError::Conflict(format!(
                "VM {name} already has a snapshot tagged {tag}"
            )));
        }
        let staging = snapshot::begin(&dir, &tag)?;
        let was_paused = record.state == VmState::Paused;
        self.update(name, |r| r.state = VmState::Paused);
        let frozen = Instant::now();
        let saved = async {
            let state_bytes = self
                .backend
                .save(&dir, &staging.relative)
                .await
                .map_err(|e| LauncherError::Internal(format!("saving VM {name}: {e}")))?;
            let (d, s) = (dir.clone(), staging.clone());
            let disk_bytes = tokio::task::spawn_blocking(move || snapshot::copy_disks_in(&d, &s))
                .await
                .map_err(|e| LauncherError::Internal(format!("disk copy task: {e}")))??;
            Ok::<_, LauncherError>((state_bytes, disk_bytes))
        }
        .await;
        // Whatever happened, bring the VM back.
        let back = self
            .backend
            .after_save(&dir, &record.helpers, !was_paused)
            .await;
        let save_ms = frozen.elapsed().as_millis() as u64;
        if back.is_ok() && !was_paused && record.vsock {
            // The guest takes a moment to probe the re-plugged vsock device; answer
            // only once the control channel works again, so the next exec does not
            // race it.
            let guest = GuestClient {
                dir: record
                    .socket_dir
                    .clone()
                    .unwrap_or_else(|| dir.root.clone()),
                secret: dir.read_secret().unwrap_or_default(),
            };
            if !wait_healthy(&guest, Duration::from_secs(15)).await {
                tracing::warn!(vm = %name, "guest agent not answering after the snapshot");
            }
        }
        match &back {
            Ok(helpers) => {
                self.update(name, |r| {
                    r.helpers = helpers.clone();
                    r.state = if was_paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                });
                // The re-plugged vsock device has a new process: audit it too.
                if let Some(r) = self.record(name) {
                    self.register_with_monitor(&r);
                }
            }
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "VM could not be resumed after a snapshot");
            }
        }
        let result = match (saved, back) {
            (Ok((state_bytes, disk_bytes)), Ok(_)) => {
                let rec = Snapshot {
                    tag: tag.clone(),
                    vm: name.to_owned(),
                    created_at: now_unix(),
                    backend: self.backend.name().to_owned(),
                    mem_mib: record.mem_mib,
                    vcpus: record.vcpus,
                    root_hash: record.root_hash.clone(),
                    state_bytes,
                    disk_bytes,
                    save_ms,
                };
                snapshot::commit(&dir, &staging, &rec).map(|_| rec)
            }
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(LauncherError::Internal(format!(
                "VM {name} was saved but could not be resumed ({e}); it stays paused"
            ))),
        };
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging.root);
        }
        let rec = result?;
        tracing::info!(vm = %name, tag = %rec.tag, save_ms, state_bytes = rec.state_bytes, disk_bytes = rec.disk_bytes, "snapshot taken");
        Ok(rec)
    }

    /// A VM's snapshots, oldest first.
    pub fn snapshots(&self, name: &str) -> Result<Vec<Snapshot>, LauncherError> {
        self.get(name)?;
        Ok(snapshot::list(&self.dir(name)))
    }

    /// Deletes one snapshot.
    pub fn delete_snapshot(&self, name: &str, tag: &str) -> Result<(), LauncherError> {
        self.get(name)?;
        validate::snapshot_tag(tag)?;
        let _claim = self.claim(name)?;
        let dir = self.dir(name);
        if !snapshot::SnapshotDir::new(&dir, tag).record().exists() {
            return Err(LauncherError::NotFound(format!(
                "VM {name} has no snapshot tagged {tag}"
            )));
        }
        snapshot::remove(&dir, tag)?;
        tracing::info!(vm = %name, %tag, "snapshot deleted");
        Ok(())
    }

    /// Boots a stopped VM from one of its snapshots: the disks return to the
    /// snapshot's copies, then the saved memory and devices are loaded and run.
    pub async fn restore(self: &Arc<Self>, name: &str, tag: &str) -> Result<Vm, LauncherError> {
        validate::name(name)?;
        validate::snapshot_tag(tag)?;
        let _claim = self.claim(name)?;
        let record = self.inactive_record(name, "restore")?;
        let dir = self.dir(name);
        let snap = snapshot::SnapshotDir::new(&dir, tag);
        let meta = snap.load().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                LauncherError::NotFound(format!("VM {name} has no snapshot tagged {tag}"))
            }
            _ => LauncherError::io(&snap.record(), e),
        })?;
        if meta.backend != self.backend.name() {
            return Err(LauncherError::Conflict(format!(
                "snapshot {tag} was taken on {}, this launcher runs {}",
                meta.backend,
                self.backend.name()
            )));
        }
        let (image_dir, paths) = self.image_paths(Some(&record.image))?;
        let manifest = self.verify(&paths).await?;
        if manifest.verity.root_hash != meta.root_hash {
            return Err(LauncherError::Conflict(format!(
                "snapshot {tag} was taken on image root hash {}, but {} now holds {}; \
                 the saved memory only runs on the image it was taken on",
                meta.root_hash,
                image_dir.display(),
                manifest.verity.root_hash
            )));
        }
        let (d, s) = (dir.clone(), snap.clone());
        tokio::task::spawn_blocking(move || snapshot::copy_disks_out(&d, &s))
            .await
            .map_err(|e| LauncherError::Internal(format!("disk copy task: {e}")))??;
        store::rotate_console(&dir)?;
        let spec = launch_spec(
            name,
            &dir,
            meta.mem_mib,
            meta.vcpus,
            &paths,
            &manifest,
            record.snapshots,
        );
        let started = Instant::now();
        let launched = self
            .backend
            .restore(&spec, &snap.relative)
            .await
            .map_err(|e| LauncherError::Internal(format!("restoring VM {name}: {e}")))?;
        tracing::info!(vm = %name, %tag, ms = started.elapsed().as_millis() as u64, "state loaded");
        let mut rec = record.clone();
        rec.state = VmState::Starting;
        rec.reason = None;
        rec.boot_ms = None;
        rec.started_at = Some(now_unix());
        rec.mem_mib = meta.mem_mib;
        rec.vcpus = meta.vcpus;
        rec.process = None;
        self.track(rec, launched, started)
    }

    /// Follows one VM until its hypervisor exits: readiness, boot timeout, final state.
    async fn watch(
        self: Arc<Self>,
        name: String,
        mut child: Option<Child>,
        process: ProcessId,
        started: Instant,
        console_offset: u64,
    ) {
        let dir = self.dir(&name);
        let mut ready = ReadyState::new(console_offset);
        let guest = self.record(&name).filter(|r| r.vsock).map(|r| GuestClient {
            dir: r.socket_dir.unwrap_or_else(|| dir.root.clone()),
            secret: dir.read_secret().unwrap_or_default(),
        });
        let mut next_probe = Instant::now();
        let exit_code = loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let state = self.record(&name).map(|r| r.state);
            if state == Some(VmState::Starting) {
                // Readiness is the guest agent's health answer over vsock; the console
                // marker counts only for VMs without the control channel.
                let is_ready = match &guest {
                    Some(g) if Instant::now() >= next_probe => {
                        next_probe = Instant::now() + Duration::from_millis(200);
                        matches!(
                            tokio::time::timeout(Duration::from_secs(1), g.health()).await,
                            Ok(Ok(clawos_guest::protocol::Reply::Health { .. }))
                        )
                    }
                    Some(_) => false,
                    None => ready.watch.poll(&dir.console()),
                };
                if is_ready {
                    let ms = started.elapsed().as_millis() as u64;
                    self.update(&name, |r| {
                        if r.state == VmState::Starting {
                            r.state = VmState::Running;
                            r.boot_ms = Some(ms);
                        }
                    });
                    tracing::info!(vm = %name, boot_ms = ms, "guest ready");
                } else if started.elapsed() > self.cfg.boot_timeout && !ready.timed_out {
                    ready.timed_out = true;
                    tracing::warn!(vm = %name, "guest did not report ready in time; killing it");
                    process.signal(libc::SIGKILL);
                }
            }
            let exited = match child.as_mut() {
                Some(c) => match c.try_wait() {
                    Ok(Some(status)) => Some(status.code()),
                    Ok(None) => None,
                    Err(_) => Some(None),
                },
                None => (!process.is_alive()).then_some(None),
            };
            if let Some(code) = exited {
                break code;
            }
        };
        let console_text = console::tail(&dir.console(), 64 * 1024);
        let timeout = ready.timed_out.then_some(self.cfg.boot_timeout);
        dir.remove_pid();
        self.end_helpers(&name);
        self.update(&name, |r| {
            let (state, reason) = outcome(r.state, exit_code, &console_text, timeout, &dir);
            r.state = state;
            r.reason = reason;
        });
        let final_state = self.record(&name).map(|r| (r.state, r.reason));
        if let Some((VmState::Failed, reason)) = &final_state {
            self.metrics.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(vm = %name, reason = reason.as_deref().unwrap_or(""), "VM failed");
        } else {
            tracing::info!(vm = %name, "VM stopped");
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut VmRecord)) {
        let record = {
            let mut inner = self.lock();
            let Some(r) = inner.vms.get_mut(name) else {
                return;
            };
            f(r);
            r.clone()
        };
        if let Err(e) = self.dir(name).save(&record) {
            tracing::error!(vm = %name, error = %e, "cannot persist VM state");
        }
    }

    /// The record of a VM that exists and is not running (what `op` needs).
    fn inactive_record(&self, name: &str, op: &str) -> Result<VmRecord, LauncherError> {
        let record = self
            .record(name)
            .ok_or_else(|| LauncherError::NotFound(format!("no VM named {name}")))?;
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
        validate::name(name)?;
        let _claim = self.claim(name)?;
        let record = self
            .record(name)
            .ok_or_else(|| LauncherError::NotFound(format!("no VM named {name}")))?;
        if !record.state.is_active() {
            return Ok(record.view());
        }
        let dir = self.dir(name);
        if record.state == VmState::Paused {
            // A frozen guest cannot see the power button.
            if let Err(e) = self.backend.resume(&dir).await {
                tracing::warn!(vm = %name, error = %e, "resume before stop failed");
            }
        }
        self.update(name, |r| r.state = VmState::Stopping);
        if let Err(e) = self.backend.request_stop(&dir).await {
            tracing::warn!(vm = %name, error = %e, "clean stop request failed; will kill");
        }
        if !self.wait_inactive(name, self.cfg.stop_timeout).await {
            tracing::warn!(vm = %name, "guest did not power off in time; killing it");
            if let Some(p) = record.process {
                p.signal(libc::SIGKILL);
            }
            if !self.wait_inactive(name, Duration::from_secs(10)).await {
                return Err(LauncherError::Internal(format!(
                    "VM {name}'s hypervisor survived SIGKILL"
                )));
            }
        }
        self.get(name)
    }

    async fn wait_inactive(&self, name: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.record(name).is_none_or(|r| !r.state.is_active()) {
                return true;
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
        }
        false
    }

    /// Deletes a VM that is not running, with its disks.
    pub fn delete(&self, name: &str) -> Result<(), LauncherError> {
        validate::name(name)?;
        let _claim = self.claim(name)?;
        self.inactive_record(name, "delete")?;
        store::remove(&self.vms_dir, name)?;
        self.lock().vms.remove(name);
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    /// Console bytes from `offset` (at most 1 MiB) and the next offset.
    pub fn console(&self, name: &str, offset: u64) -> Result<(Vec<u8>, u64), LauncherError> {
        validate::name(name)?;
        if self.record(name).is_none() {
            return Err(LauncherError::NotFound(format!("no VM named {name}")));
        }
        use std::io::{Read, Seek, SeekFrom};
        let path = self.dir(name).console();
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

    /// Loads every VM record; VMs whose hypervisor is still the same process are
    /// watched again, the others are marked stopped or failed.
    fn adopt_all(self: &Arc<Self>) -> Result<(), LauncherError> {
        let entries =
            std::fs::read_dir(&self.vms_dir).map_err(|e| LauncherError::io(&self.vms_dir, e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if validate::name(&name).is_err() {
                continue;
            }
            let dir = self.dir(&name);
            snapshot::clean_leftovers(&dir);
            let mut record = match dir.load() {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(vm = %name, error = %err, "skipping VM directory without a readable record");
                    continue;
                }
            };
            if record.state.is_active() {
                let alive = dir.read_pid().filter(ProcessId::is_alive);
                match alive {
                    Some(p) => {
                        tracing::info!(vm = %name, pid = p.pid, state = %record.state, "re-adopted running VM");
                        self.metrics.adopted.fetch_add(1, Ordering::Relaxed);
                        record.process = Some(p);
                        let me = Arc::clone(self);
                        let age = now_unix().saturating_sub(record.started_at.unwrap_or(0));
                        let started = Instant::now()
                            .checked_sub(Duration::from_secs(age))
                            .unwrap_or_else(Instant::now);
                        let n = name.clone();
                        let vsock = record.vsock;
                        self.register_with_monitor(&record);
                        self.lock().vms.insert(name.clone(), record.clone());
                        if vsock {
                            self.start_relay(&name);
                        }
                        tokio::spawn(async move { me.watch(n, None, p, started, 0).await });
                    }
                    None => {
                        let text = console::tail(&dir.console(), 64 * 1024);
                        let (state, reason) = match console::failure_reason(&text) {
                            Some(r) => (VmState::Failed, Some(r)),
                            None if console::powered_off(&text)
                                || record.state == VmState::Stopping =>
                            {
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
                        let _ = dir.save(&record);
                    }
                }
            }
            self.lock().vms.insert(name, record);
        }
        Ok(())
    }

    /// Asks monitor-daemon (when configured) to audit the VM's hypervisor and helper
    /// processes, tagged with the VM's name. Best effort: a monitor that is down is
    /// logged, the VM runs regardless.
    fn register_with_monitor(&self, record: &VmRecord) {
        let Some(url) = self.cfg.monitor_url.clone() else {
            return;
        };
        let token_path = clawos_monitor_api::token_path(&self.cfg.state_dir);
        let pids: Vec<u32> = record
            .process
            .iter()
            .chain(record.helpers.iter())
            .map(|p| p.pid)
            .collect();
        let name = record.name.clone();
        tokio::spawn(async move {
            let token = match std::fs::read_to_string(&token_path) {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, path = %token_path.display(), "no monitor-daemon token; VM not audited");
                    return;
                }
            };
            let client = clawos_monitor_api::MonitorClient::new(&url, &token);
            for pid in pids {
                let req = clawos_monitor_api::WatchRequest {
                    pid: Some(pid),
                    cgroup: None,
                    agent: name.clone(),
                    vm: Some(name.clone()),
                };
                match client.watch(&req).await {
                    Ok(()) => tracing::info!(vm = %name, pid, "registered with monitor-daemon"),
                    Err(e) => {
                        tracing::warn!(vm = %name, pid, error = %e, "monitor-daemon registration failed")
                    }
                }
            }
        });
    }

    /// Starts the VM's host-side relays: LLM traffic to the inference proxy, and (with
    /// a monitor configured) the guest's audit stream to monitor-daemon.
    fn start_relay(&self, name: &str) {
        let sockets = self
            .record(name)
            .and_then(|r| r.socket_dir)
            .unwrap_or_else(|| self.dir(name).root);
        let proxy = url_authority(&self.cfg.inference_proxy_url)
            .map(|target| proxy_relay(sockets.clone(), target));
        let audit = self
            .cfg
            .monitor_url
            .is_some()
            .then(|| audit_relay(sockets, name.to_owned(), self.cfg.state_dir.clone()));
        let task = tokio::spawn(async move {
            tokio::join!(
                async {
                    if let Some(p) = proxy {
                        p.await;
                    }
                },
                async {
                    if let Some(a) = audit {
                        a.await;
                    }
                }
            );
        });
        if let Some(old) = self.lock().relays.insert(name.to_owned(), task) {
            old.abort();
        }
    }

    /// Ends what lives with a VM: relay task, helper processes, their sockets.
    fn end_helpers(&self, name: &str) {
        if let Some(t) = self.lock().relays.remove(name) {
            t.abort();
        }
        let helpers = self.record(name).map(|r| r.helpers).unwrap_or_default();
        for h in helpers {
            h.signal(libc::SIGTERM);
        }
        let dir = self.dir(name);
        for port in [
            clawos_guest::protocol::PROXY_PORT,
            clawos_guest::protocol::AUDIT_PORT,
        ] {
            let _ = std::fs::remove_file(dir.root.join(format!("{VSOCK_SOCKET}_{port}")));
        }
        self.backend.cleanup(&dir);
    }

    /// Freezes a running VM.
    pub async fn pause(&self, name: &str) -> Result<Vm, LauncherError> {
        validate::name(name)?;
        let _claim = self.claim(name)?;
        self.expect_state(name, VmState::Running, "pause")?;
        self.backend
            .pause(&self.dir(name))
            .await
            .map_err(|e| LauncherError::Internal(e.to_string()))?;
        self.update(name, |r| r.state = VmState::Paused);
        tracing::info!(vm = %name, "VM paused");
        self.get(name)
    }

    /// Lets a paused VM run again.
    pub async fn resume(&self, name: &str) -> Result<Vm, LauncherError> {
        validate::name(name)?;
        let _claim = self.claim(name)?;
        self.expect_state(name, VmState::Paused, "resume")?;
        self.backend
            .resume(&self.dir(name))
            .await
            .map_err(|e| LauncherError::Internal(e.to_string()))?;
        self.update(name, |r| r.state = VmState::Running);
        tracing::info!(vm = %name, "VM resumed");
        self.get(name)
    }

    fn expect_state(&self, name: &str, want: VmState, op: &str) -> Result<VmRecord, LauncherError> {
        let r = self
            .record(name)
            .ok_or_else(|| LauncherError::NotFound(format!("no VM named {name}")))?;
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
        validate::name(name)?;
        let r = self.expect_state(name, VmState::Running, op)?;
        if !r.vsock {
            return Err(LauncherError::Conflict(format!(
                "VM {name} has no control channel (vhost-device-vsock was not installed when it started)"
            )));
        }
        let dir = self.dir(name);
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
        let mut counts: HashMap<VmState, u64> = HashMap::new();
        for r in self.lock().vms.values() {
            *counts.entry(r.state).or_default() += 1;
        }
        let mut out = String::from(
            "# HELP clawos_launcher_vms VMs by state.\n# TYPE clawos_launcher_vms gauge\n",
        );
        for s in [
            VmState::Starting,
            VmState::Running,
            VmState::Paused,
            VmState::Stopping,
            VmState::Stopped,
            VmState::Failed,
        ] {
            out.push_str(&format!(
                "clawos_launcher_vms{{state=\"{s}\"}} {}\n",
                counts.get(&s).unwrap_or(&0)
            ));
        }
        out.push_str(&clawos_service::render_counters(&[
            (
                "clawos_launcher_vm_starts_total",
                "VM boots started.",
                self.metrics.starts.load(Ordering::Relaxed),
            ),
            (
                "clawos_launcher_images_refused_total",
                "Starts refused by image verification.",
                self.metrics.images_refused.load(Ordering::Relaxed),
            ),
            (
                "clawos_launcher_vm_failures_total",
                "VMs that ended failed.",
                self.metrics.failures.load(Ordering::Relaxed),
            ),
            (
                "clawos_launcher_vms_adopted_total",
                "Running VMs re-adopted after a restart.",
                self.metrics.adopted.load(Ordering::Relaxed),
            ),
        ]));
        out
    }
}

#[derive(Debug)]
struct ReadyState {
    watch: console::ReadyWatch,
    timed_out: bool,
}

impl ReadyState {
    fn new(offset: u64) -> Self {
        Self {
            watch: console::ReadyWatch::new(offset),
            timed_out: false,
        }
    }
}

/// Polls the guest agent's health until it answers or `limit` passes.
async fn wait_healthy(guest: &GuestClient, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Ok(clawos_guest::protocol::Reply::Health { .. })) =
            tokio::time::timeout(Duration::from_secs(1), guest.health()).await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// What a backend needs to boot (or restore) one VM.
fn launch_spec(
    name: &str,
    dir: &VmDir,
    mem_mib: u32,
    vcpus: u32,
    paths: &ImagePaths,
    manifest: &Manifest,
    snapshots: bool,
) -> LaunchSpec {
    LaunchSpec {
        name: name.to_owned(),
        dir: dir.clone(),
        mem_mib,
        vcpus,
        kernel: paths.kernel.clone(),
        vmlinux: manifest
            .vmlinux_sha256
            .as_ref()
            .map(|_| paths.vmlinux.clone()),
        initramfs: paths.initramfs.clone(),
        rootfs: paths.rootfs.clone(),
        image_cmdline: manifest.cmdline.clone(),
        snapshots,
    }
}

/// Final state of a VM whose hypervisor exited.
fn outcome(
    state_before: VmState,
    exit_code: Option<i32>,
    console_text: &str,
    boot_timeout: Option<Duration>,
    dir: &VmDir,
) -> (VmState, Option<String>) {
    if let Some(reason) = console::failure_reason(console_text) {
        return (VmState::Failed, Some(reason));
    }
    if let Some(t) = boot_timeout {
        return (
            VmState::Failed,
            Some(format!(
                "guest did not report ready within {}s",
                t.as_secs()
            )),
        );
    }
    if state_before == VmState::Stopping {
        return (VmState::Stopped, None);
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
    fn env_file_never_carries_a_key() {
        let env = agent_env("a1", Some("claude-x"), "http://127.0.0.1:11435", "f00");
        assert!(env.contains("CLAWOS_AGENT_NAME=a1\n"));
        assert!(env.contains("CLAWOS_MODEL=claude-x\n"));
        assert!(env.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:11435\n"));
        assert!(!env.to_lowercase().contains("api_key"));
    }

    #[test]
    fn proxy_authority() {
        assert_eq!(
            url_authority("http://127.0.0.1:11435").as_deref(),
            Some("127.0.0.1:11435")
        );
        assert_eq!(
            url_authority("http://proxy.local/v1").as_deref(),
            Some("proxy.local:80")
        );
        assert_eq!(
            url_authority("https://[::1]:8443/x").as_deref(),
            Some("[::1]:8443")
        );
        assert_eq!(url_authority("nonsense"), None);
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
        assert_eq!(
            outcome(VmState::Running, Some(0), "CLAWOS_POWEROFF\n", None, &dir).0,
            VmState::Stopped
        );
        let (s, r) = outcome(VmState::Running, Some(137), "", None, &dir);
        assert_eq!(s, VmState::Failed);
        assert!(r.expect("reason").contains("137"));
        let (s, r) = outcome(
            VmState::Starting,
            None,
            "",
            Some(Duration::from_secs(9)),
            &dir,
        );
        assert_eq!(s, VmState::Failed);
        assert!(r.expect("reason").contains("9s"));
    }
}
