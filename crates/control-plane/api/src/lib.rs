//! control-plane's public REST API, defined once: routes ([`routes`]), roles ([`Role`]),
//! wire types and [`ControlPlaneClient`], used by the daemon, the CLI and the tests.
//!
//! Everything is under `/api/v1`, over HTTPS. The VM routes are vm-launcher's own
//! route table ([`clawos_vm_launcher_api::routes`]) mounted under [`PREFIX`], with the
//! same wire types, so `LauncherClient::new("https://host:8080/api")` drives a remote
//! host exactly as it drives the local launcher.
//!
//! | route | role | body → answer |
//! |---|---|---|
//! | [`routes::WHOAMI`] `GET /api/v1/whoami` | viewer | → [`WhoAmI`] |
//! | [`routes::CREATE_TOKEN`] `POST /api/v1/operators/tokens` | admin | [`CreateToken`] → 201 [`CreatedToken`] (the secret is shown once) |
//! | [`routes::LIST_TOKENS`] `GET /api/v1/operators/tokens` | admin | → `[TokenInfo]` |
//! | [`routes::REVOKE_TOKEN`] `DELETE /api/v1/operators/tokens/{id}` | admin | → 204 |
//! | `GET /api/v1/vms`, `GET /api/v1/vms/{name}`, `…/console`, `…/snapshots` | viewer | as vm-launcher |
//! | `POST /api/v1/vms`, `…/stop`, `…/pause`, `…/resume`, `DELETE …` , snapshots, restore | operator | as vm-launcher |
//! | [`routes::OPENAPI`] `GET /api/v1/openapi.json` | none | the OpenAPI 3.1 document of all of this |
//! | [`routes::HEALTHZ`] `GET /healthz` | none | liveness |
//!
//! Every other request needs `Authorization: Bearer <operator token>`: 401 without a
//! valid one, 403 when the token's role is below the route's. Every request, refused or
//! not, leaves one record in the operator audit trail (`<state>/control-plane/audit.jsonl`).
//! Errors are `clawos_api::ErrorBody`.

use clawos_api::HttpClient;
pub use clawos_api::{ClientError, ErrorBody};
use serde::{Deserialize, Serialize};

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
    pub const OPENAPI: Route = Route::get("/api/v1/openapi.json");
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
    /// How the caller authenticated: `token`.
    pub via: String,
}

/// Typed client of the control plane's own routes. For the VM routes use
/// `clawos_vm_launcher_api::LauncherClient` with base `<server>/api`.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    http: HttpClient,
}

impl ControlPlaneClient {
    /// A client of `base` (`https://host:8080`) sending `token`, over `http` (which
    /// carries the TLS trust: a CA file or a pinned fingerprint).
    pub fn new(http: HttpClient) -> Self {
        Self { http }
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

    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(routes::REVOKE_TOKEN, &[id]))
            .await
            .map(drop)
    }
}
