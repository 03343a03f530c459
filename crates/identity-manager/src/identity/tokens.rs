//! Tokens: issue, verify, renew, revoke, and the revocation feed verifiers poll.

use clawos_identity_manager_api::{RevocationFeed, RevokedAgent, RevokedToken};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use rusqlite::{OptionalExtension, params};

use super::{
    Claims, DEFAULT_TTL_SECS, Identity, IssueRequest, Issued, MAX_TTL_SECS, db_err, now, random_id,
};
use crate::IdentityError;

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

pub(super) fn validate_field(what: &str, v: &str, max: usize) -> Result<(), IdentityError> {
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(IdentityError::Invalid(format!(
            "invalid {what}: 1-{max} printable characters"
        )));
    }
    Ok(())
}

impl Identity {
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
            // A token the service issues starts a lineage.
            auth_time: Some(t),
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
        v.validate_nbf = true;
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

    /// A new token with the same claims, lifetime and lineage, for an agent holding a
    /// valid one. Renewals chain only until the lineage (the issue time of the token
    /// the service issued, `auth_time`) is [`IssuerConfig::max_lineage_secs`] old, and
    /// a renewed token expires with its lineage at the latest: an agent cannot keep a
    /// credential alive forever by renewing it.
    ///
    /// [`IssuerConfig::max_lineage_secs`]: super::IssuerConfig::max_lineage_secs
    pub fn renew(&self, token: &str) -> Result<Issued, IdentityError> {
        let old = self.verify(token, None)?;
        let ttl = old.exp.saturating_sub(old.iat).clamp(1, MAX_TTL_SECS);
        let t = now();
        let start = old.lineage_start();
        let max = self.config.max_lineage_secs;
        let end = start.saturating_add(max);
        if t >= end {
            return Err(IdentityError::Unauthorized(format!(
                "token lineage too old to renew: it started at {start} (unix time), {}s ago, and the maximum lineage age is {max}s; a new token must be issued",
                t.saturating_sub(start)
            )));
        }
        let claims = Claims {
            iat: t,
            nbf: t,
            exp: (t + ttl).min(end),
            jti: random_id()?,
            auth_time: Some(start),
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
    pub fn revocations(&self) -> Result<RevocationFeed, IdentityError> {
        let db = self.db();
        let t = now();
        db.execute("DELETE FROM revoked_tokens WHERE exp < ?1", [t])
            .map_err(db_err)?;
        let mut st = db
            .prepare("SELECT jti, exp FROM revoked_tokens")
            .map_err(db_err)?;
        let tokens = st
            .query_map([], |r| {
                Ok(RevokedToken {
                    jti: r.get(0)?,
                    exp: r.get(1)?,
                })
            })
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        let mut st = db
            .prepare("SELECT agent, before FROM revoked_agents")
            .map_err(db_err)?;
        let agents = st
            .query_map([], |r| {
                Ok(RevokedAgent {
                    agent: r.get(0)?,
                    issued_before: r.get(1)?,
                })
            })
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        Ok(RevocationFeed {
            generated_at: t,
            tokens,
            agents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{identity, identity_with, req};
    use super::super::{IssuerConfig, now};
    use super::*;

    /// A token signed with the service's own active key whose `nbf` lies ahead is not
    /// valid yet: introspection and renewal refuse it (no leeway, as for `exp`).
    #[test]
    fn a_token_whose_nbf_is_in_the_future_does_not_verify() {
        let d = tempfile::tempdir().expect("tmp");
        let id = identity(d.path());
        let issued = id.issue(&req("agent-1")).expect("issue");
        let c = id.verify(&issued.token, None).expect("valid");
        for ahead in [2, 3600] {
            let early = id
                .sign(&Claims {
                    nbf: c.iat + ahead,
                    exp: c.iat + 7200,
                    jti: format!("early-{ahead}"),
                    ..c.clone()
                })
                .expect("sign");
            match id.verify(&early.token, None) {
                Err(IdentityError::Unauthorized(m)) => assert!(m.contains("Immature"), "{m}"),
                other => panic!("nbf +{ahead}s verified: {other:?}"),
            }
            assert!(
                id.renew(&early.token).is_err(),
                "renewed a token not valid yet"
            );
        }
    }

    /// Renewals chain only while the lineage (the first token's issue time, carried as
    /// `auth_time`) is younger than the maximum; no renewed token outlives it; past it
    /// even a still-valid token is not renewed, and the error says why.
    #[test]
    fn renewal_chains_end_when_their_lineage_reaches_the_maximum_age() {
        let d = tempfile::tempdir().expect("tmp");
        let max = 3;
        let id = identity_with(
            d.path(),
            IssuerConfig {
                max_lineage_secs: max,
                ..IssuerConfig::new("http://127.0.0.1:2082", "test.local")
            },
        );
        let first = id
            .issue(&IssueRequest {
                ttl_secs: Some(600),
                ..req("agent-1")
            })
            .expect("issue");
        let c0 = id.verify(&first.token, None).expect("valid");
        let start = c0.auth_time.expect("an issued token starts a lineage");
        assert_eq!(start, c0.iat);
        let end = start + max;
        // Renew the newest token of the chain every 200 ms while the lineage is young.
        let mut current = first.token.clone();
        let mut renewals = 0;
        while now() + 1 < end {
            let r = id.renew(&current).expect("renewal within the lineage");
            let c = id.verify(&r.token, None).expect("renewed token verifies");
            assert_eq!(c.auth_time, Some(start), "the lineage start is carried");
            assert!(c.exp <= end, "a renewed token outlives its lineage: {c:?}");
            current = r.token;
            renewals += 1;
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(renewals >= 3, "only {renewals} renewals");
        while now() < end {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // The first token is still valid for minutes, but its lineage is over.
        id.verify(&first.token, None)
            .expect("the first token itself is still valid");
        match id.renew(&first.token) {
            Err(IdentityError::Unauthorized(m)) => {
                assert!(m.contains("lineage") && m.contains("maximum"), "{m}")
            }
            other => panic!("renewed past the lineage's maximum age: {other:?}"),
        }
        assert!(
            id.renew(&current).is_err(),
            "the newest token of the chain renewed past the lineage's maximum age"
        );
        // A token the service issues afresh starts a new lineage.
        let fresh = id.issue(&req("agent-1")).expect("issue");
        id.renew(&fresh.token).expect("a new lineage renews");
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
        let kids: Vec<String> = id
            .jwks()
            .expect("jwks")
            .keys
            .into_iter()
            .map(|k| k.kid.unwrap_or_default())
            .collect();
        assert!(
            kids.contains(&before.kid) && kids.contains(&new_kid) && kids.len() == 3,
            "{kids:?}"
        );

        id.revoke_agent("agent-2").expect("revoke agent");
        assert!(id.verify(&after.token, None).is_err());
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
