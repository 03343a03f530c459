//! identity-manager: zero-trust identity for agents.
//!
//! Every agent proves who it is with a short-lived Ed25519 JWT (`alg: EdDSA`, `kid` =
//! RFC 7638 thumbprint) that verifiers check against the published JWKS. Private keys
//! (signing keys and each agent's own key pair) are sealed with AES-256-GCM under a
//! key derived from a persistent master key; a wrong master key stops the service
//! before it changes anything.
//!
//! [`identity`] owns keys and tokens in the store, [`keystore`] the master key, [`http`]
//! serves the API whose routes and wire types are `clawos_identity_manager_api`.

pub mod http;
pub mod identity;
pub mod keystore;

use std::path::PathBuf;

pub use identity::{Identity, IssuerConfig};
pub use keystore::{MasterKey, MasterKeySource};

/// Errors of the service; `http` maps each to one HTTP status and error code.
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
    /// The key store's database failed (500).
    #[error("database: {0}")]
    Database(#[source] rusqlite::Error),
    /// A file operation on the store failed (500).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
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

fn next_key_path(path: &std::path::Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

/// Opens the store with the configured master key. A master-key rotation that
/// committed but crashed before renaming `<key>.next` into place is finished here; a
/// `<key>.next` that never committed is discarded.
pub fn open_store(
    db: &std::path::Path,
    source: &MasterKeySource,
    issuer: &IssuerConfig,
) -> Result<Identity, IdentityError> {
    let primary = Identity::open(db, MasterKey::load(source)?, issuer.clone());
    let MasterKeySource::Path(key_path) = source else {
        return primary;
    };
    let next = next_key_path(key_path);
    match primary {
        Ok(id) => {
            if next.exists() {
                tracing::warn!(path = %next.display(), "discarding a master key from a rotation that did not commit");
                let _ = std::fs::remove_file(&next);
            }
            Ok(id)
        }
        Err(IdentityError::MasterKey(why)) if next.exists() => {
            let id = Identity::open(
                db,
                MasterKey::load(&MasterKeySource::Path(next.clone()))?,
                issuer.clone(),
            )
            .map_err(|_| IdentityError::MasterKey(why))?;
            std::fs::rename(&next, key_path).map_err(|e| {
                IdentityError::MasterKey(format!("promote {}: {e}", next.display()))
            })?;
            tracing::warn!(path = %key_path.display(), "finished an interrupted master-key rotation");
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// Rotates the master key kept at `key_path`: the new key is written to `<key>.next`,
/// every sealed key is re-sealed in one transaction, then the file is renamed into
/// place. A crash at any point leaves a store that opens with the old or the new key
/// (see [`open_store`]). The service must be stopped.
pub fn rotate_master_key_file(
    db: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<(usize, u32), IdentityError> {
    let issuer = IssuerConfig::new("", "");
    // Finish or discard an earlier interrupted rotation first.
    drop(open_store(
        db,
        &MasterKeySource::Path(key_path.to_owned()),
        &issuer,
    )?);
    let old = MasterKey::load(&MasterKeySource::Path(key_path.to_owned()))?;
    let next = next_key_path(key_path);
    let new = MasterKey::generate()?;
    new.write_new_file(&next)?;
    match identity::rotate_master_key(db, &old, &new) {
        Ok(done) => {
            std::fs::rename(&next, key_path)
                .map_err(|e| IdentityError::MasterKey(format!("rename {}: {e}", next.display())))?;
            if let Some(dir) = key_path.parent()
                && let Ok(d) = std::fs::File::open(dir)
            {
                let _ = d.sync_all();
            }
            Ok(done)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&next);
            Err(e)
        }
    }
}

/// Runs the service until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), IdentityError> {
    let identity = open_store(&cfg.db_path, &cfg.master, &cfg.issuer)?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| IdentityError::Internal(format!("cannot listen on {}: {e}", cfg.addr)))?;
    tracing::info!(addr = %cfg.addr, store = %cfg.db_path.display(), issuer = %cfg.issuer.issuer, "identity-manager listening");
    let app = http::router(
        std::sync::Arc::new(identity),
        cfg.service_token,
        cfg.addr,
        &cfg.issuer.issuer,
    );
    clawos_service::http::serve(listener, app, shutdown, clawos_service::http::DRAIN_TIMEOUT)
        .await
        .map_err(|e| IdentityError::Internal(format!("HTTP server: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> IssuerConfig {
        IssuerConfig::new("http://127.0.0.1:2082", "t")
    }

    /// The state a crash leaves between the rotation's commit and the key file rename:
    /// the store is under the new key, the file still holds the old one, the new key
    /// is in `<key>.next`. Start-up must finish the rotation.
    #[test]
    fn a_rotation_that_committed_but_did_not_rename_is_finished_at_start() {
        let d = tempfile::tempdir().expect("tmp");
        let db = d.path().join("identity.db");
        let key = d.path().join("master.key");
        let src = MasterKeySource::Path(key.clone());
        let token = {
            let id = open_store(&db, &src, &issuer()).expect("create");
            id.issue(&identity::IssueRequest {
                agent: "a".into(),
                vm_id: "v".into(),
                image_root_hash: String::new(),
                audience: "x".into(),
                ttl_secs: None,
                scopes: vec![],
            })
            .expect("issue")
            .token
        };
        let old = MasterKey::load(&src).expect("old");
        let new = MasterKey::generate().expect("new");
        new.write_new_file(&next_key_path(&key)).expect("next");
        identity::rotate_master_key(&db, &old, &new).expect("commit");
        // Crash here: no rename.
        let id = open_store(&db, &src, &issuer()).expect("recovers with the new key");
        assert!(!next_key_path(&key).exists(), "the new key was promoted");
        id.verify(&token, None).expect("old tokens still verify");
        assert_eq!(id.open_all_keys().expect("keys"), (2, 1));
        drop(id);
        // A stale .next (rotation killed before commit) is discarded, the store opens.
        MasterKey::generate()
            .expect("k")
            .write_new_file(&next_key_path(&key))
            .expect("stale");
        drop(open_store(&db, &src, &issuer()).expect("opens with the current key"));
        assert!(!next_key_path(&key).exists());
    }
}
