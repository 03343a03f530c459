//! control-plane's public REST API, defined once: routes ([`routes`]), roles ([`Role`]),
//! wire types and [`ControlPlaneClient`], used by the daemon, the CLI and the tests.
//!
//! Everything is under `/api/v1`, over HTTPS. The routes that front an internal daemon
//! are that daemon's own route table mounted under [`PREFIX`] (`/api` + `/v1/vms…`),
//! with the same wire types: vm-launcher's VMs and images, the orchestrator's
//! workflow runs, inference-proxy's usage, identity-manager's agent tokens. So each
//! daemon's typed client, given `https://host:8080/api` and this server's trust
//! ([`ControlPlaneClient::vms`], [`ControlPlaneClient::workflows`], …), drives a
//! remote host exactly as it drives the local daemon.
//!
//! | route | role | body → answer |
//! |---|---|---|
//! | [`routes::WHOAMI`] `GET /api/v1/whoami` | viewer | → [`WhoAmI`] |
//! | [`routes::CREATE_TOKEN`] `POST /api/v1/operators/tokens` | admin | [`CreateToken`] → 201 [`CreatedToken`] (the secret is shown once) |
//! | [`routes::LIST_TOKENS`] `GET /api/v1/operators/tokens` | admin | → `[TokenInfo]` |
//! | [`routes::REVOKE_TOKEN`] `DELETE /api/v1/operators/tokens/{id}` | admin | → 204 |
//! | [`routes::END_ACCESS`] `DELETE /api/v1/operators/sessions?operator=NAME` | admin | → [`EndedAccess`]: sessions ended, CLI-login tokens revoked |
//! | `GET /api/v1/vms`, `GET /api/v1/vms/{name}`, `…/console`, `…/snapshots` | viewer | as vm-launcher |
//! | `POST /api/v1/vms`, `…/stop`, `…/pause`, `…/resume`, `DELETE …` , snapshots, restore | operator | as vm-launcher |
//! | [`routes::LOGIN`] `POST /api/v1/sessions` | none | [`Login`] (an API token) → 201 [`SessionInfo`] + the session cookie |
//! | [`routes::LOGIN_OIDC`] `GET /api/v1/login/oidc` | none | → 303 to the OpenID provider (authorization code + PKCE) |
//! | [`routes::OIDC_CALLBACK`] `GET /api/v1/login/oidc/callback` | none | the provider's answer → 303 to `/` with the session cookie (or, for a CLI login, to the CLI's loopback port with a one-time code) |
//! | [`routes::CLI_TOKEN`] `POST /api/v1/login/cli/token` | none | [`CliToken`] → 201 [`CreatedToken`] (a CLI browser login's API token) |
//! | [`routes::LOGIN_SAML`] `GET /api/v1/login/saml` | none | → 303 to the SAML IdP (AuthnRequest, HTTP-Redirect) |
//! | [`routes::SAML_ACS`] `POST /api/v1/login/saml/acs` | none | the IdP's signed Response (HTTP-POST form) → 303 to `/` with the session cookie |
//! | [`routes::SAML_METADATA`] `GET /api/v1/saml/metadata` | none | this SP's metadata |
//! | [`routes::SESSION`] `GET /api/v1/sessions/current` | viewer | → [`SessionInfo`] |
//! | [`routes::LOGOUT`] `DELETE /api/v1/sessions/current` | viewer | → 204, cookie cleared |
//! | [`routes::CONSOLE`] `GET /`, `/console/app.js`, `/console/style.css` | none | the web console |
//! | [`routes::AUDIT_EVENTS`] `GET /api/v1/audit/events?after=&limit=&agent=` | viewer | → monitor-daemon's audit events |
//! | [`routes::OPERATOR_AUDIT`] `GET /api/v1/operators/audit?limit=` | admin | → the newest operator audit records |
//! | `GET /api/v1/usage?since_ms=&agent=` | viewer | inference-proxy's usage report ([`ControlPlaneClient::usage`]) |
//! | `GET /api/v1/runs[/{run}[/events\|/artifacts]]`, `GET /api/v1/artifacts/{sha256}` | viewer | the orchestrator's runs ([`ControlPlaneClient::workflows`]) |
//! | `POST /api/v1/runs`, `…/steps/{step}/approval`, `…/cancel` | operator | submit, approve or reject a step, cancel |
//! | `POST /api/v1/tokens`, `POST /api/v1/revoke` | admin | identity-manager: issue, revoke agent tokens ([`ControlPlaneClient::agent_tokens`]) |
//! | `POST /api/v1/introspect` | operator | whether an agent token verifies |
//! | `POST /api/v1/keys/rotate` | admin | rotate identity-manager's token signing keys |
//! | `GET /api/v1/images` | viewer | the images VMs may boot, each verified now |
//! | `POST /api/v1/images/{name}/verify` | operator | verify one as a boot would |
//! | `PUT`/`GET /api/v1/vms/{name}/files?path=` | operator | copy a file in or out of a VM's workspace (streamed) |
//! | [`routes::OPENAPI`] `GET /api/v1/openapi.json` | none | the OpenAPI 3.1 document of all of this |
//! | [`routes::HEALTHZ`] `GET /healthz` | none | liveness |
//!
//! Every other request needs `Authorization: Bearer <operator token>`, or the session
//! cookie of a browser login plus, on every method but `GET`, the session's CSRF token
//! in `x-csrf-token`: 401 without a valid credential, 403 when its role is below the
//! route's (or the CSRF token is missing or wrong). Every request, refused or
//! not, leaves one record in the operator audit trail (`<state>/control-plane/audit.jsonl`).
//! Errors are `clawos_api::ErrorBody`.

pub mod trust;

use clawos_api::HttpClient;
pub use clawos_api::{ClientError, ErrorBody};
use serde::{Deserialize, Serialize};
pub use trust::ServerTrust;

/// Default listen address: every interface, the one ClawOS listener meant for other
/// machines.
pub const DEFAULT_ADDR: &str = "0.0.0.0:8080";

/// Where vm-launcher's route table is mounted: `/api` + `/v1/vms…`.
pub const PREFIX: &str = "/api";

/// Environment variable naming the bootstrap admin credential file.
pub const TOKEN_PATH_ENV: &str = "CLAWOS_CONTROL_PLANE_TOKEN_PATH";

/// The daemon's directory under a state directory.
pub fn dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("control-plane")
}

/// The bootstrap admin credential (0600), made at the daemon's first start: the first
/// operator token, from which the others are created.
pub fn token_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    dir(state_dir).join("admin.token")
}

/// The local admin's credential: the file `$CLAWOS_CONTROL_PLANE_TOKEN_PATH` names, else
/// [`token_path`] of `state_dir`.
pub fn local_token(state_dir: &std::path::Path) -> Result<String, String> {
    clawos_api::local_token(TOKEN_PATH_ENV, &token_path(state_dir))
}

/// The certificate a self-signed control plane serves (PEM), for local clients to trust.
pub fn self_signed_cert_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    dir(state_dir).join("tls/self-signed.crt")
}

/// The control plane's own routes; the VM routes are vm-launcher's under [`PREFIX`].
pub mod routes {
    use clawos_api::Route;

    pub const WHOAMI: Route = Route::get("/api/v1/whoami");
    pub const CREATE_TOKEN: Route = Route::post("/api/v1/operators/tokens");
    pub const LIST_TOKENS: Route = Route::get("/api/v1/operators/tokens");
    pub const REVOKE_TOKEN: Route = Route::delete("/api/v1/operators/tokens/{id}");
    /// Ends an operator's access: their browser sessions, and the tokens their CLI
    /// browser logins made (`?operator=NAME`).
    pub const END_ACCESS: Route = Route::delete("/api/v1/operators/sessions");
    pub const OPENAPI: Route = Route::get("/api/v1/openapi.json");
    /// The syscall audit trail (monitor-daemon).
    pub const AUDIT_EVENTS: Route = Route::get("/api/v1/audit/events");
    /// The operator audit trail's newest records.
    pub const OPERATOR_AUDIT: Route = Route::get("/api/v1/operators/audit");
    /// Browser login through the OpenID provider: redirects there.
    pub const LOGIN_OIDC: Route = Route::get("/api/v1/login/oidc");
    /// Where the provider sends the browser back.
    pub const OIDC_CALLBACK: Route = Route::get("/api/v1/login/oidc/callback");
    /// The CLI's browser login ends here: its one-time code for an API token.
    pub const CLI_TOKEN: Route = Route::post("/api/v1/login/cli/token");
    /// Browser login through the SAML identity provider: redirects there.
    pub const LOGIN_SAML: Route = Route::get("/api/v1/login/saml");
    /// The assertion consumer service the IdP posts its Response to.
    pub const SAML_ACS: Route = Route::post("/api/v1/login/saml/acs");
    /// This service provider's SAML metadata.
    pub const SAML_METADATA: Route = Route::get("/api/v1/saml/metadata");
    /// Browser login with an API token: sets the session cookie.
    pub const LOGIN: Route = Route::post("/api/v1/sessions");
    pub const SESSION: Route = Route::get("/api/v1/sessions/current");
    pub const LOGOUT: Route = Route::delete("/api/v1/sessions/current");
    /// The web console (HTML), and its script and style sheet.
    pub const CONSOLE: Route = Route::get("/");
    pub const CONSOLE_SCRIPT: Route = Route::get("/console/app.js");
    pub const CONSOLE_STYLE: Route = Route::get("/console/style.css");
    pub const HEALTHZ: Route = Route::get("/healthz");
}

/// What an operator may do. Each role includes the ones below it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads: VMs, consoles, usage, audit events, workflow runs.
    Viewer,
    /// Also starts, stops and execs in VMs, and drives workflows.
    Operator,
    /// Also images, keys and operators.
    Admin,
}

impl Role {
    /// The name used on the wire and in the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?}: one of viewer, operator, admin"
            )),
        }
    }
}

/// Longest [`CreateToken::ttl_secs`]: one year.
pub const MAX_TOKEN_TTL_SECS: u64 = 366 * 24 * 3600;

/// `POST /api/v1/operators/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who or what holds the token (a person, a CI job): a label, `[a-z0-9-]`, 1–63
    /// characters. Recorded as the operator in the audit trail.
    pub name: String,
    pub role: Role,
    /// Lifetime in seconds, 60 to [`MAX_TOKEN_TTL_SECS`].
    pub ttl_secs: u64,
}

/// An operator token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Public id (the start of the secret's hash); revoke by it.
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Unix time (s).
    pub created_at: u64,
    /// Unix time (s) after which it is refused.
    pub expires_at: u64,
    /// Unix time (s) it was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// The operator who created it.
    pub created_by: String,
}

/// The answer to a token creation: the secret, shown this once, and its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// `Authorization: Bearer <token>`. Not stored: only its hash is.
    pub token: String,
    pub info: TokenInfo,
}

/// Who the caller is, as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoAmI {
    pub operator: String,
    pub role: Role,
    /// How the caller authenticated: `token` (a bearer API token) or `session` (a
    /// browser session's cookie).
    pub via: String,
}

/// `POST /api/v1/sessions`: a browser login with an operator API token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub token: String,
}

/// The query of [`routes::LOGIN_OIDC`] when the CLI logs in through the browser
/// (`clawos login --browser`): after the provider's login the browser is sent to
/// `http://127.0.0.1:{cli_port}/callback?code=…&state={cli_state}` — only ever this
/// machine's loopback — and the CLI trades the code, with the verifier whose SHA-256
/// is `cli_challenge`, for an API token ([`routes::CLI_TOKEN`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliLoginStart {
    /// The CLI's loopback port.
    pub cli_port: u16,
    /// Echoed back to the CLI: 16–128 characters of `A-Z a-z 0-9 - _`.
    pub cli_state: String,
    /// `BASE64URL(SHA-256(verifier))`, unpadded: 43 characters (RFC 7636 `S256`).
    pub cli_challenge: String,
    /// Only check that such a login could start: 204, no login started.
    #[serde(default)]
    pub cli_check: bool,
}

/// `POST /api/v1/login/cli/token`: the one-time code and the verifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CliToken {
    pub code: String,
    /// The secret whose SHA-256 the login started with (43–128 characters).
    pub verifier: String,
}

/// Lifetime of an API token a CLI browser login makes: twelve hours, like a browser
/// session's.
pub const CLI_TOKEN_TTL_SECS: u64 = 12 * 3600;

/// A browser session: who, and the CSRF token to echo in `x-csrf-token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub operator: String,
    pub role: Role,
    /// How the session was opened: `token`.
    pub via: String,
    pub csrf_token: String,
    /// Seconds without a request after which the session ends.
    pub idle_timeout_secs: u64,
}

/// `?operator=` of [`routes::END_ACCESS`]: an operator's name as the audit trail
/// shows it (an identity-provider user's, or a token's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorQuery {
    pub operator: String,
}

/// What [`routes::END_ACCESS`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EndedAccess {
    /// The provider user whose access ended (a CLI token's name resolved to them).
    pub operator: String,
    /// Browser sessions ended (their streams close within seconds).
    pub sessions_ended: usize,
    /// Ids of the API tokens the operator's CLI browser logins had made, now revoked.
    pub tokens_revoked: Vec<String>,
}

/// `?limit=` of [`routes::OPERATOR_AUDIT`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// How many of the newest records (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `?after=&limit=&agent=` of [`routes::AUDIT_EVENTS`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this sequence number.
    #[serde(default)]
    pub after: u64,
    /// At most this many (default 200, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only this agent's.
    #[serde(default)]
    pub agent: Option<String>,
}

/// Typed client of the control plane's own routes; [`ControlPlaneClient::vms`] is a
/// client of its VM routes.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    http: HttpClient,
    raw: reqwest::Client,
    tls: std::sync::Arc<rustls::ClientConfig>,
    server: String,
    token: String,
}

impl ControlPlaneClient {
    /// A client of the control plane at `server` (`https://host:8080`) that trusts
    /// `trust` and sends `token`.
    pub fn connect(server: &str, trust: &ServerTrust, token: &str) -> Result<Self, String> {
        // Plain HTTP only to this machine (a control plane run with --tls off on
        // loopback): elsewhere the token would cross the network in clear.
        let loopback_http = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| {
                server.strip_prefix(p).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with(':') || rest.starts_with('/')
                })
            });
        if !server.starts_with("https://") && !loopback_http {
            return Err(format!(
                "server {server:?} is not an https:// URL (plain http only to this machine's loopback)"
            ));
        }
        let raw = trust.http_client()?;
        let tls = std::sync::Arc::new(trust.rustls_config()?);
        let server = server.trim_end_matches('/').to_owned();
        Ok(Self {
            http: HttpClient::with_http("control-plane", &server, raw.clone()).with_token(token),
            raw,
            tls,
            server,
            token: token.to_owned(),
        })
    }

    /// The server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A client of the VM routes (vm-launcher's API under [`PREFIX`]) with the same
    /// trust and credential.
    pub fn vms(&self) -> clawos_vm_launcher_api::LauncherClient {
        clawos_vm_launcher_api::LauncherClient::with_http(
            "control-plane",
            &format!("{}{PREFIX}", self.server),
            self.raw.clone(),
        )
        .with_ws_tls(std::sync::Arc::clone(&self.tls))
        .with_token(&self.token)
    }

    fn at_prefix(&self) -> String {
        format!("{}{PREFIX}", self.server)
    }

    /// A client of the workflow routes (the orchestrator's API under [`PREFIX`]).
    pub fn workflows(&self) -> clawos_orchestrator_api::OrchestratorClient {
        clawos_orchestrator_api::OrchestratorClient::with_http(
            "control-plane",
            &self.at_prefix(),
            self.raw.clone(),
            &self.token,
        )
    }

    /// A client of the usage route (inference-proxy's API under [`PREFIX`]).
    pub fn usage(&self) -> clawos_inference_proxy_api::ProxyAdminClient {
        clawos_inference_proxy_api::ProxyAdminClient::with_http(
            "control-plane",
            &self.at_prefix(),
            self.raw.clone(),
            &self.token,
        )
    }

    /// A client of the agent-token routes (identity-manager's issue, revoke and
    /// introspect under [`PREFIX`]).
    pub fn agent_tokens(&self) -> clawos_identity_manager_api::IdentityClient {
        clawos_identity_manager_api::IdentityClient::with_http(
            "control-plane",
            &self.at_prefix(),
            self.raw.clone(),
            &self.token,
        )
    }

    /// Syscall audit events after `after` (monitor-daemon's trail).
    pub async fn audit_events(
        &self,
        q: &EventsQuery,
    ) -> Result<Vec<clawos_monitor_api::AuditEvent>, ClientError> {
        self.http
            .json(self.http.request(routes::AUDIT_EVENTS, &[]).query(q))
            .await
    }

    /// Asks the server whether a CLI browser login could start (`url` is the
    /// [`routes::LOGIN_OIDC`] URL with its [`CliLoginStart`] query; `cli_check=true` is
    /// added, so no login starts): `Ok`, else the server's refusal (no provider
    /// configured, bad parameters) before any browser is involved.
    pub async fn check_oidc_login(&self, url: &str) -> Result<(), ClientError> {
        let url = &format!("{url}&cli_check=true");
        let transport = |source| ClientError::Transport {
            service: "control-plane",
            url: url.to_owned(),
            source,
        };
        let resp = self
            .raw
            .get(url)
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        if status == 204 {
            return Ok(());
        }
        let body = resp.bytes().await.map_err(transport)?;
        Err(clawos_api::decode_error(status, &body, String::new()))
    }

    /// Trades a CLI browser login's one-time code for an API token (this call needs no
    /// credential: the code and verifier are it).
    pub async fn cli_token(&self, req: &CliToken) -> Result<CreatedToken, ClientError> {
        self.http
            .json(self.http.request(routes::CLI_TOKEN, &[]).json(req))
            .await
    }

    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.http.json(self.http.request(routes::WHOAMI, &[])).await
    }

    pub async fn create_token(&self, req: &CreateToken) -> Result<CreatedToken, ClientError> {
        self.http
            .json(self.http.request(routes::CREATE_TOKEN, &[]).json(req))
            .await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        self.http
            .json(self.http.request(routes::LIST_TOKENS, &[]))
            .await
    }

    /// Ends `operator`'s browser sessions and revokes the tokens their CLI logins made.
    pub async fn end_access(&self, operator: &str) -> Result<EndedAccess, ClientError> {
        self.http
            .json(
                self.http
                    .request(routes::END_ACCESS, &[])
                    .query(&OperatorQuery {
                        operator: operator.to_owned(),
                    }),
            )
            .await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(routes::REVOKE_TOKEN, &[id]))
            .await
            .map(drop)
    }
}
