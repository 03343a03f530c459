//! The daemon: configuration (checked before anything is opened), the shared
//! [`Monitor`] state, and start-up and shutdown of its parts: the [`recorder`] thread,
//! the SIEM [`forward`]ers, the guest stream listener ([`crate::ingest`]), the
//! [`watches`] and the HTTP API ([`crate::http`]) on loopback.
//!
//! [`recorder`]: crate::recorder
//! [`watches`]: crate::watches

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;

pub use clawos_monitor_api::WatchRequest;

use crate::forward::{self, ForwardConfig, ForwardStats, Target};
use crate::ingest::{GuestMessage, IngestMetrics};
use crate::probe;
use crate::quota::GuestQuota;
use crate::recorder::{Counters, Feeds, Recorder};
use crate::rules::Rules;
use crate::watches::{Labels, WatchError, Watches};

/// Default HTTP address (loopback only).
pub const DEFAULT_ADDR: &str = "127.0.0.1:2084";

/// The daemon's configuration, validated before any socket or map is opened.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    /// The JSONL audit trail.
    pub jsonl: PathBuf,
    /// This host's name in every event.
    pub host: String,
    /// Kernel ring buffer size (power of two, ≥ 4096).
    pub ring_bytes: u32,
    pub watches: Vec<WatchRequest>,
    pub syslog: Vec<Target>,
    /// CA certificates for `tls://` targets.
    pub syslog_tls: Option<forward::TlsTrust>,
    pub spool_max_bytes: u64,
    pub max_message: usize,
    pub rules: Rules,
    /// Rotate the trail when the live file reaches this many bytes (0: never).
    pub rotate_bytes: u64,
    /// Closed segments kept (older ones go, unless a SIEM forwarder still reads them).
    pub rotate_keep: usize,
    /// Each VM's guest stream allowance.
    pub guest_quota: GuestQuota,
    /// Handshake limits of the guest socket.
    pub guest_limits: crate::ingest::Limits,
    /// skill-manager's audit trail, followed into this one (`None`: not followed).
    pub skill_audit: Option<PathBuf>,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// State shared by the recorder, forwarders and HTTP handlers.
#[derive(Debug)]
pub struct Monitor {
    pub watches: Watches,
    /// The `/metrics` registry.
    pub metrics: clawos_service::Metrics,
    pub forwarders: Vec<(Target, Arc<ForwardStats>)>,
    /// The live JSONL trail.
    pub(crate) jsonl: PathBuf,
    /// The operator credential the API wants.
    pub(crate) token: String,
}

impl Monitor {
    /// Adds a watch; returns its tag.
    pub fn watch(&self, req: WatchRequest) -> Result<u32, WatchError> {
        self.watches.add(req)
    }

    /// Removes the watches of a pid or cgroup; whether there was one.
    pub fn unwatch(&self, pid: Option<u32>, cgroup: Option<&Path>) -> bool {
        self.watches.remove(pid, cgroup)
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}

/// The SIEM forwarders' counters in `/metrics`, summed over targets at each scrape.
fn register_forwarder_metrics(
    metrics: &mut clawos_service::Metrics,
    forwarders: &[(Target, Arc<ForwardStats>)],
) {
    let stats: Arc<Vec<Arc<ForwardStats>>> =
        Arc::new(forwarders.iter().map(|(_, s)| Arc::clone(s)).collect());
    let sum = move |read: fn(&ForwardStats) -> u64| {
        let stats = Arc::clone(&stats);
        move || stats.iter().map(|s| read(s)).sum::<u64>()
    };
    metrics.counter_fn(
        "clawos_monitor_siem_sent_total",
        "Events delivered to SIEM targets.",
        sum(|s| s.sent.load(Ordering::Relaxed)),
    );
    metrics.counter_fn(
        "clawos_monitor_siem_dropped_total",
        "Events skipped because a SIEM spool was full.",
        sum(|s| s.dropped.load(Ordering::Relaxed)),
    );
    let backlog = sum(|s| s.backlog_bytes.load(Ordering::Relaxed));
    metrics.gauge_fn(
        "clawos_monitor_siem_backlog_bytes",
        "Audit bytes waiting for SIEM targets.",
        move || i64::try_from(backlog()).unwrap_or(i64::MAX),
    );
}

/// Starts the SIEM forwarder threads; each reports the lines it had to skip to `drops`.
fn start_forwarders(
    cfg: &Config,
    dir: &Path,
    drops: &std::sync::mpsc::Sender<u64>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<(Target, Arc<ForwardStats>)>, DaemonError> {
    let mut forwarders = Vec::new();
    for (i, t) in cfg.syslog.iter().enumerate() {
        let offset_file = dir.join(format!("forward-{i}.offset"));
        let stats = Arc::new(ForwardStats::default());
        // Known before the first rotation, so pruning spares the forwarder's segment.
        stats
            .reading_inode
            .store(forward::saved_inode(&offset_file), Ordering::Relaxed);
        let fcfg = ForwardConfig {
            target: t.clone(),
            tls: cfg.syslog_tls.clone(),
            jsonl: cfg.jsonl.clone(),
            offset_file,
            spool_max_bytes: cfg.spool_max_bytes,
            max_message: cfg.max_message,
        };
        let (s, stop, tx) = (Arc::clone(&stats), Arc::clone(stop), drops.clone());
        std::thread::Builder::new()
            .name(format!("forward-{i}"))
            .spawn(move || {
                forward::run(
                    &fcfg,
                    &s,
                    &|n| {
                        let _ = tx.send(n);
                    },
                    &stop,
                );
            })
            .map_err(|source| DaemonError::Io {
                path: "forwarder thread".into(),
                source,
            })?;
        forwarders.push((t.clone(), stats));
    }
    Ok(forwarders)
}

/// A started daemon: its shared state, its HTTP API, and the recorder thread (joined
/// at shutdown, so its last lines reach the trail).
#[derive(Debug)]
pub struct Started {
    pub monitor: Arc<Monitor>,
    pub router: Router,
    recorder: std::thread::JoinHandle<()>,
}

/// Starts everything. Probe errors (privileges, kernel) come back before any socket is
/// bound.
pub fn start(cfg: &Config, stop: Arc<AtomicBool>) -> Result<Started, DaemonError> {
    if cfg.syslog_tls.is_none()
        && let Some(t) = cfg
            .syslog
            .iter()
            .find(|t| t.transport == forward::Transport::Tls)
    {
        return Err(DaemonError::Config(format!(
            "syslog target {t} needs --syslog-ca (the CA that signed the SIEM's certificate)"
        )));
    }
    // The daemon's own files (token, guest socket, watch list, forwarder offsets) live
    // in <state>/monitor, where vm-launcher finds the token and the guest socket; the
    // trail may be elsewhere.
    let dir = &cfg.state_dir.join("monitor");
    for d in [dir.as_path(), cfg.jsonl.parent().unwrap_or(Path::new("."))] {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|source| DaemonError::Io {
                path: d.to_owned(),
                source,
            })?;
    }
    let token = clawos_service::operator_token(&clawos_monitor_api::token_path(&cfg.state_dir))
        .map_err(DaemonError::Config)?;
    let mut metrics = clawos_service::Metrics::new();
    let labels: Labels = Arc::default();
    let recorder = Recorder::open(cfg, Arc::clone(&labels), Counters::register(&mut metrics))?;
    let ingest_metrics = IngestMetrics::register(&mut metrics);
    // The guest connections are tasks on the runtime `run` is called on.
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| DaemonError::Config(format!("the daemon starts on a tokio runtime: {e}")))?;
    log_retention(cfg);
    let guest_socket = clawos_monitor_api::guest_socket_path(&cfg.state_dir);
    let guest_listener = crate::ingest::bind(&guest_socket).map_err(|source| DaemonError::Io {
        path: guest_socket.clone(),
        source,
    })?;
    // Bounded: a recorder that falls behind slows the guests' streams (their queues
    // wait) instead of growing memory here. Senders wait in turn (the channel is
    // fair), so a flooding guest is one sender among others.
    let (guest_tx, guest_rx) = tokio::sync::mpsc::channel::<GuestMessage>(1 << 16);
    let (drops_tx, drops_rx) = std::sync::mpsc::channel::<u64>();
    let monitor_slot: Arc<OnceLock<Arc<Monitor>>> = Arc::default();
    let feeds = Feeds {
        guests: guest_rx,
        forward_drops: drops_rx,
    };
    let (maps, recorder) = recorder.spawn(
        cfg.ring_bytes,
        feeds,
        Arc::clone(&monitor_slot),
        Arc::clone(&stop),
    )?;
    let forwarders = start_forwarders(cfg, dir, &drops_tx, &stop)?;
    register_forwarder_metrics(&mut metrics, &forwarders);
    let monitor = Arc::new(Monitor {
        watches: Watches::new(maps, labels, dir.join("watches.json")),
        metrics,
        forwarders,
        jsonl: cfg.jsonl.clone(),
        token,
    });
    let _ = monitor_slot.set(Arc::clone(&monitor));
    runtime.spawn(crate::ingest::serve(
        guest_listener,
        monitor.token.clone(),
        cfg.guest_limits,
        guest_tx,
        ingest_metrics,
    ));
    tracing::info!(socket = %guest_socket.display(), "taking guest audit streams");
    monitor.watches.restore();
    for w in &cfg.watches {
        monitor.watch(w.clone())?;
    }
    Ok(Started {
        router: crate::http::router(Arc::clone(&monitor), cfg.addr),
        monitor,
        recorder,
    })
}

/// Says how long the per-VM quota keeps one flooding guest from rotating other VMs'
/// history out of the trail.
fn log_retention(cfg: &Config) {
    let q = &cfg.guest_quota;
    match crate::quota::retention_floor(q, cfg.rotate_bytes, cfg.rotate_keep) {
        Some(floor) => tracing::info!(
            events_per_sec = q.events_per_sec,
            bytes_per_sec = q.bytes_per_sec,
            burst_secs = q.burst_secs,
            "per-VM guest quota: one flooding guest needs at least {} s to rotate another VM's events out of the {} kept segments",
            floor.as_secs(),
            cfg.rotate_keep
        ),
        None if cfg.rotate_bytes > 0 => tracing::warn!(
            "no per-VM guest byte quota: one guest's volume alone decides how long other VMs' history is kept"
        ),
        None => {}
    }
}

/// Runs the daemon until `shutdown`: requests in flight finish, then the recorder
/// writes out what it holds.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = start(&cfg, Arc::clone(&stop))?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: cfg.addr,
            source,
        })?;
    tracing::info!(addr = %cfg.addr, jsonl = %cfg.jsonl.display(), syslog = ?cfg.syslog.iter().map(ToString::to_string).collect::<Vec<_>>(), "monitor-daemon listening");
    let served = clawos_service::http::serve(
        listener,
        started.router,
        shutdown,
        clawos_service::http::DRAIN_TIMEOUT,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    // The recorder ends within one poll interval and flushes; forwarders save their
    // place within one send.
    let recorder = started.recorder;
    let joined = tokio::task::spawn_blocking(move || recorder.join());
    if tokio::time::timeout(std::time::Duration::from_secs(10), joined)
        .await
        .is_err()
    {
        tracing::error!("the recorder did not stop within 10 s");
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    served.map_err(|source| DaemonError::Io {
        path: "HTTP server".into(),
        source,
    })
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Default rules when no file is given.
pub fn rules_from(path: Option<&Path>) -> Result<Rules, DaemonError> {
    match path {
        None => Ok(Rules::builtin()),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| DaemonError::Io {
                path: p.to_owned(),
                source,
            })?;
            Rules::from_json(&text)
                .map_err(|e| DaemonError::Config(format!("{}: {e}", p.display())))
        }
    }
}
