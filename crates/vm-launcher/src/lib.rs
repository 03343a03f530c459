//! vm-launcher: verifies signed agent images and runs each agent in its own microVM.
//!
//! Life cycle: verify (signature over the manifest, sha256 of kernel and initramfs,
//! pinned root hash) → prepare the VM's own disks → boot on a [`backend::Hypervisor`]
//! → a per-VM [`supervisor`] follows readiness and the process's end → stop (clean
//! power-off, then kill). State lives in files under the state directory, so a
//! restarted launcher re-adopts VMs whose hypervisor is still the same process.
//!
//! Layers, top down: [`http`] (REST) → [`launcher`] (the façade: one method per
//! operation) → [`registry`] (records, the [`state`] machine, waiting on a state) and
//! [`supervisor`] (one task per running VM) → [`backend`] (QEMU, Firecracker, and a
//! [`backend::fake`] for tests) with [`store`] and [`snapshot`] (files) and [`relays`]
//! (the VM's links to the host's other services).

pub mod agent;
pub mod backend;
pub mod config;
pub mod console;
pub mod host;
pub mod http;
pub mod identity;
pub mod launcher;
pub mod names;
pub mod registry;
pub mod relays;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod validate;
pub mod vsock;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::{BackendKind, Config, RawConfig};
pub use launcher::Launcher;

/// Errors of launcher operations; `http` maps each to one HTTP status and error code.
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
    /// The image failed verification, or the backend cannot boot it; nothing was
    /// started (422). `code` says what failed (one of the `image_*` codes of
    /// `clawos_api::code`), so clients can tell a bad signature from a changed file.
    #[error("{message}")]
    ImageRefused { code: &'static str, message: String },
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

    /// An image refused by verification, keeping what failed as its code.
    pub fn image_refused(e: &clawos_image::ImageError) -> Self {
        Self::ImageRefused {
            code: image_code(e),
            message: e.to_string(),
        }
    }

    /// An image that verified but that the backend cannot boot (e.g. Firecracker and a
    /// bundle without a `vmlinux`).
    pub fn image_unbootable(message: String) -> Self {
        Self::ImageRefused {
            code: clawos_api::code::IMAGE_INVALID,
            message,
        }
    }
}

/// The API error code of an image refusal: which part of the chain of trust failed.
pub fn image_code(e: &clawos_image::ImageError) -> &'static str {
    use clawos_api::code;
    use clawos_image::ImageError as E;
    match e {
        E::Unsigned { .. } => code::IMAGE_UNSIGNED,
        E::SignatureMismatch { .. } | E::SignatureSyntax { .. } => code::IMAGE_BAD_SIGNATURE,
        E::HashMismatch { .. } => code::IMAGE_HASH_MISMATCH,
        E::RootfsSize { .. } => code::IMAGE_SIZE_MISMATCH,
        E::RootHashPin { .. } => code::IMAGE_ROOT_HASH_MISMATCH,
        E::Read { .. }
        | E::ManifestSyntax { .. }
        | E::ManifestVersion { .. }
        | E::Key { .. }
        | E::Write { .. } => code::IMAGE_INVALID,
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
    /// The operator credential could not be read or made.
    #[error("operator credential: {0}")]
    Credential(String),
    /// A listener on another interface than loopback.
    #[error(
        "refusing to serve on {0}: the launcher's API has no TLS, so it listens on loopback only"
    )]
    NotLoopback(std::net::SocketAddr),
}

/// Builds the backend the configuration chose.
pub fn backend_for(cfg: &Config) -> Arc<dyn backend::Hypervisor> {
    match cfg.backend {
        BackendKind::Qemu => Arc::new(backend::qemu::Qemu {
            bin: cfg.qemu_bin.clone(),
            kvm: host::has_hardware_kvm(),
            tsc_khz: host::tsc_khz(),
            vhost_vsock: cfg.vhost_vsock_bin.clone(),
            vsock_device_log: cfg.vsock_device_log,
            qboot: Some(PathBuf::from(backend::qemu::QBOOT_ROM)).filter(|p| p.exists()),
        }),
        BackendKind::Firecracker => Arc::new(backend::firecracker::Firecracker {
            bin: cfg.firecracker_bin.clone(),
            jailer: cfg.jailer.clone(),
        }),
    }
}

/// The operator credential of `cfg.token_path`, made at the first start: its
/// directory 0700, the file 0600 and the daemon's own. A file others could read or
/// have chosen is refused (see `clawos_service::operator_token`).
pub fn operator_token(cfg: &Config) -> Result<String, ServeError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = cfg.token_path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ServeError::Credential(format!("{}: {e}", dir.display())))?;
    }
    clawos_service::operator_token(&cfg.token_path).map_err(ServeError::Credential)
}

/// Runs the launcher until `shutdown` resolves. VMs keep running when it returns; the
/// next start re-adopts them. The operator credential exists before the port opens.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let token = operator_token(&cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.addr,
            source,
        })?;
    serve_with(cfg, listener, &token, shutdown).await
}

/// Like [`run`], on an already bound listener (tests bind port 0).
pub async fn serve(
    cfg: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let token = operator_token(&cfg)?;
    serve_with(cfg, listener, &token, shutdown).await
}

async fn serve_with(
    cfg: Config,
    listener: tokio::net::TcpListener,
    token: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    if !addr.ip().is_loopback() {
        return Err(ServeError::NotLoopback(addr));
    }
    let backend = backend_for(&cfg);
    let guard = http::guard(&cfg, token);
    tracing::info!(
        addr = %addr,
        credential = %cfg.token_path.display(),
        backend = backend.name(),
        state_dir = %cfg.state_dir.display(),
        signatures = if cfg.public_key.is_some() { "required" } else { "NOT CHECKED (--allow-unsigned)" },
        vsock = cfg.backend == BackendKind::Firecracker || cfg.vhost_vsock_bin.is_some(),
        "vm-launcher listening"
    );
    let launcher: Arc<Launcher> = Launcher::new(cfg, backend)?;
    clawos_service::http::serve(
        listener,
        http::router(launcher, &guard),
        shutdown,
        clawos_service::http::DRAIN_TIMEOUT,
    )
    .await
    .map_err(ServeError::Http)?;
    Ok(())
}
