//! orchestrator (port 2081): durable multi-agent workflows, each step in its own agent
//! VM. The engine (`clawos-workflow`) owns specs, the DAG, retries and the journal; this
//! crate serves it over REST (`clawos-orchestrator-api`) and runs its steps on real VMs
//! through vm-launcher ([`executor::LauncherExecutor`]).
//!
//! Routes and wire types: `clawos_orchestrator_api`. Every route but `/healthz` and
//! `/metrics` needs the operator credential (`<state>/orchestrator/admin.token`, 0600),
//! behind the same Host/Origin/body-type guard as the other daemons.

pub mod executor;
pub mod http;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clawos_vm_launcher_api::LauncherClient;
use clawos_workflow::{Engine, EngineConfig, SystemClock};

use crate::executor::LauncherExecutor;

/// The engine as the daemon runs it.
pub type OrchestratorEngine = Engine<LauncherExecutor, SystemClock>;

/// Default listen address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:2081";

/// Everything the daemon needs, already checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Loopback only: the API has no TLS.
    pub addr: SocketAddr,
    /// `<state>/orchestrator/` holds the journal, the artifacts and the credential.
    pub state_dir: PathBuf,
    /// vm-launcher's URL.
    pub launcher_url: String,
    /// vm-launcher's operator credential file.
    pub launcher_token_path: PathBuf,
    /// How long a step's VM may take to report ready.
    pub boot_timeout: Duration,
    /// `Origin`s allowed to call the API (none by default).
    pub allowed_origins: Vec<String>,
}

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// A setting is wrong; the message says which and how to fix it.
    #[error("orchestrator config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workflow engine")]
    Engine(#[from] clawos_workflow::EngineError),
}

impl Config {
    /// The daemon's own directory.
    pub fn dir(&self) -> PathBuf {
        self.state_dir.join("orchestrator")
    }

    /// Checks what can be checked before any socket opens.
    pub fn validate(&self) -> Result<(), OrchestratorError> {
        if !self.addr.ip().is_loopback() {
            return Err(OrchestratorError::Config(format!(
                "listen address {} is not loopback: the API has no TLS, so its operator credential would cross the network in clear text",
                self.addr
            )));
        }
        if !(self.launcher_url.starts_with("http://") || self.launcher_url.starts_with("https://"))
        {
            return Err(OrchestratorError::Config(format!(
                "launcher URL {:?} is not an http(s) URL",
                self.launcher_url
            )));
        }
        Ok(())
    }
}

/// Runs the daemon until `shutdown`: opens the journal (resuming every unfinished run),
/// then serves the API; on shutdown it drains requests and stops driving runs, which
/// resume at the next start.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OrchestratorError> {
    cfg.validate()?;
    let dir = cfg.dir();
    clawos_service::create_private_dir(&dir).map_err(|source| OrchestratorError::Io {
        path: dir.clone(),
        source,
    })?;
    let token =
        clawos_service::operator_token(&clawos_orchestrator_api::token_path(&cfg.state_dir))
            .map_err(OrchestratorError::Config)?;
    // The launcher's credential may appear after we start (the launcher makes it);
    // read it now if it is there, else every step fails until it is.
    let launcher_token = std::fs::read_to_string(&cfg.launcher_token_path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| {
            OrchestratorError::Config(format!(
                "vm-launcher's operator credential {}: {e} (start vm-launcher first, or point --launcher-token at it)",
                cfg.launcher_token_path.display()
            ))
        })?;
    let launcher = LauncherClient::new(&cfg.launcher_url).with_token(&launcher_token);
    let engine_cfg = EngineConfig::new(dir.join("journal.db"), dir.join("artifacts"));
    let store = clawos_workflow::ArtifactStore::new(engine_cfg.artifacts_dir.clone())
        .map_err(|e| OrchestratorError::Config(format!("artifact store: {e}")))?;
    let executor = LauncherExecutor::new(launcher, store, cfg.boot_timeout);
    let engine = Engine::open(engine_cfg, executor, SystemClock).await?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| OrchestratorError::Io {
            path: PathBuf::from(cfg.addr.to_string()),
            source,
        })?;
    tracing::info!(addr = %cfg.addr, launcher = %cfg.launcher_url, runs = engine.list().len(), "orchestrator listening");
    let app = http::router(engine.clone(), &cfg, &token);
    let served =
        clawos_service::http::serve(listener, app, shutdown, clawos_service::http::DRAIN_TIMEOUT)
            .await;
    engine.shutdown().await;
    served.map_err(|source| OrchestratorError::Io {
        path: "HTTP server".into(),
        source,
    })
}
