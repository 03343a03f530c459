//! vm-launcher: verifies signed agent images and runs each agent in its own microVM.
//!
//! Life cycle: verify (signature over the manifest, sha256 of kernel and initramfs,
//! pinned root hash) → prepare the VM's own disks → boot on a [`backend::Hypervisor`]
//! → watch the console for readiness and the process for its end → stop (clean
//! power-off, then kill). State lives in files under the state directory, so a
//! restarted launcher re-adopts VMs whose hypervisor is still the same process.

pub mod backend;
pub mod config;
pub mod console;
pub mod host;
pub mod http;
pub mod launcher;
pub mod snapshot;
pub mod store;
pub mod validate;
pub mod vsock;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::{BackendKind, Config, RawConfig};
pub use launcher::Launcher;

/// Errors of launcher operations; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// No such VM (404).
    #[error("{0}")]
    NotFound(String),
    /// The VM's state does not allow the operation (409).
    #[error("{0}")]
    Conflict(String),
    /// Image verification failed; nothing was started (422).
    #[error("{0}")]
    ImageRefused(String),
    /// File system failure (500).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Anything else on the host side (500).
    #[error("{0}")]
    Internal(String),
}

impl LauncherError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Errors that end the launcher.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address is not available.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The state directory could not be loaded.
    #[error("cannot load VM state: {0}")]
    State(#[from] LauncherError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[source] io::Error),
}

/// Builds the backend the configuration chose.
pub fn backend_for(cfg: &Config) -> Box<dyn backend::Hypervisor> {
    match cfg.backend {
        BackendKind::Qemu => Box::new(backend::qemu::Qemu {
            bin: cfg.qemu_bin.clone(),
            kvm: host::has_hardware_kvm(),
            tsc_khz: host::tsc_khz(),
            vhost_vsock: cfg.vhost_vsock_bin.clone(),
            qboot: Some(PathBuf::from(backend::qemu::QBOOT_ROM)).filter(|p| p.exists()),
        }),
        BackendKind::Firecracker => Box::new(backend::firecracker::Firecracker {
            bin: cfg.firecracker_bin.clone(),
            jailer: cfg.jailer.clone(),
        }),
    }
}

/// Runs the launcher until `shutdown` resolves. VMs keep running when it returns; the
/// next start re-adopts them.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.addr,
            source,
        })?;
    serve(cfg, listener, shutdown).await
}

/// Like [`run`], on an already bound listener (tests bind port 0).
pub async fn serve(
    cfg: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let backend = backend_for(&cfg);
    tracing::info!(
        addr = %listener.local_addr().map_err(ServeError::Http)?,
        backend = backend.name(),
        state_dir = %cfg.state_dir.display(),
        signatures = if cfg.public_key.is_some() { "required" } else { "NOT CHECKED (--allow-unsigned)" },
        vsock = cfg.backend == BackendKind::Firecracker || cfg.vhost_vsock_bin.is_some(),
        "vm-launcher listening"
    );
    let launcher: Arc<Launcher> = Launcher::new(cfg, backend)?;
    axum::serve(listener, http::router(launcher))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Http)?;
    Ok(())
}
