//! Operator login through an OpenID Connect provider (authorization code + PKCE, with
//! the `openidconnect` crate): `GET /api/v1/login/oidc` sends the browser to the
//! provider with a fresh `state`, `nonce` and PKCE challenge; the provider sends it
//! back to `GET /api/v1/login/oidc/callback`, where the code is exchanged (client
//! secret, PKCE verifier) and the ID token checked — signature against the provider's
//! published keys, issuer, audience, expiry, nonce — before the groups claim is mapped
//! to a role and a browser session opened.
//!
//! Each login's `state` is bound to the browser that started it (a `SameSite=Lax`
//! cookie, so another site cannot complete a login in someone else's browser) and is
//! good once and for ten minutes: a replayed callback is refused before any code is
//! exchanged. A user whose groups map to no role is refused (403), not given the
//! lowest role.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawos_control_plane_api::Role;
use clawos_service::error_chain as chain;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};

/// How long a started login may take to come back.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
/// How far the provider's clock may be behind ours when a CLI login's `auth_time` is
/// checked.
const AUTH_TIME_SKEW_SECS: i64 = 120;
/// The provider's metadata and keys are fetched again when older than this (and at
/// once when an ID token names a key not among them).
const METADATA_MAX_AGE: Duration = Duration::from_secs(3600);
/// Most logins in flight at once (oldest dropped past it).
const MAX_PENDING: usize = 1000;
/// The cookie that binds a login's `state` to the browser that started it.
pub const STATE_COOKIE: &str = "__Host-clawos_oidc";

/// What the operator configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcSettings {
    /// The provider's issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    /// Read from a file (0600) at start; never logged.
    pub client_secret_file: PathBuf,
    /// This control plane's callback, as registered with the provider:
    /// `https://<host>:8080/api/v1/login/oidc/callback`.
    pub redirect_url: String,
    /// The ID-token claim holding the user's groups.
    pub groups_claim: String,
    /// Group → role. A user gets the highest role among their groups.
    pub role_map: Vec<(String, Role)>,
    /// PEM roots for the provider's HTTPS (a private CA); public roots otherwise.
    pub ca_cert: Option<PathBuf>,
}

/// Why a login failed; the message is what the browser is shown (never a secret).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("OIDC provider discovery failed: {0}")]
    Discovery(String),
    #[error("the login could not be started: {0}")]
    Start(String),
    #[error("unknown, expired or already used login state: start the login again")]
    BadState,
    #[error("the identity provider refused: {0}")]
    Provider(String),
    #[error("the code exchange failed: {0}")]
    Exchange(String),
    #[error("the ID token was refused: {0}")]
    IdToken(String),
    #[error("no ClawOS role for {user}: none of the groups {groups:?} is mapped to a role")]
    NoRole { user: String, groups: Vec<String> },
}

impl OidcError {
    /// 403 for a user without a role, 502 when the provider cannot be used, else 401.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoRole { .. } => 403,
            Self::Discovery(_) | Self::Start(_) => 502,
            _ => 401,
        }
    }
}

struct Pending {
    nonce: Nonce,
    verifier: PkceCodeVerifier,
    created: Instant,
    cli: Option<crate::cli_login::CliHandoff>,
    client: std::net::IpAddr,
    /// Unix time (s) the login started: a CLI login's user must have entered their
    /// password at the provider since.
    started_unix: i64,
}

impl crate::limits::Waiting for Pending {
    fn client(&self) -> std::net::IpAddr {
        self.client
    }
    fn created(&self) -> Instant {
        self.created
    }
}

/// A user the provider vouched for, with the role their groups give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcUser {
    pub name: String,
    pub role: Role,
    /// Set when the login was a CLI's (`clawos login --browser`): where its one-time
    /// code goes.
    pub cli: Option<crate::cli_login::CliHandoff>,
}

/// A client made from discovery: authorization endpoint set, token and userinfo
/// endpoints as the provider published them.
type ProviderClient = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

/// The provider's metadata and keys as held: when fetched, and after a failed fetch
/// when to try again.
struct Held {
    metadata: CoreProviderMetadata,
    fetched: Instant,
    retry_at: Option<Instant>,
}

/// The relying party.
pub struct Oidc {
    settings: OidcSettings,
    secret: ClientSecret,
    http: reqwest::Client,
    /// The provider's discovery document and signing keys, and when they were fetched.
    metadata: tokio::sync::Mutex<Option<Held>>,
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.settings.issuer)
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

impl Oidc {
    /// Reads the client secret and builds the HTTPS client for the provider. Nothing
    /// is fetched yet: discovery happens at the first login, so the control plane
    /// starts even while the provider is down.
    pub fn new(settings: OidcSettings) -> Result<Self, String> {
        let secret = std::fs::read_to_string(&settings.client_secret_file)
            .map_err(|e| {
                format!(
                    "--oidc-client-secret-file {}: {e}",
                    settings.client_secret_file.display()
                )
            })?
            .trim()
            .to_owned();
        if secret.is_empty() {
            return Err(format!(
                "--oidc-client-secret-file {} is empty",
                settings.client_secret_file.display()
            ));
        }
        let tls = match &settings.ca_cert {
            Some(p) => {
                let pem =
                    std::fs::read(p).map_err(|e| format!("--oidc-ca-cert {}: {e}", p.display()))?;
                clawos_control_plane_api::ServerTrust::Ca(pem).rustls_config()?
            }
            None => {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth()
            }
        };
        // No redirects: a provider's endpoints answer directly, and following
        // redirects from the token endpoint would be an SSRF.
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .no_proxy()
            .build()
            .map_err(|e| format!("HTTPS client for the OIDC provider: {e}"))?;
        Ok(Self {
            settings,
            secret: ClientSecret::new(secret),
            http,
            metadata: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The provider's metadata (and keys): discovered at the first login, again when
    /// older than [`METADATA_MAX_AGE`], or at once when `refetch` (an ID token signed
    /// with a key not held: the provider rotated its keys). A provider that cannot be
    /// reached leaves the metadata held so far in use.
    async fn metadata(&self, refetch: bool) -> Result<CoreProviderMetadata, OidcError> {
        let mut held = self.metadata.lock().await;
        if let Some(h) = held.as_ref()
            && !refetch
            && (h.fetched.elapsed() < METADATA_MAX_AGE
                || h.retry_at.is_some_and(|r| Instant::now() < r))
        {
            return Ok(h.metadata.clone());
        }
        let issuer = IssuerUrl::new(self.settings.issuer.clone())
            .map_err(|e| OidcError::Discovery(format!("issuer URL: {e}")))?;
        match CoreProviderMetadata::discover_async(issuer, &self.http).await {
            Ok(m) => {
                if held.is_some() {
                    tracing::info!(issuer = %self.settings.issuer, "OIDC provider metadata and keys fetched again");
                }
                *held = Some(Held {
                    metadata: m.clone(),
                    fetched: Instant::now(),
                    retry_at: None,
                });
                Ok(m)
            }
            Err(e) => match held.as_mut() {
                Some(h) => {
                    tracing::warn!(error = %chain(&e), "OIDC discovery failed; keeping the provider keys held so far (next try in a minute)");
                    // Logins go on with the held keys for a minute instead of each
                    // waiting on the provider again.
                    h.retry_at = Some(Instant::now() + Duration::from_secs(60));
                    Ok(h.metadata.clone())
                }
                None => Err(OidcError::Discovery(chain(&e))),
            },
        }
    }

    /// The client for the discovered provider.
    async fn client(&self, refetch: bool) -> Result<ProviderClient, OidcError> {
        let metadata = self.metadata(refetch).await?;
        let redirect = RedirectUrl::new(self.settings.redirect_url.clone())
            .map_err(|e| OidcError::Start(format!("redirect URL: {e}")))?;
        Ok(CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.settings.client_id.clone()),
            Some(self.secret.clone()),
        )
        .set_redirect_uri(redirect))
    }

    /// Starts a login: the provider URL to send the browser to, and the `state` to
    /// bind to it (the [`STATE_COOKIE`]). `cli` is a CLI's login, handed off to it at
    /// the end; `peer` the browser's address (each client has a bounded share of the
    /// logins waiting).
    pub async fn start(
        &self,
        cli: Option<crate::cli_login::CliHandoff>,
        peer: std::net::IpAddr,
    ) -> Result<(String, String), OidcError> {
        let client = self.client(false).await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let authorize = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge);
        // A CLI's login asks the provider for the password again, never a silent
        // single sign-on: a link someone else started cannot log a CLI in unnoticed.
        let (url, state, nonce) = if cli.is_some() {
            authorize
                .add_prompt(openidconnect::core::CoreAuthPrompt::Login)
                .set_max_age(Duration::ZERO)
        } else {
            authorize
        }
        .url();
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| now.duration_since(p.created) < LOGIN_TTL);
        crate::limits::make_room(&mut pending, peer, MAX_PENDING);
        pending.insert(
            state.secret().clone(),
            Pending {
                nonce,
                verifier,
                created: now,
                cli,
                client: peer,
                started_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
            },
        );
        Ok((url.to_string(), state.secret().clone()))
    }

    /// Finishes a login: `state` from the callback must equal the browser's
    /// `cookie_state` and be a pending login (it is consumed either way).
    pub async fn finish(
        &self,
        code: &str,
        state: &str,
        cookie_state: Option<&str>,
    ) -> Result<OidcUser, OidcError> {
        if !cookie_state.is_some_and(|c| crate::sessions::same(c, state)) {
            return Err(OidcError::BadState);
        }
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(state)
            .filter(|p| p.created.elapsed() < LOGIN_TTL)
            .ok_or(OidcError::BadState)?;
        let client = self.client(false).await?;
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| OidcError::Exchange(e.to_string()))?
            .set_pkce_verifier(pending.verifier)
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Exchange(chain(&e)))?;
        let id_token = token
            .id_token()
            .ok_or_else(|| OidcError::IdToken("the provider sent no ID token".into()))?;
        let claims = match id_token.claims(&client.id_token_verifier(), &pending.nonce) {
            Ok(c) => c.clone(),
            Err(e) if !self.holds_key_of(&id_token.to_string()).await => {
                // Signed with a key not held: the provider rotated its keys since
                // discovery. They are fetched again and the token checked once more;
                // the token came from the provider itself (the code exchange), so no
                // one else can make this happen.
                tracing::info!(error = %chain(&e), "ID token signed with a key not held; fetching the provider's keys again");
                let fresh = self.client(true).await?;
                id_token
                    .claims(&fresh.id_token_verifier(), &pending.nonce)
                    .map_err(|e| OidcError::IdToken(chain(&e)))?
                    .clone()
            }
            Err(e) => return Err(OidcError::IdToken(chain(&e))),
        };
        // The signature, issuer, audience, expiry and nonce are checked above; the
        // groups claim (its name is configured) is read from the same, verified token.
        let payload = verified_payload(&id_token.to_string())?;
        let groups: Vec<String> = match payload.get(&self.settings.groups_claim) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(g)) => vec![g.clone()],
            _ => Vec::new(),
        };
        let name = claims
            .preferred_username()
            .map(|u| u.as_str().to_owned())
            .unwrap_or_else(|| claims.subject().as_str().to_owned());
        // A CLI login is honoured only if the provider says the user authenticated
        // after it started (prompt=login and max_age=0 ask for that; a provider that
        // ignored them and answered from single sign-on is refused here).
        if pending.cli.is_some() {
            let at = claims.auth_time().map(|t| t.timestamp());
            if at.is_none_or(|at| at < pending.started_unix - AUTH_TIME_SKEW_SECS) {
                return Err(OidcError::IdToken(format!(
                    "a CLI login needs the user to sign in again at the provider, but its auth_time ({}) is before the login started: the provider answered from an existing session",
                    at.map_or_else(|| "absent".to_owned(), |t| t.to_string())
                )));
            }
        }
        let role =
            crate::roles::role_for(&groups, &self.settings.role_map).ok_or(OidcError::NoRole {
                user: name.clone(),
                groups: groups.clone(),
            })?;
        Ok(OidcUser {
            name,
            role,
            cli: pending.cli,
        })
    }
}

impl Oidc {
    /// Whether the key the compact JWS `jwt` names (`kid`) is among the provider keys
    /// held (a token without a `kid` counts as held: nothing to look up).
    async fn holds_key_of(&self, jwt: &str) -> bool {
        use base64::Engine as _;
        let kid = jwt
            .split('.')
            .next()
            .and_then(|h| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(h.trim_end_matches('='))
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|h| h.get("kid").and_then(|k| k.as_str()).map(str::to_owned));
        let Some(kid) = kid else {
            return true;
        };
        let held = self.metadata.lock().await;
        held.as_ref().is_some_and(|h| {
            h.metadata
                .jwks()
                .keys()
                .iter()
                .any(|k| openidconnect::JsonWebKey::key_id(k).is_some_and(|id| id.as_str() == kid))
        })
    }
}

/// The JSON payload of a compact JWS whose signature was already verified.
fn verified_payload(jwt: &str) -> Result<serde_json::Map<String, serde_json::Value>, OidcError> {
    use base64::Engine as _;
    let part = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| OidcError::IdToken("not a compact JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| OidcError::IdToken(format!("payload: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| OidcError::IdToken(format!("payload: {e}")))
}
