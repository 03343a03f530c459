//! Signing keys, agent keys and tokens, persisted in SQLite: the store and its
//! master-key handling ([`store`]), the keys ([`keys`]), the tokens ([`tokens`]).
//!
//! Signing keys move `next → active → retired → removed`: the next key is published in
//! the JWKS before it signs anything, and a retired key stays published for the maximum
//! token lifetime plus the verifiers' cache time, so no valid token ever names a key
//! the JWKS no longer holds.

mod keys;
mod store;
mod tokens;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rusqlite::{Connection, params};

use crate::IdentityError;
use crate::keystore::MasterKey;

pub use clawos_identity_manager_api::{Claims, IssueRequest, Issued};
pub use keys::thumbprint;
pub use store::{lock_store, rotate_master_key};
pub use tokens::validate_agent;

/// Default token lifetime.
pub const DEFAULT_TTL_SECS: u64 = 15 * 60;
/// Hard maximum token lifetime.
pub const MAX_TTL_SECS: u64 = 60 * 60;
/// How long verifiers may cache the JWKS; retired keys stay published this much longer
/// than the longest token.
pub const JWKS_CACHE_SECS: u64 = 10 * 60;
/// Default maximum age of a token lineage: renewals chain for at most a day after the
/// service issued the first token; then the launcher must issue a new one.
pub const DEFAULT_MAX_LINEAGE_SECS: u64 = 24 * 60 * 60;

/// Settings of the token issuer.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// `iss` and the base of the discovery document.
    pub issuer: String,
    /// SPIFFE trust domain of `sub` (`spiffe://<domain>/agent/<name>`).
    pub trust_domain: String,
    /// Maximum age of a token lineage (`auth_time`, carried through renewals): older
    /// lineages are not renewed, and no renewed token outlives its lineage.
    pub max_lineage_secs: u64,
}

impl IssuerConfig {
    /// An issuer with the default maximum lineage age.
    pub fn new(issuer: &str, trust_domain: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            trust_domain: trust_domain.to_owned(),
            max_lineage_secs: DEFAULT_MAX_LINEAGE_SECS,
        }
    }
}

/// The service's state.
#[derive(Debug)]
pub struct Identity {
    db: Mutex<Connection>,
    master: MasterKey,
    key_version: u32,
    pub config: IssuerConfig,
    /// Held while the store is open, so an offline master-key rotation cannot run
    /// under a live service.
    _lock: std::fs::File,
}

impl Identity {
    /// Opens (or creates) the store at `path`. The master key must open the store's
    /// canary; otherwise nothing is written and the error says why.
    pub fn open(
        path: &Path,
        master: MasterKey,
        config: IssuerConfig,
    ) -> Result<Self, IdentityError> {
        let lock = lock_store(path)?;
        let mut key_version = 1;
        if path.exists() {
            match store::probe_canary(path, &master)? {
                Some(0) => {}
                Some(v) => key_version = v,
                None => {
                    return Err(IdentityError::MasterKey(format!(
                        "the master key does not open the key store {} (it was created with another key); refusing to start",
                        path.display()
                    )));
                }
            }
        }
        // Sealed or not, the key store is nobody else's business: created 0600 (SQLite
        // gives its -wal and -shm files the database's mode), and a store found with a
        // wider mode is narrowed.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| IdentityError::Io {
                    what: format!("create {}", path.display()),
                    source,
                })?;
        }
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|source| IdentityError::Io {
                what: format!("chmod {}", path.display()),
                source,
            })?;
        let db = Connection::open(path).map_err(db_err)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS signing_keys (
               kid TEXT PRIMARY KEY, state TEXT NOT NULL, public BLOB NOT NULL, sealed BLOB NOT NULL,
               key_version INTEGER NOT NULL, created INTEGER NOT NULL, activated INTEGER, retired INTEGER);
             CREATE TABLE IF NOT EXISTS agent_keys (
               agent TEXT PRIMARY KEY, public BLOB NOT NULL, sealed BLOB NOT NULL,
               key_version INTEGER NOT NULL, created INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS revoked_tokens (jti TEXT PRIMARY KEY, exp INTEGER NOT NULL, revoked INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS revoked_agents (agent TEXT PRIMARY KEY, before INTEGER NOT NULL);",
        )
        .map_err(db_err)?;
        let sealed = master.seal(key_version, "canary", store::CANARY)?;
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value, version) VALUES ('canary', ?1, ?2)",
            params![sealed, key_version],
        )
        .map_err(db_err)?;
        let id = Self {
            db: Mutex::new(db),
            master,
            key_version,
            config,
            _lock: lock,
        };
        id.ensure_keys()?;
        let (signing, agents) = id.open_all_keys()?;
        tracing::info!(
            signing_keys = signing,
            agent_keys = agents,
            "key store opened: every sealed key decrypts"
        );
        Ok(id)
    }

    /// Decrypts every sealed key once: a store that opens only partly is an error now,
    /// not at the first token of some agent later. Returns (signing, agent) counts.
    pub fn open_all_keys(&self) -> Result<(usize, usize), IdentityError> {
        let db = self.db();
        let mut counts = [0usize; 2];
        for (i, (sql, prefix)) in [
            (
                "SELECT kid, sealed, key_version FROM signing_keys",
                "signing",
            ),
            ("SELECT agent, sealed, key_version FROM agent_keys", "agent"),
        ]
        .into_iter()
        .enumerate()
        {
            let mut st = db.prepare(sql).map_err(db_err)?;
            let rows: Vec<(String, Vec<u8>, u32)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            for (owner, sealed, version) in rows {
                if self
                    .master
                    .open(version, &format!("{prefix}:{owner}"), &sealed)
                    .is_none()
                {
                    return Err(IdentityError::MasterKey(format!(
                        "{prefix} key {owner} does not open"
                    )));
                }
                counts[i] += 1;
            }
        }
        Ok((counts[0], counts[1]))
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id() -> Result<String, IdentityError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| IdentityError::Internal(format!("no OS randomness: {e}")))?;
    Ok(B64.encode(b))
}

fn db_err(e: rusqlite::Error) -> IdentityError {
    IdentityError::Database(e)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn identity(dir: &Path) -> Identity {
        identity_with(
            dir,
            IssuerConfig::new("http://127.0.0.1:2082", "test.local"),
        )
    }

    pub(crate) fn identity_with(dir: &Path, config: IssuerConfig) -> Identity {
        Identity::open(
            &dir.join("id.db"),
            MasterKey::generate().expect("key"),
            config,
        )
        .expect("open")
    }

    pub(crate) fn req(agent: &str) -> IssueRequest {
        IssueRequest {
            agent: agent.into(),
            vm_id: "vm-1".into(),
            image_root_hash: "a".repeat(64),
            audience: "inference-proxy".into(),
            ttl_secs: None,
            scopes: vec!["llm:invoke".into()],
        }
    }

    #[test]
    fn no_private_key_bytes_on_disk() {
        let d = tempfile::tempdir().expect("tmp");
        let id = identity(d.path());
        for a in ["a1", "a2", "a3"] {
            id.issue(&req(a)).expect("issue");
        }
        id.rotate_signing_keys().expect("rotate");
        let mut secrets: Vec<[u8; 32]> = ["a1", "a2", "a3"]
            .iter()
            .map(|a| id.agent_private_key(a).expect("agent key").to_bytes())
            .collect();
        {
            let db = id.db();
            let mut st = db
                .prepare("SELECT kid, sealed, key_version FROM signing_keys")
                .expect("prepare");
            let rows: Vec<(String, Vec<u8>, u32)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            for (kid, sealed, v) in rows {
                let seed = id
                    .master
                    .open(v, &format!("signing:{kid}"), &sealed)
                    .expect("opens");
                secrets.push(seed.try_into().expect("32"));
            }
        }
        assert_eq!(secrets.len(), 6);
        drop(id);
        let mut on_disk = Vec::new();
        for e in std::fs::read_dir(d.path()).expect("dir").flatten() {
            on_disk.extend(std::fs::read(e.path()).expect("read"));
        }
        assert!(on_disk.len() > 4096);
        for s in &secrets {
            assert!(
                !on_disk.windows(32).any(|w| w == s),
                "a private key is stored in plaintext"
            );
        }
    }
}
