//! identity-manager's REST API: its routes ([`routes`]), its wire types and
//! [`IdentityClient`], one definition used by the daemon, by the verifiers
//! (`clawos-agent-token`), by the CLI and by the tests.
//!
//! | route | auth | body → answer |
//! |---|---|---|
//! | [`routes::ISSUE`] | service | [`IssueRequest`] → 201 [`Issued`] |
//! | [`routes::RENEW`] | the agent's current token | → [`Issued`] with the same claims and lineage (refused once the lineage is older than the issuer's maximum) |
//! | [`routes::REVOKE`] | service | [`RevokeRequest`] → 204 |
//! | [`routes::INTROSPECT`] | service | [`IntrospectRequest`] (form or JSON) → [`Introspection`] (RFC 7662) |
//! | [`routes::REVOCATIONS`] | – | → [`RevocationFeed`], polled by verifiers |
//! | [`routes::AGENT_KEY`] | service | → [`AgentKey`] |
//! | [`routes::ROTATE_KEYS`] | service | → [`RotatedKeys`] |
//! | [`routes::JWKS`] | – | → [`Jwks`] |
//! | [`routes::DISCOVERY`] | – | → [`OpenIdConfiguration`] |
//! | [`routes::HEALTHZ`], [`routes::METRICS`] | – | liveness; Prometheus text |
//!
//! Errors are `clawos_api::ErrorBody`; the service credential is
//! `<state>/identity/service.token` (0600).

use std::time::Duration;

use clawos_api::{ClientError, HttpClient, Route};
use serde::{Deserialize, Serialize};

/// Default address of the service.
pub const DEFAULT_URL: &str = "http://127.0.0.1:2082";

/// The route table, mounted by the daemon and called by [`IdentityClient`].
pub mod routes {
    use clawos_api::Route;

    pub const ISSUE: Route = Route::post("/v1/tokens");
    pub const RENEW: Route = Route::post("/v1/tokens/renew");
    pub const REVOKE: Route = Route::post("/v1/revoke");
    pub const INTROSPECT: Route = Route::post("/v1/introspect");
    pub const REVOCATIONS: Route = Route::get("/v1/revocations");
    /// `{agent}`: the agent's name.
    pub const AGENT_KEY: Route = Route::get("/v1/agents/{agent}/key");
    pub const ROTATE_KEYS: Route = Route::post("/v1/keys/rotate");
    pub const JWKS: Route = Route::get("/.well-known/jwks.json");
    pub const DISCOVERY: Route = Route::get("/.well-known/openid-configuration");
    pub const HEALTHZ: Route = Route::get("/healthz");
    pub const METRICS: Route = Route::get("/metrics");
}

/// The claims identity-manager puts in agent tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// `spiffe://<trust-domain>/agent/<name>`.
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub agent: String,
    pub vm_id: String,
    /// Verity root hash of the agent's image (64 hex characters), or empty.
    pub image_root_hash: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// When the token's lineage started (OIDC `auth_time`): the issue time of the
    /// token the service issued, carried unchanged through every renewal. A lineage
    /// older than the issuer's maximum cannot be renewed, and no renewed token
    /// outlives it. Absent in tokens from before lineages were recorded (their `iat`
    /// stands in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<u64>,
}

impl Claims {
    /// When this token's lineage started: `auth_time`, or `iat` for a token that has
    /// none.
    pub fn lineage_start(&self) -> u64 {
        self.auth_time.unwrap_or(self.iat)
    }
}

/// What the launcher or control plane asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssueRequest {
    /// `[a-z0-9-]`, 1–63 characters, no leading or trailing `-`.
    pub agent: String,
    pub vm_id: String,
    #[serde(default)]
    pub image_root_hash: String,
    pub audience: String,
    /// Lifetime; 15 minutes when absent, at most an hour.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// An issued token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Issued {
    /// The JWT.
    pub token: String,
    pub jti: String,
    /// The signing key's id (RFC 7638 thumbprint).
    pub kid: String,
    /// Unix time (s) the token expires.
    pub expires_at: u64,
}

/// Revokes one token or every token of an agent issued so far: exactly one is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl RevokeRequest {
    /// Revokes the token with this `jti`.
    pub fn jti(jti: &str) -> Self {
        Self {
            jti: Some(jti.to_owned()),
            agent: None,
        }
    }
    /// Revokes every token of `agent` issued up to now.
    pub fn agent(agent: &str) -> Self {
        Self {
            jti: None,
            agent: Some(agent.to_owned()),
        }
    }
}

/// RFC 7662 introspection request (sent as JSON; the service also takes a form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IntrospectRequest {
    pub token: String,
}

/// RFC 7662 introspection answer: `{"active": false}` and nothing else for a token that
/// does not verify; the claims for one that does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Introspection {
    pub active: bool,
    /// `Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The scopes, space-separated (RFC 7662 `scope`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_root_hash: Option<String>,
    /// When the token's lineage started (see [`Claims::auth_time`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<u64>,
}

impl Introspection {
    /// The answer for a token that does not verify (RFC 7662 says nothing more).
    pub fn inactive() -> Self {
        Self::default()
    }

    /// The answer for a valid token.
    pub fn active(c: &Claims) -> Self {
        Self {
            active: true,
            token_type: Some("Bearer".into()),
            iss: Some(c.iss.clone()),
            sub: Some(c.sub.clone()),
            aud: Some(c.aud.clone()),
            iat: Some(c.iat),
            nbf: Some(c.nbf),
            exp: Some(c.exp),
            jti: Some(c.jti.clone()),
            scope: Some(c.scopes.join(" ")),
            agent: Some(c.agent.clone()),
            vm_id: Some(c.vm_id.clone()),
            image_root_hash: Some(c.image_root_hash.clone()),
            auth_time: Some(c.lineage_start()),
        }
    }
}

/// One JSON Web Key (RFC 7517). Every member but `kty` is optional, so a set holding
/// keys of other types still parses; ClawOS keys are `OKP`/`Ed25519`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// The public key, base64url without padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

impl Jwk {
    /// An Ed25519 public key (`x` base64url without padding).
    pub fn ed25519(x: String) -> Self {
        Self {
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: Some(x),
            kid: None,
            alg: None,
            use_: None,
        }
    }

    /// A token signing key as the JWKS publishes it.
    pub fn signing(x: String, kid: String) -> Self {
        Self {
            kid: Some(kid),
            alg: Some("EdDSA".into()),
            use_: Some("sig".into()),
            ..Self::ed25519(x)
        }
    }

    /// Whether this is an Ed25519 key.
    pub fn is_ed25519(&self) -> bool {
        self.kty == "OKP" && self.crv.as_deref() == Some("Ed25519")
    }
}

/// The published signing keys: next, active, and retired ones still within their
/// window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// An agent's own public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentKey {
    pub agent: String,
    pub jwk: Jwk,
}

/// The answer to a signing key rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotatedKeys {
    /// The key that signs from now on.
    pub active_kid: String,
}

/// The revocation feed verifiers poll.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationFeed {
    /// Unix time (s) of the answer.
    pub generated_at: u64,
    /// Tokens revoked one by one (kept until they would have expired).
    pub tokens: Vec<RevokedToken>,
    /// Agents whose tokens issued up to a time are revoked.
    pub agents: Vec<RevokedAgent>,
}

/// One revoked token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedToken {
    pub jti: String,
    /// Unix time (s) after which the entry no longer matters.
    pub exp: u64,
}

/// Every token of `agent` with `iat <= issued_before` is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedAgent {
    pub agent: String,
    pub issued_before: u64,
}

/// The OpenID discovery document (only what a verifier of agent tokens needs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenIdConfiguration {
    pub issuer: String,
    pub jwks_uri: String,
    pub introspection_endpoint: String,
    pub revocation_endpoint: String,
    pub id_token_signing_alg_values_supported: Vec<String>,
    pub token_endpoint_auth_methods_supported: Vec<String>,
    pub subject_types_supported: Vec<String>,
    pub response_types_supported: Vec<String>,
    pub claims_supported: Vec<String>,
}

/// A typed client of identity-manager.
#[derive(Debug, Clone)]
pub struct IdentityClient {
    http: HttpClient,
    timeout: Option<Duration>,
}

impl IdentityClient {
    /// A client without credential (JWKS, revocation feed, discovery, renewal).
    pub fn new(base: &str) -> Self {
        Self {
            http: HttpClient::new("identity-manager", base),
            timeout: None,
        }
    }

    /// A client presenting the service credential (issue, revoke, introspect, keys).
    pub fn with_service_token(base: &str, token: &str) -> Self {
        Self {
            http: HttpClient::new("identity-manager", base).with_token(token),
            timeout: None,
        }
    }

    /// A client of identity-manager's routes wherever they are served: the daemon, or
    /// a control plane (`https://host:8080/api`, which fronts issue, revoke and
    /// introspect) through `http`, a client that trusts that server; `token` is the
    /// credential that server takes.
    pub fn with_http(
        service: &'static str,
        base: &str,
        http: reqwest::Client,
        token: &str,
    ) -> Self {
        Self {
            http: HttpClient::with_http(service, base, http).with_token(token),
            timeout: None,
        }
    }

    /// Gives up on any request after `timeout` (verifiers must not hang on the issuer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        self.http.base()
    }

    /// The full URL of a route (for messages).
    pub fn url(&self, route: Route, args: &[&str]) -> String {
        self.http.url(route, args)
    }

    fn request(&self, route: Route, args: &[&str]) -> reqwest::RequestBuilder {
        let req = self.http.request(route, args);
        match self.timeout {
            Some(t) => req.timeout(t),
            None => req,
        }
    }

    /// Issues a token.
    pub async fn issue(&self, req: &IssueRequest) -> Result<Issued, ClientError> {
        self.http
            .json(self.request(routes::ISSUE, &[]).json(req))
            .await
    }

    /// A fresh token with the same claims, for the holder of a valid `token` (the
    /// agent's own credential, not the service's).
    pub async fn renew(&self, token: &str) -> Result<Issued, ClientError> {
        let agent = Self {
            http: self.http.clone().with_token(token),
            timeout: self.timeout,
        };
        agent.http.json(agent.request(routes::RENEW, &[])).await
    }

    /// Revokes one token or every token of an agent.
    pub async fn revoke(&self, req: &RevokeRequest) -> Result<(), ClientError> {
        self.http
            .send(self.request(routes::REVOKE, &[]).json(req))
            .await
            .map(drop)
    }

    /// Whether `token` verifies (signature, expiry, revocation), and its claims.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, ClientError> {
        let body = IntrospectRequest {
            token: token.to_owned(),
        };
        self.http
            .json(self.request(routes::INTROSPECT, &[]).json(&body))
            .await
    }

    /// The revocation feed.
    pub async fn revocations(&self) -> Result<RevocationFeed, ClientError> {
        self.http.json(self.request(routes::REVOCATIONS, &[])).await
    }

    /// An agent's public key.
    pub async fn agent_key(&self, agent: &str) -> Result<AgentKey, ClientError> {
        self.http
            .json(self.request(routes::AGENT_KEY, &[agent]))
            .await
    }

    /// Rotates the signing keys (next → active → retired); returns the new active kid.
    pub async fn rotate_keys(&self) -> Result<RotatedKeys, ClientError> {
        self.http.json(self.request(routes::ROTATE_KEYS, &[])).await
    }

    /// The published signing keys.
    pub async fn jwks(&self) -> Result<Jwks, ClientError> {
        self.http.json(self.request(routes::JWKS, &[])).await
    }

    /// The OpenID discovery document.
    pub async fn discovery(&self) -> Result<OpenIdConfiguration, ClientError> {
        self.http.json(self.request(routes::DISCOVERY, &[])).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let bytes = self.http.bytes(self.request(routes::METRICS, &[])).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
