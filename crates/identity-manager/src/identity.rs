//! Signing keys, agent keys and tokens, persisted in SQLite.
//!
//! Signing keys move `next → active → retired → removed`: the next key is published in
//! the JWKS before it signs anything, and a retired key stays published for the maximum
//! token lifetime plus the verifiers' cache time, so no valid token ever names a key
//! the JWKS no longer holds.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::IdentityError;
use crate::keystore::MasterKey;

/// Default token lifetime.
pub const DEFAULT_TTL_SECS: u64 = 15 * 60;
/// Hard maximum token lifetime.
pub const MAX_TTL_SECS: u64 = 60 * 60;
/// How long verifiers may cache the JWKS; retired keys stay published this much longer
/// than the longest token.
pub const JWKS_CACHE_SECS: u64 = 10 * 60;

const CANARY: &[u8] = b"clawos identity-manager store canary";

/// Settings of the token issuer.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// `iss` and the base of the discovery document.
    pub issuer: String,
    /// SPIFFE trust domain of `sub` (`spiffe://<domain>/agent/<name>`).
    pub trust_domain: String,
}

/// The claims of an agent token (shared with every verifier).
pub use clawos_agent_token::Claims;

/// What the launcher or control plane asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    pub agent: String,
    pub vm_id: String,
    #[serde(default)]
    pub image_root_hash: String,
    pub audience: String,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// An issued token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub token: String,
    pub jti: String,
    pub kid: String,
    pub expires_at: u64,
}

/// A signing key as kept in memory.
#[derive(Debug, Clone)]
struct SigningKeyRow {
    kid: String,
    state: String,
    public: [u8; 32],
    retired: Option<u64>,
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

/// Takes the store's exclusive lock (`<db>.lock`), or says who holds it.
pub fn lock_store(path: &Path) -> Result<std::fs::File, IdentityError> {
    use std::os::fd::AsRawFd;
    let lock_path = path.with_extension("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| IdentityError::Internal(format!("open {}: {e}", lock_path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(IdentityError::Invalid(format!(
            "the key store {} is in use (is identity-manager running? stop it first)",
            path.display()
        )));
    }
    Ok(f)
}

/// Reads the canary without writing anything: `Some(version)` if `master` opens it,
/// `None` if it does not, `Ok(Some(0))` for a store that has no canary yet.
fn probe_canary(path: &Path, master: &MasterKey) -> Result<Option<u32>, IdentityError> {
    // Without a WAL file the database is opened `immutable` (SQLite then creates no
    // -wal/-shm files); with one, read-only so its committed pages count.
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let ro = if Path::new(&wal).exists() {
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
    } else {
        Connection::open_with_flags(
            format!("file:{}?immutable=1", path.display()),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
    }
    .map_err(db_err)?;
    let has_meta: bool = ro
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE name = 'meta')",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if !has_meta {
        return Ok(Some(0));
    }
    let canary: Option<(Vec<u8>, u32)> = ro
        .query_row(
            "SELECT value, version FROM meta WHERE key = 'canary'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db_err)?;
    Ok(match canary {
        None => Some(0),
        Some((sealed, version)) => {
            (master.open(version, "canary", &sealed).as_deref() == Some(CANARY)).then_some(version)
        }
    })
}

/// Re-seals every private key and the canary under `new`, in one transaction: a crash
/// leaves the store entirely under the old key or entirely under the new one. The
/// service must be stopped (the store lock is taken). Returns (keys re-sealed, new
/// key version).
pub fn rotate_master_key(
    path: &Path,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<(usize, u32), IdentityError> {
    let _lock = lock_store(path)?;
    let version = match probe_canary(path, old)? {
        Some(v) if v > 0 => v,
        Some(_) => {
            return Err(IdentityError::Invalid(format!(
                "{} has no keys yet",
                path.display()
            )));
        }
        None => {
            return Err(IdentityError::MasterKey(
                "the current master key does not open the store".into(),
            ));
        }
    };
    let next = version + 1;
    let mut db = Connection::open(path).map_err(db_err)?;
    let tx = db.transaction().map_err(db_err)?;
    let mut count = 0;
    for (table, id_col, prefix) in [
        ("signing_keys", "kid", "signing"),
        ("agent_keys", "agent", "agent"),
    ] {
        let rows: Vec<(String, Vec<u8>, u32)> = {
            let mut st = tx
                .prepare(&format!(
                    "SELECT {id_col}, sealed, key_version FROM {table}"
                ))
                .map_err(db_err)?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?
        };
        for (owner, sealed, v) in rows {
            let aad = format!("{prefix}:{owner}");
            let plain = old.open(v, &aad, &sealed).ok_or_else(|| {
                IdentityError::MasterKey(format!("{aad} does not open with the current key"))
            })?;
            let resealed = new.seal(next, &aad, &plain)?;
            tx.execute(
                &format!("UPDATE {table} SET sealed = ?1, key_version = ?2 WHERE {id_col} = ?3"),
                params![resealed, next, owner],
            )
            .map_err(db_err)?;
            count += 1;
        }
    }
    tx.execute(
        "UPDATE meta SET value = ?1, version = ?2 WHERE key = 'canary'",
        params![new.seal(next, "canary", CANARY)?, next],
    )
    .map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    Ok((count, next))
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
    IdentityError::Internal(format!("database: {e}"))
}

/// RFC 7638 thumbprint of an Ed25519 public key (its JWK with the required members in
/// lexicographic order).
pub fn thumbprint(public: &[u8; 32]) -> String {
    let jwk = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public)
    );
    B64.encode(Sha256::digest(jwk.as_bytes()))
}

/// PKCS#8 v1 DER of an Ed25519 seed (the 48-byte form `jsonwebtoken` takes).
fn pkcs8_v1(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

/// Names follow the VM-name rules: `[a-z0-9-]`, 1–63, no leading or trailing `-`.
pub fn validate_agent(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Invalid(format!(
            "invalid agent name {:?}: [a-z0-9-], 1-63 characters",
            name.chars().take(80).collect::<String>()
        )))
    }
}

fn validate_field(what: &str, v: &str, max: usize) -> Result<(), IdentityError> {
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(IdentityError::Invalid(format!(
            "invalid {what}: 1-{max} printable characters"
        )));
    }
    Ok(())
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
            match probe_canary(path, &master)? {
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
        let db = Connection::open(path).map_err(db_err)?;
        // Sealed or not, the key store is nobody else's business.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| IdentityError::Internal(format!("chmod {}: {e}", path.display())))?;
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
        let sealed = master.seal(key_version, "canary", CANARY)?;
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

    /// An agent's public key, if it has one.
    pub fn known_agent_key(&self, agent: &str) -> Result<[u8; 32], IdentityError> {
        validate_agent(agent)?;
        let p: Option<Vec<u8>> = self
            .db()
            .query_row(
                "SELECT public FROM agent_keys WHERE agent = ?1",
                [agent],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        p.and_then(|p| p.try_into().ok())
            .ok_or_else(|| IdentityError::NotFound(format!("unknown agent {agent}")))
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_signing_key(&self, db: &Connection, state: &str) -> Result<String, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| IdentityError::Internal(format!("no OS randomness: {e}")))?;
        let public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        let kid = thumbprint(&public);
        let sealed = self
            .master
            .seal(self.key_version, &format!("signing:{kid}"), &seed)?;
        let t = now();
        db.execute(
            "INSERT INTO signing_keys (kid, state, public, sealed, key_version, created, activated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                kid,
                state,
                public.to_vec(),
                sealed,
                self.key_version,
                t,
                (state == "active").then_some(t)
            ],
        )
        .map_err(db_err)?;
        Ok(kid)
    }

    /// Makes sure there is an active key and a published next key.
    fn ensure_keys(&self) -> Result<(), IdentityError> {
        let db = self.db();
        for state in ["active", "next"] {
            let n: i64 = db
                .query_row(
                    "SELECT COUNT(*) FROM signing_keys WHERE state = ?1",
                    [state],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if n == 0 {
                self.new_signing_key(&db, state)?;
            }
        }
        Ok(())
    }

    /// Rotation: active → retired, next → active, a new next. Retired keys older than
    /// the longest token plus the JWKS cache time are removed.
    pub fn rotate_signing_keys(&self) -> Result<String, IdentityError> {
        let mut db = self.db();
        let tx = db.transaction().map_err(db_err)?;
        let t = now();
        tx.execute(
            "UPDATE signing_keys SET state = 'retired', retired = ?1 WHERE state = 'active'",
            [t],
        )
        .map_err(db_err)?;
        tx.execute(
            "UPDATE signing_keys SET state = 'active', activated = ?1 WHERE state = 'next'",
            [t],
        )
        .map_err(db_err)?;
        self.new_signing_key(&tx, "next")?;
        tx.execute(
            "DELETE FROM signing_keys WHERE state = 'retired' AND retired < ?1",
            [t.saturating_sub(MAX_TTL_SECS + JWKS_CACHE_SECS)],
        )
        .map_err(db_err)?;
        let kid: String = tx
            .query_row(
                "SELECT kid FROM signing_keys WHERE state = 'active'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(active = %kid, "signing keys rotated");
        Ok(kid)
    }

    fn keys(&self) -> Result<Vec<SigningKeyRow>, IdentityError> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT kid, state, public, retired FROM signing_keys ORDER BY created")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| {
                let public: Vec<u8> = r.get(2)?;
                Ok(SigningKeyRow {
                    kid: r.get(0)?,
                    state: r.get(1)?,
                    public: public.try_into().unwrap_or([0; 32]),
                    retired: r.get(3)?,
                })
            })
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    /// The published keys (next, active, and retired ones still within their window).
    pub fn jwks(&self) -> Result<serde_json::Value, IdentityError> {
        let cutoff = now().saturating_sub(MAX_TTL_SECS + JWKS_CACHE_SECS);
        let keys: Vec<serde_json::Value> = self
            .keys()?
            .into_iter()
            .filter(|k| k.state != "retired" || k.retired.is_some_and(|r| r >= cutoff))
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "x": B64.encode(k.public),
                    "kid": k.kid, "alg": "EdDSA", "use": "sig",
                })
            })
            .collect();
        Ok(serde_json::json!({ "keys": keys }))
    }

    fn active_signer(&self) -> Result<(String, EncodingKey), IdentityError> {
        let db = self.db();
        let (kid, sealed, version): (String, Vec<u8>, u32) = db
            .query_row(
                "SELECT kid, sealed, key_version FROM signing_keys WHERE state = 'active'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(db_err)?;
        let seed: [u8; 32] = self
            .master
            .open(version, &format!("signing:{kid}"), &sealed)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| IdentityError::Internal(format!("signing key {kid} does not open")))?;
        Ok((kid, EncodingKey::from_ed_der(&pkcs8_v1(&seed))))
    }

    /// The agent's own key pair (created on first use); returns its public key.
    pub fn agent_key(&self, agent: &str) -> Result<[u8; 32], IdentityError> {
        validate_agent(agent)?;
        let db = self.db();
        let existing: Option<Vec<u8>> = db
            .query_row(
                "SELECT public FROM agent_keys WHERE agent = ?1",
                [agent],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if let Some(p) = existing {
            return p
                .try_into()
                .map_err(|_| IdentityError::Internal("bad agent key row".into()));
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| IdentityError::Internal(format!("no OS randomness: {e}")))?;
        let public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        let sealed = self
            .master
            .seal(self.key_version, &format!("agent:{agent}"), &seed)?;
        db.execute(
            "INSERT INTO agent_keys (agent, public, sealed, key_version, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![agent, public.to_vec(), sealed, self.key_version, now()],
        )
        .map_err(db_err)?;
        Ok(public)
    }

    /// Decrypts an agent's private key (proves the store opens; used to sign on its behalf).
    pub fn agent_private_key(&self, agent: &str) -> Result<SigningKey, IdentityError> {
        let db = self.db();
        let (sealed, version): (Vec<u8>, u32) = db
            .query_row(
                "SELECT sealed, key_version FROM agent_keys WHERE agent = ?1",
                [agent],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err)?
            .ok_or_else(|| IdentityError::NotFound(format!("unknown agent {agent}")))?;
        let seed: [u8; 32] = self
            .master
            .open(version, &format!("agent:{agent}"), &sealed)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| {
                IdentityError::Internal(format!("agent key of {agent} does not open"))
            })?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// Issues a token.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, IdentityError> {
        validate_agent(&req.agent)?;
        validate_field("vm_id", &req.vm_id, 128)?;
        validate_field("audience", &req.audience, 256)?;
        let hash_ok = req.image_root_hash.is_empty()
            || (req.image_root_hash.len() == 64
                && req.image_root_hash.bytes().all(|b| b.is_ascii_hexdigit()));
        if !hash_ok {
            return Err(IdentityError::Invalid(
                "invalid image_root_hash: 64 hex characters".into(),
            ));
        }
        for s in &req.scopes {
            if s.is_empty()
                || s.len() > 64
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":._-/".contains(&b))
            {
                return Err(IdentityError::Invalid(format!("invalid scope {s:?}")));
            }
        }
        let ttl = req.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
        if ttl == 0 || ttl > MAX_TTL_SECS {
            return Err(IdentityError::Invalid(format!(
                "invalid ttl_secs {ttl}: 1 to {MAX_TTL_SECS} (tokens are short-lived)"
            )));
        }
        self.agent_key(&req.agent)?;
        let t = now();
        let claims = Claims {
            iss: self.config.issuer.clone(),
            sub: format!("spiffe://{}/agent/{}", self.config.trust_domain, req.agent),
            aud: req.audience.clone(),
            iat: t,
            nbf: t,
            exp: t + ttl,
            jti: random_id()?,
            agent: req.agent.clone(),
            vm_id: req.vm_id.clone(),
            image_root_hash: req.image_root_hash.clone(),
            scopes: req.scopes.clone(),
        };
        self.sign(&claims)
    }

    fn sign(&self, claims: &Claims) -> Result<Issued, IdentityError> {
        let (kid, key) = self.active_signer()?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.clone());
        let token = jsonwebtoken::encode(&header, claims, &key)
            .map_err(|e| IdentityError::Internal(format!("sign: {e}")))?;
        Ok(Issued {
            token,
            jti: claims.jti.clone(),
            kid,
            expires_at: claims.exp,
        })
    }

    /// Verifies signature, issuer, expiry and revocation (and the audience, if given).
    pub fn verify(&self, token: &str, audience: Option<&str>) -> Result<Claims, IdentityError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| IdentityError::Unauthorized(format!("malformed token: {e}")))?;
        if header.alg != Algorithm::EdDSA {
            return Err(IdentityError::Unauthorized(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| IdentityError::Unauthorized("token has no kid".into()))?;
        let key = self
            .keys()?
            .into_iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| IdentityError::Unauthorized(format!("unknown signing key {kid}")))?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&[self.config.issuer.as_str()]);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
        match audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_ed_der(&key.public), &v)
                .map_err(|e| IdentityError::Unauthorized(format!("invalid token: {e}")))?;
        let c = data.claims;
        let db = self.db();
        let revoked: bool = db
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM revoked_tokens WHERE jti = ?1)",
                [&c.jti],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        let agent_cutoff: Option<u64> = db
            .query_row(
                "SELECT before FROM revoked_agents WHERE agent = ?1",
                [&c.agent],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if revoked || agent_cutoff.is_some_and(|b| c.iat <= b) {
            return Err(IdentityError::Unauthorized("token revoked".into()));
        }
        Ok(c)
    }

    /// A new token with the same claims and lifetime, for an agent holding a valid one.
    pub fn renew(&self, token: &str) -> Result<Issued, IdentityError> {
        let old = self.verify(token, None)?;
        let ttl = old.exp.saturating_sub(old.iat).clamp(1, MAX_TTL_SECS);
        let t = now();
        let claims = Claims {
            iat: t,
            nbf: t,
            exp: t + ttl,
            jti: random_id()?,
            ..old
        };
        self.sign(&claims)
    }

    /// Revokes one token by `jti` (kept until it would have expired anyway).
    pub fn revoke_jti(&self, jti: &str) -> Result<(), IdentityError> {
        validate_field("jti", jti, 128)?;
        let t = now();
        self.db()
            .execute(
                "INSERT OR REPLACE INTO revoked_tokens (jti, exp, revoked) VALUES (?1, ?2, ?3)",
                params![jti, t + MAX_TTL_SECS, t],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Revokes every token of an agent issued up to now.
    pub fn revoke_agent(&self, agent: &str) -> Result<(), IdentityError> {
        validate_agent(agent)?;
        self.db()
            .execute(
                "INSERT OR REPLACE INTO revoked_agents (agent, before) VALUES (?1, ?2)",
                params![agent, now()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// The revocation feed verifiers poll.
    pub fn revocations(&self) -> Result<serde_json::Value, IdentityError> {
        let db = self.db();
        let t = now();
        db.execute("DELETE FROM revoked_tokens WHERE exp < ?1", [t])
            .map_err(db_err)?;
        let mut st = db
            .prepare("SELECT jti, exp FROM revoked_tokens")
            .map_err(db_err)?;
        let jtis: Vec<serde_json::Value> = st
            .query_map([], |r| {
                Ok(serde_json::json!({ "jti": r.get::<_, String>(0)?, "exp": r.get::<_, u64>(1)? }))
            })
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        let mut st = db
            .prepare("SELECT agent, before FROM revoked_agents")
            .map_err(db_err)?;
        let agents: Vec<serde_json::Value> = st
            .query_map([], |r| Ok(serde_json::json!({ "agent": r.get::<_, String>(0)?, "issued_before": r.get::<_, u64>(1)? })))
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        Ok(serde_json::json!({ "generated_at": t, "tokens": jtis, "agents": agents }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &Path) -> Identity {
        Identity::open(
            &dir.join("id.db"),
            MasterKey::generate().expect("key"),
            IssuerConfig {
                issuer: "http://127.0.0.1:2082".into(),
                trust_domain: "test.local".into(),
            },
        )
        .expect("open")
    }

    fn req(agent: &str) -> IssueRequest {
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
    fn thumbprint_matches_rfc_8037_example() {
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        let x = B64
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .expect("b64");
        let x: [u8; 32] = x.try_into().expect("32");
        assert_eq!(
            thumbprint(&x),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn issue_verify_revoke_and_rotate() {
        let d = tempfile::tempdir().expect("tmp");
        let id = identity(d.path());
        let t = id.issue(&req("agent-1")).expect("issue");
        let c = id
            .verify(&t.token, Some("inference-proxy"))
            .expect("verify");
        assert_eq!(c.sub, "spiffe://test.local/agent/agent-1");
        assert!(id.verify(&t.token, Some("other")).is_err(), "audience");
        let renewed = id.renew(&t.token).expect("renew");
        assert_ne!(renewed.jti, t.jti);
        id.revoke_jti(&t.jti).expect("revoke");
        assert!(id.verify(&t.token, None).is_err(), "revoked");
        id.verify(&renewed.token, None)
            .expect("other tokens unaffected");

        let before = id.issue(&req("agent-2")).expect("issue");
        let new_kid = id.rotate_signing_keys().expect("rotate");
        assert_ne!(new_kid, before.kid);
        id.verify(&before.token, None)
            .expect("tokens signed before a rotation still verify");
        let after = id.issue(&req("agent-2")).expect("issue");
        assert_eq!(after.kid, new_kid);
        let kids: Vec<String> = id.jwks().expect("jwks")["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert!(
            kids.contains(&before.kid) && kids.contains(&new_kid) && kids.len() == 3,
            "{kids:?}"
        );

        id.revoke_agent("agent-2").expect("revoke agent");
        assert!(id.verify(&after.token, None).is_err());
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

    #[test]
    fn bad_requests_are_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let id = identity(d.path());
        let cases = [
            IssueRequest {
                agent: "../x".into(),
                ..req("a")
            },
            IssueRequest {
                agent: "a".repeat(64),
                ..req("a")
            },
            IssueRequest {
                ttl_secs: Some(MAX_TTL_SECS + 1),
                ..req("a")
            },
            IssueRequest {
                audience: String::new(),
                ..req("a")
            },
            IssueRequest {
                image_root_hash: "xyz".into(),
                ..req("a")
            },
            IssueRequest {
                scopes: vec!["a b".into()],
                ..req("a")
            },
        ];
        for c in cases {
            assert!(
                matches!(id.issue(&c), Err(IdentityError::Invalid(_))),
                "{c:?}"
            );
        }
    }
}
