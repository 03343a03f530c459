//! `monitor-daemon`: see the `clawos_monitor` crate docs.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use clawos_monitor::daemon::{self, Config, WatchRequest};
use clawos_monitor::forward::Target;
use clawos_monitor::ingest::Limits;
use clawos_monitor::quota::GuestQuota;

/// eBPF syscall audit of agent VMs → JSONL + CEF over syslog.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// HTTP API and /metrics address.
    #[arg(long, env = "CLAWOS_MONITOR_ADDR", default_value = daemon::DEFAULT_ADDR)]
    addr: SocketAddr,
    /// State directory [default: $CLAWOS_STATE_DIR or ~/.clawos].
    #[arg(long, env = "CLAWOS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// JSONL audit trail [default: <state>/monitor/audit.jsonl].
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Watch a process or cgroup from the start: `pid=N,agent=A[,vm=V]` or
    /// `cgroup=/sys/fs/cgroup/...,agent=A[,vm=V]` (repeatable). vm-launcher registers
    /// its VMs through the API.
    #[arg(long = "watch")]
    watches: Vec<WatchRequest>,
    /// SIEM syslog receiver, `tcp://IP:PORT`, `tls://IP:PORT` or `udp://IP:PORT`
    /// (repeatable).
    #[arg(long = "syslog", env = "CLAWOS_MONITOR_SYSLOG", value_delimiter = ',')]
    syslog: Vec<Target>,
    /// CA certificates (PEM) a `tls://` SIEM's certificate must chain to; the certificate
    /// must name the target's IP address.
    #[arg(long, env = "CLAWOS_MONITOR_SYSLOG_CA")]
    syslog_ca: Option<PathBuf>,
    /// Largest backlog kept for an unreachable SIEM before the oldest events are
    /// dropped (and reported).
    #[arg(long, default_value_t = 256 << 20)]
    spool_max_bytes: u64,
    /// Largest syslog message in bytes (rsyslog's default limit is 8096).
    #[arg(long, default_value_t = 8000)]
    max_message: usize,
    /// Rotate the JSONL trail into `audit.jsonl.N` when it reaches this many bytes
    /// (0: never).
    #[arg(long, default_value_t = 256 << 20)]
    rotate_bytes: u64,
    /// Rotated segments to keep; older ones are removed once every SIEM forwarder is
    /// past them.
    #[arg(long, default_value_t = 8)]
    rotate_keep: usize,
    /// Kernel ring buffer size in bytes (a power of two).
    #[arg(long, default_value_t = 4 << 20)]
    ring_bytes: u32,
    /// Rules file (JSON: `{"default": {"deny": [...]}, "agents": {"a1": {"allow": [...]}}}`).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Per-VM quota of a guest's audit stream: trail lines a second (events, their
    /// alerts and drop reports; 0: no limit). Excess is counted and reported, not
    /// written.
    #[arg(long, default_value_t = GuestQuota::DEFAULT_EVENTS_PER_SEC)]
    guest_events_per_sec: u64,
    /// Per-VM quota of a guest's audit stream: trail bytes a second (0: no limit).
    /// With --rotate-bytes and --rotate-keep it bounds how fast one guest can rotate
    /// other VMs' history away.
    #[arg(long, default_value_t = GuestQuota::DEFAULT_BYTES_PER_SEC)]
    guest_bytes_per_sec: u64,
    /// Seconds of either guest quota a quiet VM saves up for a burst.
    #[arg(long, default_value_t = GuestQuota::DEFAULT_BURST_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    guest_burst_secs: u64,
    /// Guest socket connections in their handshake at once (a new one beyond closes
    /// the oldest).
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_PENDING, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    guest_max_pending: usize,
    /// Seconds a guest socket connection has for its handshake (the relay's header
    /// and the guest's hello).
    #[arg(long, default_value_t = Limits::DEFAULT_HANDSHAKE_SECS, value_parser = clap::value_parser!(u64).range(1..=600))]
    guest_handshake_secs: u64,
    /// skill-manager's audit trail of skill calls, followed into this daemon's trail
    /// [default: <state>/skills/audit.jsonl; it may appear later].
    #[arg(long, conflicts_with = "no_skill_audit")]
    skill_audit: Option<PathBuf>,
    /// Do not follow skill-manager's audit trail.
    #[arg(long)]
    no_skill_audit: bool,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

/// Raises the soft open-file limit to the hard one: every guest stream, SIEM
/// connection and API client is a descriptor, and the guest socket's own caps (one
/// stream per VM, `--guest-max-pending` handshakes) are what bound them.
fn raise_open_file_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid, writable rlimit.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max && {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0
        }
    };
    if raised {
        tracing::debug!(limit = r.rlim_cur, "open-file limit raised");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    clawos_service::init_tracing(a.log.format());
    let state_dir = a
        .state_dir
        .unwrap_or_else(clawos_service::default_state_dir);
    if a.max_message < 480 {
        anyhow::bail!(
            "--max-message {} is too small (at least 480 bytes)",
            a.max_message
        );
    }
    let skill_audit = (!a.no_skill_audit).then(|| {
        a.skill_audit
            .clone()
            .unwrap_or_else(|| clawos_skill_manager_api::audit_path(&state_dir))
    });
    let cfg = Config {
        skill_audit,
        addr: a.addr,
        jsonl: a
            .jsonl
            .unwrap_or_else(|| state_dir.join("monitor/audit.jsonl")),
        state_dir,
        host: daemon::hostname(),
        ring_bytes: a.ring_bytes,
        watches: a.watches,
        syslog: a.syslog,
        syslog_tls: a
            .syslog_ca
            .as_deref()
            .map(clawos_monitor::forward::TlsTrust::from_pem_file)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        spool_max_bytes: a.spool_max_bytes,
        max_message: a.max_message,
        rules: daemon::rules_from(a.rules.as_deref())?,
        rotate_bytes: a.rotate_bytes,
        rotate_keep: a.rotate_keep,
        guest_quota: GuestQuota {
            events_per_sec: a.guest_events_per_sec,
            bytes_per_sec: a.guest_bytes_per_sec,
            burst_secs: a.guest_burst_secs,
        },
        guest_limits: Limits {
            max_pending: a.guest_max_pending,
            handshake: std::time::Duration::from_secs(a.guest_handshake_secs),
        },
    };
    raise_open_file_limit();
    daemon::run(cfg, clawos_service::shutdown_signal())
        .await
        .context("monitor-daemon")
}
