//! `orchestrator`: see the `clawos_orchestrator` crate docs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clawos_orchestrator::{Config, DEFAULT_ADDR};

/// Durable multi-agent workflows: each step in its own agent VM (REST on 127.0.0.1:2081).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Listen address (loopback only).
    #[arg(long, env = "CLAWOS_ORCHESTRATOR_ADDR", default_value = DEFAULT_ADDR)]
    addr: SocketAddr,
    /// State directory; the journal, artifacts and credential live in its orchestrator/.
    #[arg(long, env = "CLAWOS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// vm-launcher, which runs each step's VM.
    #[arg(long, env = "CLAWOS_LAUNCHER_URL", default_value = clawos_vm_launcher_api::DEFAULT_URL)]
    launcher_url: String,
    /// vm-launcher's operator credential file [default: $STATE_DIR/launcher/admin.token].
    #[arg(long, env = "CLAWOS_LAUNCHER_TOKEN_PATH")]
    launcher_token: Option<PathBuf>,
    /// Seconds a step's VM may take to report ready.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// An Origin allowed to call the API (repeatable; none by default).
    #[arg(
        long = "allow-origin",
        env = "CLAWOS_ORCHESTRATOR_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    clawos_service::init_tracing(a.log.format());
    let state_dir = a
        .state_dir
        .unwrap_or_else(clawos_service::default_state_dir);
    let cfg = Config {
        addr: a.addr,
        launcher_token_path: a.launcher_token.unwrap_or_else(|| {
            clawos_service::credential_path(
                "launcher-token",
                clawos_vm_launcher_api::token_path(&state_dir),
            )
        }),
        state_dir,
        launcher_url: a.launcher_url,
        boot_timeout: Duration::from_secs(a.boot_timeout.max(1)),
        allowed_origins: a.allowed_origins,
    };
    cfg.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(clawos_orchestrator::run(
            cfg,
            clawos_service::shutdown_signal(),
        ))
        .context("orchestrator")
}
