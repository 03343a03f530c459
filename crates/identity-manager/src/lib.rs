//! identity-manager: zero-trust identity for agents.
//!
//! Every agent proves who it is with a short-lived Ed25519 JWT (`alg: EdDSA`, `kid` =
//! RFC 7638 thumbprint) that verifiers check against the published JWKS. Private keys
//! (signing keys and each agent's own key pair) are sealed with AES-256-GCM under a
//! key derived from a persistent master key; a wrong master key stops the service
//! before it changes anything.

pub mod http;
pub mod identity;
pub mod keystore;

use std::path::PathBuf;

pub use identity::{Identity, IssuerConfig};
pub use keystore::{MasterKey, MasterKeySource};

/// Errors; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// Missing or wrong credential, invalid token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Unknown agent or key (404).
    #[error("{0}")]
    NotFound(String),
    /// The master key is malformed, exposed, or does not open the store (startup).
    #[error("master key: {0}")]
    MasterKey(String),
    /// Anything else (500).
    #[error("{0}")]
    Internal(String),
}

/// Service settings, validated before the port opens.
#[derive(Debug)]
pub struct Config {
    pub addr: std::net::SocketAddr,
    pub db_path: PathBuf,
    pub master: MasterKeySource,
    pub issuer: IssuerConfig,
    /// Bearer credential the launcher/control plane present to issue and revoke.
    pub service_token: String,
}

/// Runs the service until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), IdentityError> {
    let master = MasterKey::load(&cfg.master)?;
    let identity = Identity::open(&cfg.db_path, master, cfg.issuer.clone())?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| IdentityError::Internal(format!("cannot listen on {}: {e}", cfg.addr)))?;
    tracing::info!(addr = %cfg.addr, store = %cfg.db_path.display(), issuer = %cfg.issuer.issuer, "identity-manager listening");
    let app = http::router(std::sync::Arc::new(identity), cfg.service_token);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| IdentityError::Internal(format!("HTTP server: {e}")))
}
