//! `monitor-daemon`: see the `clawos_monitor` crate docs.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use clawos_monitor::daemon::{self, Config, WatchRequest};
use clawos_monitor::forward::Target;

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
    #[command(flatten)]
    log: clawos_service::LogArgs,
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
    let cfg = Config {
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
    };
    daemon::run(cfg, clawos_service::shutdown_signal())
        .await
        .context("monitor-daemon")
}
