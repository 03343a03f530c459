//! skill-manager's REST API, defined once: its routes ([`routes`]), wire types and
//! [`SkillsClient`], used by the daemon, the CLI (`clawos skill`) and the tests.
//!
//! | route | body → answer |
//! |---|---|
//! | [`routes::INSTALL`] `POST /v1/skills` | [`InstallSkill`] (the bundle's files) → 201 [`SkillInfo`]; a bundle that is unsigned (when the daemon has a key), tampered, malformed or not a usable component → 400 naming why, nothing installed; the name taken → 409 |
//! | [`routes::LIST`] `GET /v1/skills` | → `[SkillInfo]` |
//! | [`routes::GET`] `GET /v1/skills/{name}` | → [`SkillInfo`] |
//! | [`routes::REMOVE`] `DELETE /v1/skills/{name}` | → 204 |
//! | [`routes::ENABLE`] `PUT /v1/skills/{name}/agents/{agent}` | → 204: `agent` sees and may call the skill |
//! | [`routes::DISABLE`] `DELETE /v1/skills/{name}/agents/{agent}` | → 204 |
//! | [`routes::CALL`] `POST /v1/skills/{name}/call` | [`CallSkill`] → [`CallResult`] (an operator's test call, audited as the operator's) |
//! | [`routes::MCP`] `/mcp` | MCP (Streamable HTTP) for agents: their agent JWT, never the operator credential |
//! | [`routes::HEALTHZ`], [`routes::METRICS`] | liveness; Prometheus text |
//!
//! Every `/v1` route needs the operator credential, `Authorization: Bearer <token>`
//! ([`token_path`], 0600, made by the daemon at its first start). Errors are
//! `clawos_api::ErrorBody`.

use std::collections::BTreeMap;

pub use clawos_api::ClientError;
use clawos_api::HttpClient;
use serde::{Deserialize, Serialize};

/// Default address of the daemon.
pub const DEFAULT_URL: &str = "http://127.0.0.1:2083";

/// Environment variable naming the operator credential file.
pub const TOKEN_PATH_ENV: &str = "CLAWOS_SKILLS_TOKEN_PATH";

/// The operator credential file under a state directory.
pub fn token_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("skills/admin.token")
}

/// The local operator's credential: the file `$CLAWOS_SKILLS_TOKEN_PATH` names, else
/// [`token_path`] of `state_dir`. The error names the file and why.
pub fn local_token(state_dir: &std::path::Path) -> Result<String, String> {
    clawos_api::local_token(TOKEN_PATH_ENV, &token_path(state_dir))
}

/// skill-manager's audit trail of skill calls under a state directory: JSONL, one
/// [`SkillCallRecord`] a line, 0600. monitor-daemon follows it into the host's audit
/// trail (and so to the SIEM).
pub fn audit_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("skills").join(AUDIT_FILE)
}

/// The audit trail's name in skill-manager's directory (`<state>/skills`).
pub const AUDIT_FILE: &str = "audit.jsonl";

/// What a line of the skill audit trail records (one kind so far).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    SkillCall,
}

/// Who called a skill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerKind {
    /// An agent, over MCP, with its identity-manager JWT.
    Agent,
    /// An operator's test call (`clawos skill call`).
    Operator,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// The skill gave an answer.
    Answered,
    /// The skill ran and failed (its own error, a limit, a refused request).
    Failed,
    /// Not run: the agent was past its rate or in-flight limit.
    Refused,
    /// Given up: the caller went away before the answer.
    Aborted,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Aborted => "aborted",
        }
    }
}

/// One line of the skill audit trail ([`audit_path`]): a call, whatever its outcome.
/// Destinations only: never a request's headers or body, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillCallRecord {
    /// RFC 3339, when the record was written (the call's end).
    pub time: String,
    pub kind: RecordKind,
    pub skill: String,
    pub version: String,
    pub caller: CallerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The calling VM's boot (its identity token's `vm_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the call was not run: `"rate limit"` or `"in flight"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Refusals of this agent for this reason not written since the last one that was
    /// (refusals are written at most once a second per agent and reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_unrecorded_before: Option<u64>,
    /// The caller went away before the answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub aborted: bool,
    pub duration_ms: u64,
    #[serde(default)]
    pub input_bytes: u64,
    #[serde(default)]
    pub output_bytes: u64,
    /// The requests the skill made, allowed or refused.
    #[serde(default)]
    pub requests: Vec<RequestSummary>,
    /// What the skill logged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

impl SkillCallRecord {
    pub fn outcome(&self) -> CallOutcome {
        if self.refused.is_some() {
            CallOutcome::Refused
        } else if self.aborted {
            CallOutcome::Aborted
        } else if self.ok {
            CallOutcome::Answered
        } else {
            CallOutcome::Failed
        }
    }
}

/// The route table, mounted by the daemon and called by [`SkillsClient`].
pub mod routes {
    use clawos_api::Route;

    pub const INSTALL: Route = Route::post("/v1/skills");
    pub const LIST: Route = Route::get("/v1/skills");
    pub const GET: Route = Route::get("/v1/skills/{name}");
    pub const REMOVE: Route = Route::delete("/v1/skills/{name}");
    pub const ENABLE: Route = Route::put("/v1/skills/{name}/agents/{agent}");
    pub const DISABLE: Route = Route::delete("/v1/skills/{name}/agents/{agent}");
    pub const CALL: Route = Route::post("/v1/skills/{name}/call");
    pub const MCP: Route = Route::post("/mcp");
    pub const HEALTHZ: Route = Route::get("/healthz");
    pub const METRICS: Route = Route::get("/metrics");
}

/// `POST /v1/skills`: a bundle's files as they are on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallSkill {
    /// `skill.toml`.
    pub manifest: String,
    /// `skill.wasm`, base64 (standard alphabet).
    pub component_base64: String,
    /// `SKILL.md`, when the bundle has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// `skill.sig`, when the bundle has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Settings overriding the manifest's `[config]` on this host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// An installed skill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    /// sha256 of the bundle's signed statement.
    pub digest: String,
    /// Whether its signature was checked against this daemon's key.
    pub signed: bool,
    /// RFC 3339.
    pub installed_at: String,
    /// Destinations it may reach (`http.allow`).
    pub http_allow: Vec<String>,
    /// Names of the host secrets it is given.
    pub secrets: Vec<String>,
    /// The settings in force (manifest, then the operator's overrides).
    pub config: BTreeMap<String, String>,
    /// Agents it is enabled for.
    pub agents: Vec<String>,
}

/// `POST /v1/skills/{name}/call`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallSkill {
    /// The tool's input (an object matching its input schema).
    pub input: serde_json::Value,
}

/// One outgoing request of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSummary {
    pub destination: String,
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub bytes: u64,
}

/// What a call answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallResult {
    /// The skill's answer, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Why there is none (a refusal, a limit, the skill's own error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
    pub requests: Vec<RequestSummary>,
}

/// Client for skill-manager's operator API.
#[derive(Debug, Clone)]
pub struct SkillsClient {
    http: HttpClient,
}

impl SkillsClient {
    /// A client for the daemon at `base` presenting the operator credential `token`.
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            http: HttpClient::new("skill-manager", base).with_token(token),
        }
    }

    pub async fn install(&self, req: &InstallSkill) -> Result<SkillInfo, ClientError> {
        self.http
            .json(self.http.request(routes::INSTALL, &[]).json(req))
            .await
    }

    pub async fn list(&self) -> Result<Vec<SkillInfo>, ClientError> {
        self.http.json(self.http.request(routes::LIST, &[])).await
    }

    pub async fn get(&self, name: &str) -> Result<SkillInfo, ClientError> {
        self.http
            .json(self.http.request(routes::GET, &[name]))
            .await
    }

    pub async fn remove(&self, name: &str) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(routes::REMOVE, &[name]))
            .await
            .map(drop)
    }

    pub async fn enable(&self, name: &str, agent: &str) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(routes::ENABLE, &[name, agent]))
            .await
            .map(drop)
    }

    pub async fn disable(&self, name: &str, agent: &str) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(routes::DISABLE, &[name, agent]))
            .await
            .map(drop)
    }

    pub async fn call(&self, name: &str, req: &CallSkill) -> Result<CallResult, ClientError> {
        self.http
            .json(self.http.request(routes::CALL, &[name]).json(req))
            .await
    }
}
