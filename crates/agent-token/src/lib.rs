//! Verification of agent tokens issued by identity-manager, for the services agents
//! call (inference-proxy, control plane, orchestrator).
//!
//! - keys come from the issuer's JWKS over HTTP and are cached; a token naming an
//!   unknown `kid` triggers one refresh (at most once per [`VerifierConfig::min_refresh`],
//!   so garbage tokens cannot make it hammer the issuer);
//! - only `EdDSA` is accepted, whatever the token's header claims;
//! - issuer, audience, `exp` and `nbf` are checked without leeway;
//! - the JWKS and the revocation feed come from the issuer URL itself: the HTTP client
//!   (`clawos_api::HttpClient`) never follows a redirect, so a 3xx is a fetch error;
//! - the revocation feed is polled at most every [`VerifierConfig::revocation_poll`].
//!
//! [`scopes`] defines the scopes ClawOS gives a meaning to (a VM's token budget).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use clawos_identity_manager_api::{IdentityClient, RevocationFeed, routes};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::RwLock;

pub mod scopes;

/// How many poll intervals a stale revocation feed may be used while the issuer is
/// unreachable.
pub const REVOCATION_GRACE_POLLS: u32 = 12;

/// The claims identity-manager puts in agent tokens.
pub use clawos_identity_manager_api::Claims;

/// Why a token was refused (every variant is a 401 for the caller).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted (EdDSA only)")]
    Algorithm(String),
    #[error("token names unknown signing key {0}")]
    UnknownKey(String),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token revoked")]
    Revoked,
    /// The issuer could not be reached and no cached key applies.
    #[error("cannot fetch {url}: {detail}")]
    Fetch { url: String, detail: String },
}

/// Where and how to verify.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Issuer base URL (`iss`); the JWKS and revocation feed are fetched from it.
    pub issuer: String,
    /// The audience this service accepts.
    pub audience: String,
    /// How long fetched keys are used before a refresh.
    pub jwks_ttl: Duration,
    /// Minimum time between refreshes caused by unknown `kid`s.
    pub min_refresh: Duration,
    /// How often the revocation feed is polled.
    pub revocation_poll: Duration,
}

impl VerifierConfig {
    /// Defaults for an issuer and audience: JWKS cached 10 min, refresh on unknown kid
    /// at most every 10 s, revocations polled every 5 s.
    pub fn new(issuer: &str, audience: &str) -> Self {
        Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            audience: audience.to_owned(),
            jwks_ttl: Duration::from_secs(600),
            min_refresh: Duration::from_secs(10),
            revocation_poll: Duration::from_secs(5),
        }
    }
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
}

#[derive(Default)]
struct Revocations {
    jtis: HashSet<String>,
    /// Tokens of these agents issued at or before the time are revoked.
    agents: HashMap<String, u64>,
    fetched: Option<Instant>,
}

/// A token verifier; share one per process.
pub struct Verifier {
    cfg: VerifierConfig,
    issuer: IdentityClient,
    keys: RwLock<Keys>,
    revocations: RwLock<Revocations>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(cfg: VerifierConfig) -> Self {
        let issuer = IdentityClient::new(&cfg.issuer).with_timeout(Duration::from_secs(5));
        Self {
            cfg,
            issuer,
            keys: RwLock::new(Keys::default()),
            revocations: RwLock::new(Revocations::default()),
        }
    }

    fn fetch_error(&self, route: clawos_api::Route, e: clawos_api::ClientError) -> VerifyError {
        VerifyError::Fetch {
            url: self.issuer.url(route, &[]),
            detail: e.to_string(),
        }
    }

    async fn refresh_keys(&self) -> Result<(), VerifyError> {
        let jwks = self
            .issuer
            .jwks()
            .await
            .map_err(|e| self.fetch_error(routes::JWKS, e))?;
        let mut by_kid = HashMap::new();
        for k in jwks.keys {
            if !k.is_ed25519() {
                continue;
            }
            if let (Some(kid), Some(x)) = (k.kid, k.x)
                && let Ok(key) = DecodingKey::from_ed_components(&x)
            {
                by_kid.insert(kid, key);
            }
        }
        let mut keys = self.keys.write().await;
        keys.by_kid = by_kid;
        keys.fetched = Some(Instant::now());
        tracing::debug!(keys = keys.by_kid.len(), "JWKS refreshed");
        Ok(())
    }

    async fn key_for(&self, kid: &str) -> Result<DecodingKey, VerifyError> {
        {
            let keys = self.keys.read().await;
            let fresh = keys
                .fetched
                .is_some_and(|t| t.elapsed() < self.cfg.jwks_ttl);
            if fresh && let Some(k) = keys.by_kid.get(kid) {
                return Ok(k.clone());
            }
            // An unknown kid refreshes at most every `min_refresh`.
            if fresh
                && keys
                    .fetched
                    .is_some_and(|t| t.elapsed() < self.cfg.min_refresh)
            {
                return Err(VerifyError::UnknownKey(kid.to_owned()));
            }
        }
        self.refresh_keys().await?;
        self.keys
            .read()
            .await
            .by_kid
            .get(kid)
            .cloned()
            .ok_or_else(|| VerifyError::UnknownKey(kid.to_owned()))
    }

    async fn refresh_revocations_if_due(&self) -> Result<(), VerifyError> {
        let due = self
            .revocations
            .read()
            .await
            .fetched
            .is_none_or(|t| t.elapsed() >= self.cfg.revocation_poll);
        if !due {
            return Ok(());
        }
        let fetched: Result<RevocationFeed, VerifyError> = self
            .issuer
            .revocations()
            .await
            .map_err(|e| self.fetch_error(routes::REVOCATIONS, e));
        let feed = match fetched {
            Ok(f) => f,
            Err(e) => {
                // A short outage of the issuer is bridged with the last feed; past
                // the grace period verification fails closed.
                let stale_ok = self.revocations.read().await.fetched.is_some_and(|t| {
                    t.elapsed() < self.cfg.revocation_poll * REVOCATION_GRACE_POLLS
                });
                if stale_ok {
                    tracing::warn!(error = %e, "revocation feed unreachable; using the last copy");
                    return Ok(());
                }
                return Err(e);
            }
        };
        let mut r = self.revocations.write().await;
        r.jtis = feed.tokens.into_iter().map(|t| t.jti).collect();
        r.agents = feed
            .agents
            .into_iter()
            .map(|a| (a.agent, a.issued_before))
            .collect();
        r.fetched = Some(Instant::now());
        Ok(())
    }

    /// Verifies a token; returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(VerifyError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header
            .kid
            .ok_or_else(|| VerifyError::Malformed("no kid".into()))?;
        let key = self.key_for(&kid).await?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = 0;
        // `jsonwebtoken` only checks that `nbf` is present unless told to compare it:
        // a token that is not valid yet is refused like an expired one.
        v.validate_nbf = true;
        v.set_issuer(&[self.cfg.issuer.as_str()]);
        v.set_audience(&[self.cfg.audience.as_str()]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &v)
            .map_err(|e| VerifyError::Invalid(e.to_string()))?
            .claims;
        // Fail closed: a feed that cannot be fetched for longer than the grace period
        // is an error, never "not revoked".
        self.refresh_revocations_if_due().await?;
        let r = self.revocations.read().await;
        if r.jtis.contains(&claims.jti)
            || r.agents
                .get(&claims.agent)
                .is_some_and(|&b| claims.iat <= b)
        {
            return Err(VerifyError::Revoked);
        }
        Ok(claims)
    }
}
