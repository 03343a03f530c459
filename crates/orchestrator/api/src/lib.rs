//! orchestrator's REST API, defined once: its routes ([`routes`]), wire types and
//! [`OrchestratorClient`], used by the daemon, the CLI (`clawos workflow`) and the tests.
//!
//! | route | body → answer |
//! |---|---|
//! | [`routes::SUBMIT`] `POST /v1/runs` | [`SubmitRun`] (the YAML spec and inputs) → 201 [`RunSummary`]; an invalid spec → 400 naming the line and field, nothing started |
//! | [`routes::LIST`] `GET /v1/runs` | → `[RunSummary]`, newest first |
//! | [`routes::GET`] `GET /v1/runs/{run}` | → [`RunStatus`] (a row per step: state, attempts, duration, tokens) |
//! | [`routes::EVENTS`] `GET /v1/runs/{run}/events?after=N` | → `[RunEvent]` from the run's journal; with `Accept: text/event-stream`, the journal from `after` and then live, as server-sent events (`event: <kind>`, `id: <seq>`) |
//! | [`routes::APPROVE`] `POST /v1/runs/{run}/steps/{step}/approval` | [`Approval`] → 204 |
//! | [`routes::CANCEL`] `POST /v1/runs/{run}/cancel` | → [`RunStatus`] |
//! | [`routes::RUN_ARTIFACTS`] `GET /v1/runs/{run}/artifacts` | → `[ArtifactRef]` |
//! | [`routes::ARTIFACT`] `GET /v1/artifacts/{sha256}` | → the artifact's bytes |
//! | [`routes::HEALTHZ`], [`routes::METRICS`] | liveness; Prometheus text |
//!
//! Every route but `/healthz` and `/metrics` needs the operator credential,
//! `Authorization: Bearer <token>` ([`token_path`], 0600, made by the daemon at its first
//! start). Errors are `clawos_api::ErrorBody`.

use std::collections::BTreeMap;
use std::time::Duration;

pub use clawos_api::ClientError;
use clawos_api::HttpClient;
use serde::{Deserialize, Serialize};

/// Default address of the daemon.
pub const DEFAULT_URL: &str = "http://127.0.0.1:2081";

/// Environment variable naming the operator credential file.
pub const TOKEN_PATH_ENV: &str = "CLAWOS_ORCHESTRATOR_TOKEN_PATH";

/// The operator credential file under a state directory.
pub fn token_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("orchestrator/admin.token")
}

/// The local operator's credential: the file `$CLAWOS_ORCHESTRATOR_TOKEN_PATH` names,
/// else [`token_path`] of `state_dir`. The error names the file and why.
pub fn local_token(state_dir: &std::path::Path) -> Result<String, String> {
    clawos_api::local_token(TOKEN_PATH_ENV, &token_path(state_dir))
}

/// The route table, mounted by the daemon and called by [`OrchestratorClient`].
pub mod routes {
    use clawos_api::Route;

    pub const SUBMIT: Route = Route::post("/v1/runs");
    pub const LIST: Route = Route::get("/v1/runs");
    pub const GET: Route = Route::get("/v1/runs/{run}");
    pub const EVENTS: Route = Route::get("/v1/runs/{run}/events");
    pub const APPROVE: Route = Route::post("/v1/runs/{run}/steps/{step}/approval");
    pub const CANCEL: Route = Route::post("/v1/runs/{run}/cancel");
    pub const RUN_ARTIFACTS: Route = Route::get("/v1/runs/{run}/artifacts");
    pub const ARTIFACT: Route = Route::get("/v1/artifacts/{sha256}");
    pub const HEALTHZ: Route = Route::get("/healthz");
    pub const METRICS: Route = Route::get("/metrics");
}

/// `POST /v1/runs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmitRun {
    /// The workflow spec, YAML (`apiVersion: clawos.dev/v1`, `kind: Workflow`).
    pub spec: String,
    /// Values for the spec's `inputs`.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
    /// An approval step was rejected; later steps never started.
    Rejected,
    Cancelled,
}

impl RunState {
    /// Whether the run has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Running)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
        })
    }
}

/// A run in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunSummary {
    pub id: String,
    /// The spec's `metadata.name`.
    pub workflow: String,
    pub state: RunState,
    /// Unix milliseconds.
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Why it failed, was rejected or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A run and its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunStatus {
    #[serde(flatten)]
    pub run: RunSummary,
    pub steps: Vec<StepStatus>,
}

/// One step of a run (a map step's items are rows of their own, `step[i]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepStatus {
    pub id: String,
    /// `agent`, `approval` or `map`.
    pub kind: String,
    /// `pending`, `running`, `waiting` (approval or retry backoff), `succeeded`,
    /// `failed`, `skipped`, `cancelled`.
    pub state: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    pub tokens: u64,
    /// The start of its output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The VM of its last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// One journal event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunEvent {
    /// Consecutive per run, from 1.
    pub seq: u64,
    pub run: String,
    pub time_ms: u64,
    /// What happened (`run_submitted`, `step_started`, `attempt_failed`, …).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The event's own fields.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub detail: serde_json::Value,
}

/// `?after=N` of [`routes::EVENTS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub after: u64,
}

/// `POST …/approval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Approval {
    pub approved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A content-addressed artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactRef {
    /// 64 hex characters.
    pub sha256: String,
    pub size: u64,
    pub media_type: String,
    /// Its name where it was made (a path under the step's `/workspace/out/`).
    pub name: String,
    /// The step that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// A typed client for the orchestrator.
#[derive(Debug, Clone)]
pub struct OrchestratorClient {
    http: HttpClient,
}

impl OrchestratorClient {
    /// A client for the daemon at `base` presenting the operator credential `token`.
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            http: HttpClient::new("orchestrator", base).with_token(token),
        }
    }

    /// A client of the orchestrator's routes wherever they are served: the daemon, or a
    /// control plane (`https://host:8080/api`) through `http`, a client that trusts
    /// that server; `token` is the credential that server takes.
    pub fn with_http(
        service: &'static str,
        base: &str,
        http: reqwest::Client,
        token: &str,
    ) -> Self {
        Self {
            http: HttpClient::with_http(service, base, http).with_token(token),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        self.http.base()
    }

    pub async fn submit(&self, req: &SubmitRun) -> Result<RunSummary, ClientError> {
        self.http
            .json(self.http.request(routes::SUBMIT, &[]).json(req))
            .await
    }

    pub async fn list(&self) -> Result<Vec<RunSummary>, ClientError> {
        self.http.json(self.http.request(routes::LIST, &[])).await
    }

    pub async fn get(&self, run: &str) -> Result<RunStatus, ClientError> {
        self.http.json(self.http.request(routes::GET, &[run])).await
    }

    /// Journal events after `after`.
    pub async fn events(&self, run: &str, after: u64) -> Result<Vec<RunEvent>, ClientError> {
        self.http
            .json(
                self.http
                    .request(routes::EVENTS, &[run])
                    .query(&EventsQuery { after }),
            )
            .await
    }

    pub async fn approve(&self, run: &str, step: &str, a: &Approval) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(routes::APPROVE, &[run, step]).json(a))
            .await
            .map(drop)
    }

    pub async fn cancel(&self, run: &str) -> Result<RunStatus, ClientError> {
        self.http
            .json(
                self.http
                    .request(routes::CANCEL, &[run])
                    .timeout(Duration::from_secs(120)),
            )
            .await
    }

    pub async fn artifacts(&self, run: &str) -> Result<Vec<ArtifactRef>, ClientError> {
        self.http
            .json(self.http.request(routes::RUN_ARTIFACTS, &[run]))
            .await
    }

    /// An artifact's answer, its bytes still to be read (a relay streams them on).
    pub async fn artifact_download(&self, sha256: &str) -> Result<reqwest::Response, ClientError> {
        self.http
            .send(self.http.request(routes::ARTIFACT, &[sha256]))
            .await
    }

    /// An artifact's bytes.
    pub async fn artifact(&self, sha256: &str) -> Result<Vec<u8>, ClientError> {
        self.http
            .bytes(self.http.request(routes::ARTIFACT, &[sha256]))
            .await
    }

    /// Polls until the run has ended, up to `limit`.
    pub async fn wait(&self, run: &str, limit: Duration) -> Result<RunStatus, ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let s = self.get(run).await?;
            if s.run.state.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
