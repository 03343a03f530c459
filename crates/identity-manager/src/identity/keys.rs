//! Signing keys (`next → active → retired`), the JWKS, and each agent's own key pair,
//! all sealed under the master key.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use clawos_identity_manager_api::{Jwk, Jwks};
use ed25519_dalek::SigningKey;
use jsonwebtoken::EncodingKey;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::tokens::validate_agent;
use super::{Identity, JWKS_CACHE_SECS, MAX_TTL_SECS, db_err, now};
use crate::IdentityError;

/// A signing key as kept in memory.
#[derive(Debug, Clone)]
pub(super) struct SigningKeyRow {
    pub(super) kid: String,
    state: String,
    pub(super) public: [u8; 32],
    retired: Option<u64>,
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

impl Identity {
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
    pub(super) fn ensure_keys(&self) -> Result<(), IdentityError> {
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

    pub(super) fn keys(&self) -> Result<Vec<SigningKeyRow>, IdentityError> {
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
    pub fn jwks(&self) -> Result<Jwks, IdentityError> {
        let cutoff = now().saturating_sub(MAX_TTL_SECS + JWKS_CACHE_SECS);
        let keys = self
            .keys()?
            .into_iter()
            .filter(|k| k.state != "retired" || k.retired.is_some_and(|r| r >= cutoff))
            .map(|k| Jwk::signing(B64.encode(k.public), k.kid))
            .collect();
        Ok(Jwks { keys })
    }

    pub(super) fn active_signer(&self) -> Result<(String, EncodingKey), IdentityError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
