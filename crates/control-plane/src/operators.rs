//! Operator API tokens: created with a role and a lifetime, stored only as their
//! SHA-256 (a token is 256 random bits, so a fast hash is enough: there is nothing to
//! guess), listed without their secret, revoked by id. SQLite (WAL) in
//! `<state>/control-plane/operators.db`: a revocation is on disk before it is
//! acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use clawos_control_plane_api::{CreateToken, CreatedToken, MAX_TOKEN_TTL_SECS, Role, TokenInfo};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

/// What every operator token starts with, so a leaked one is recognisable (secret
/// scanners, log greps).
pub const TOKEN_PREFIX: &str = "clawos-op-";
/// Shortest token lifetime.
pub const MIN_TOKEN_TTL_SECS: u64 = 60;
/// The name of the token the daemon makes for the local admin at start.
pub const BOOTSTRAP_NAME: &str = "local-admin";

/// Why an operator-store call failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("operator store {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("no operator token with id {0:?}")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The token's name (or, later, the user's login).
    pub name: String,
    pub role: Role,
    /// How they authenticated: `token`.
    pub via: &'static str,
    /// The token's public id.
    pub token_id: String,
}

/// The token table.
#[derive(Debug)]
pub struct OperatorStore {
    path: PathBuf,
    db: Mutex<Connection>,
    /// Tokens seen valid, by hash, with their expiry: every request authenticates, and
    /// a read lock is cheaper than a query. Revocations go through [`Self::revoke`],
    /// which drops the entry before it returns, so a revoked token is refused at once.
    valid: std::sync::RwLock<std::collections::HashMap<[u8; 32], (Operator, u64)>>,
}

/// Most tokens kept in the cache (it is cleared when full).
const MAX_CACHED: usize = 10_000;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl OperatorStore {
    /// Opens (creating) the store at `path` (0600).
    pub fn open(path: &Path) -> Result<Self, OperatorError> {
        let db_err = |source| OperatorError::Db {
            path: path.to_owned(),
            source,
        };
        let db = Connection::open(path).map_err(db_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| OperatorError::Io {
                    path: path.to_owned(),
                    source,
                },
            )?;
        }
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS tokens (
                 id TEXT PRIMARY KEY,
                 hash BLOB NOT NULL UNIQUE,
                 name TEXT NOT NULL,
                 role TEXT NOT NULL,
                 created_at INTEGER NOT NULL,
                 expires_at INTEGER NOT NULL,
                 revoked_at INTEGER,
                 created_by TEXT NOT NULL
             );",
        )
        .map_err(db_err)?;
        Ok(Self {
            path: path.to_owned(),
            db: Mutex::new(db),
            valid: std::sync::RwLock::new(std::collections::HashMap::new()),
        })
    }

    fn db_err(&self, source: rusqlite::Error) -> OperatorError {
        OperatorError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each call is one
        // statement or transaction), so the connection is still good.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a token for `req` on behalf of `by`; the secret is in the answer only.
    pub fn create(&self, req: &CreateToken, by: &str) -> Result<CreatedToken, OperatorError> {
        if let Some(why) = clawos_api::label_problem(&req.name) {
            return Err(OperatorError::Invalid(format!(
                "token name {:?}: {why}",
                req.name
            )));
        }
        if !(MIN_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS).contains(&req.ttl_secs) {
            return Err(OperatorError::Invalid(format!(
                "ttl_secs {}: must be {MIN_TOKEN_TTL_SECS} to {MAX_TOKEN_TTL_SECS}",
                req.ttl_secs
            )));
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| OperatorError::Random(e.to_string()))?;
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let h = hash(&token);
        let id = hex::encode(&h[..8]);
        let now = unix_now();
        let info = TokenInfo {
            id: id.clone(),
            name: req.name.clone(),
            role: req.role,
            created_at: now,
            expires_at: now + req.ttl_secs,
            revoked_at: None,
            created_by: by.to_owned(),
        };
        self.lock()
            .execute(
                "INSERT INTO tokens (id, hash, name, role, created_at, expires_at, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    info.id,
                    &h[..],
                    info.name,
                    info.role.as_str(),
                    info.created_at as i64,
                    info.expires_at as i64,
                    info.created_by
                ],
            )
            .map_err(|e| self.db_err(e))?;
        Ok(CreatedToken { token, info })
    }

    /// The operator `token` belongs to, if it is known, not revoked and not expired.
    pub fn authenticate(&self, token: &str) -> Result<Option<Operator>, OperatorError> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return Ok(None);
        }
        let h = hash(token);
        let now = unix_now();
        if let Some((op, expires_at)) = self.valid.read().unwrap_or_else(|p| p.into_inner()).get(&h)
            && *expires_at > now
        {
            return Ok(Some(op.clone()));
        }
        // The database lock is held until the cache is updated, and `revoke` clears the
        // cache under the same lock: a lookup that read the row before a revocation
        // cannot put the token back after it.
        let db = self.lock();
        let row: Option<(String, String, String, i64)> = db
            .query_row(
                "SELECT id, name, role, expires_at FROM tokens
                 WHERE hash = ?1 AND revoked_at IS NULL AND expires_at > ?2",
                params![&h[..], now as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        let Some((id, name, role, expires_at)) = row else {
            return Ok(None);
        };
        let Ok(role) = role.parse() else {
            return Ok(None);
        };
        let op = Operator {
            name,
            role,
            via: "token",
            token_id: id,
        };
        let mut valid = self.valid.write().unwrap_or_else(|p| p.into_inner());
        if valid.len() >= MAX_CACHED {
            valid.clear();
        }
        valid.insert(h, (op.clone(), expires_at as u64));
        drop(valid);
        drop(db);
        Ok(Some(op))
    }

    /// Every token, newest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, OperatorError> {
        let db = self.lock();
        let mut stmt = db
            .prepare(
                "SELECT id, name, role, created_at, expires_at, revoked_at, created_by
                 FROM tokens ORDER BY created_at DESC, id",
            )
            .map_err(|e| self.db_err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let role: String = r.get(2)?;
                Ok(TokenInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    role: role.parse().unwrap_or(Role::Viewer),
                    created_at: r.get::<_, i64>(3)? as u64,
                    expires_at: r.get::<_, i64>(4)? as u64,
                    revoked_at: r.get::<_, Option<i64>>(5)?.map(|t| t as u64),
                    created_by: r.get(6)?,
                })
            })
            .map_err(|e| self.db_err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db_err(e))
    }

    /// Whether token `id` is still valid (not revoked, not expired): a browser session
    /// opened with it lives only as long as it does.
    pub fn is_active(&self, id: &str) -> Result<bool, OperatorError> {
        let now = unix_now();
        if self
            .valid
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|(op, exp)| op.token_id == id && *exp > now)
        {
            return Ok(true);
        }
        self.lock()
            .query_row(
                "SELECT 1 FROM tokens WHERE id = ?1 AND revoked_at IS NULL AND expires_at > ?2",
                params![id, unix_now() as i64],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| self.db_err(e))
    }

    /// Revokes token `id` from now on (revoking twice is not an error).
    pub fn revoke(&self, id: &str) -> Result<(), OperatorError> {
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(OperatorError::Invalid(format!(
                "token id {id:?}: 16 hex digits, as `operator token list` shows"
            )));
        }
        let db = self.lock();
        let changed = db
            .execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, unix_now() as i64],
            )
            .map_err(|e| self.db_err(e))?;
        self.valid
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (op, _)| op.token_id != id);
        drop(db);
        if changed == 0 {
            return Err(OperatorError::NotFound(id.to_owned()));
        }
        Ok(())
    }

    /// Revokes every live token provider user `user`'s CLI logins made (created by
    /// `oidc:<user>`); their ids.
    pub fn revoke_cli_logins_of(&self, user: &str) -> Result<Vec<String>, OperatorError> {
        let now = unix_now();
        let by = format!("oidc:{user}");
        let ids: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|t| t.created_by == by && t.revoked_at.is_none() && t.expires_at > now)
            .map(|t| t.id)
            .collect();
        for id in &ids {
            self.revoke(id)?;
        }
        Ok(ids)
    }

    /// The provider users whose CLI logins made a token named `token_name` (`cli-otto`:
    /// several users' names can map to one token name).
    pub fn cli_login_users(&self, token_name: &str) -> Result<Vec<String>, OperatorError> {
        let mut users: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|t| t.name == token_name)
            .filter_map(|t| t.created_by.strip_prefix("oidc:").map(str::to_owned))
            .collect();
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// Makes sure the local admin credential at `path` (0600) is a valid admin token:
    /// kept when it is, else a new one (valid [`MAX_TOKEN_TTL_SECS`]) replaces it.
    /// Whoever can read the state directory is the host's admin anyway.
    pub fn ensure_bootstrap(&self, path: &Path) -> Result<(), OperatorError> {
        if let Ok(t) = std::fs::read_to_string(path)
            && let Some(op) = self.authenticate(t.trim())?
            && op.role == Role::Admin
        {
            return Ok(());
        }
        let created = self.create(
            &CreateToken {
                name: BOOTSTRAP_NAME.to_owned(),
                role: Role::Admin,
                ttl_secs: MAX_TOKEN_TTL_SECS,
            },
            "control-plane",
        )?;
        clawos_service::atomic_write(path, format!("{}\n", created.token).as_bytes(), 0o600)
            .map_err(|source| OperatorError::Io {
                path: path.to_owned(),
                source,
            })?;
        tracing::info!(path = %path.display(), id = created.info.id, "made the local admin credential");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, OperatorStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = OperatorStore::open(&dir.path().join("ops.db")).expect("open");
        (dir, s)
    }

    fn req(name: &str, role: Role, ttl_secs: u64) -> CreateToken {
        CreateToken {
            name: name.into(),
            role,
            ttl_secs,
        }
    }

    #[test]
    fn a_token_authenticates_until_it_is_revoked_and_only_its_hash_is_stored() {
        let (dir, s) = store();
        let c = s
            .create(&req("ci-job", Role::Operator, 3600), "alice")
            .expect("create");
        assert!(c.token.starts_with(TOKEN_PREFIX));
        let op = s.authenticate(&c.token).expect("db").expect("known");
        assert_eq!((op.name.as_str(), op.role), ("ci-job", Role::Operator));
        // A token one character off is unknown (the last character replaced by another:
        // pushing a fixed one would give the token back whenever it already ended so).
        let mut wrong = c.token.clone();
        let last = wrong.pop();
        wrong.push(if last == Some('A') { 'B' } else { 'A' });
        assert_ne!(wrong, c.token);
        assert_eq!(s.authenticate(&wrong).expect("db"), None);
        s.revoke(&c.info.id).expect("revoke");
        assert_eq!(s.authenticate(&c.token).expect("db"), None, "revoked");
        assert!(s.list().expect("list")[0].revoked_at.is_some());
        drop(s);
        // The database holds no secret.
        for entry in std::fs::read_dir(dir.path()).expect("dir") {
            let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
            let secret = &c.token.as_bytes()[TOKEN_PREFIX.len()..];
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "the secret is on disk"
            );
        }
    }

    #[test]
    fn bad_names_lifetimes_and_ids_are_refused_by_name() {
        let (_d, s) = store();
        let e = s
            .create(&req("../x", Role::Viewer, 3600), "a")
            .expect_err("name");
        assert!(e.to_string().contains("token name"), "{e}");
        let e = s.create(&req("ok", Role::Viewer, 5), "a").expect_err("ttl");
        assert!(e.to_string().contains("ttl_secs 5"), "{e}");
        let e = s.revoke("nothex").expect_err("id");
        assert!(e.to_string().contains("16 hex digits"), "{e}");
        assert!(matches!(
            s.revoke("0123456789abcdef"),
            Err(OperatorError::NotFound(_))
        ));
        assert!(s.list().expect("list").is_empty(), "nothing was created");
    }

    #[test]
    fn the_bootstrap_credential_is_kept_while_valid_and_replaced_when_revoked() {
        let (dir, s) = store();
        let path = dir.path().join("admin.token");
        s.ensure_bootstrap(&path).expect("make");
        let first = std::fs::read_to_string(&path).expect("read");
        s.ensure_bootstrap(&path).expect("keep");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), first);
        let id = s.list().expect("list")[0].id.clone();
        s.revoke(&id).expect("revoke");
        s.ensure_bootstrap(&path).expect("replace");
        let second = std::fs::read_to_string(&path).expect("read");
        assert_ne!(first, second);
        let op = s.authenticate(second.trim()).expect("db").expect("valid");
        assert_eq!(op.role, Role::Admin);
    }

    #[test]
    fn a_users_cli_login_tokens_are_found_and_revoked_and_no_one_elses() {
        let (_d, s) = store();
        let otto = s
            .create(&req("cli-otto", Role::Operator, 3600), "oidc:otto")
            .expect("otto");
        // Another provider user whose name maps to the same token name.
        let otto2 = s
            .create(&req("cli-otto", Role::Viewer, 3600), "oidc:Otto")
            .expect("Otto");
        // An admin-made token that happens to carry that name.
        let admin_made = s
            .create(&req("cli-otto", Role::Viewer, 3600), "alice")
            .expect("admin-made");
        assert_eq!(
            s.cli_login_users("cli-otto").expect("users"),
            ["Otto", "otto"]
        );
        assert_eq!(
            s.revoke_cli_logins_of("otto").expect("revoke"),
            std::slice::from_ref(&otto.info.id)
        );
        assert!(!s.is_active(&otto.info.id).expect("db"));
        assert!(
            s.is_active(&otto2.info.id).expect("db"),
            "another user's token"
        );
        assert!(
            s.is_active(&admin_made.info.id).expect("db"),
            "an admin-made token"
        );
        assert!(s.revoke_cli_logins_of("otto").expect("again").is_empty());
    }
}
