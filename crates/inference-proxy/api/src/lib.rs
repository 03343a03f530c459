//! inference-proxy's operator API: its routes ([`routes`]), its wire types and
//! [`ProxyAdminClient`], shared by the daemon, the CLI (`clawos usage`) and the tests.
//!
//! | route | auth | answer |
//! |---|---|---|
//! | [`routes::USAGE`] `?agent=&since_ms=` ([`UsageQuery`]) | operator | [`UsageReport`] |
//! | [`routes::HEALTHZ`] | – | liveness |
//! | [`routes::METRICS`] | – | Prometheus text |
//!
//! The operator credential is `<state>/proxy/admin.token` (0600): agents reach this
//! proxy too and must not read each other's usage. Errors are `clawos_api::ErrorBody`.
//!
//! The agent-facing endpoints (`/v1/messages`, `/v1/messages/count_tokens`,
//! `/v1/chat/completions`, `/v1/models`) are Anthropic's and OpenAI's APIs, errors
//! included, because agents call them with those vendors' SDKs; they are not here.

use clawos_api::{ClientError, HttpClient};
use serde::{Deserialize, Serialize};

/// Default address of the proxy.
pub const DEFAULT_URL: &str = "http://127.0.0.1:11435";

/// The operator route table, mounted by the daemon and called by [`ProxyAdminClient`].
pub mod routes {
    use clawos_api::Route;

    pub const USAGE: Route = Route::get("/v1/usage");
    pub const HEALTHZ: Route = Route::get("/healthz");
    pub const METRICS: Route = Route::get("/metrics");
}

/// The query of [`routes::USAGE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageQuery {
    /// Only requests at or after this Unix time in milliseconds (0: all).
    #[serde(default)]
    pub since_ms: u64,
    /// Only this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// Usage per agent and model, from the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageReport {
    /// Ordered by agent, then model.
    pub usage: Vec<UsageRow>,
}

/// The sums of one agent's requests to one model, as the upstream reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRow {
    pub agent: String,
    pub model: String,
    /// Model calls (`/v1/messages`, `/v1/chat/completions`).
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Server-side tool calls the provider ran (web searches, fetches), where the
    /// agent's policy allows them.
    #[serde(default)]
    pub server_tool_requests: u64,
    /// `/v1/messages/count_tokens` calls (no tokens charged).
    #[serde(default)]
    pub count_tokens_requests: u64,
}

impl UsageRow {
    /// Every input token, cached or not.
    pub fn all_input_tokens(&self) -> u64 {
        self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
    }
}

/// A typed client of the proxy's operator API.
#[derive(Debug, Clone)]
pub struct ProxyAdminClient {
    http: HttpClient,
}

impl ProxyAdminClient {
    /// A client presenting the operator credential.
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            http: HttpClient::new("inference-proxy", base).with_token(token),
        }
    }

    /// A client of the proxy's operator routes wherever they are served: the proxy, or
    /// a control plane (`https://host:8080/api`) through `http`, a client that trusts
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

    /// Usage per agent and model.
    pub async fn usage(&self, q: &UsageQuery) -> Result<UsageReport, ClientError> {
        self.http
            .json(self.http.request(routes::USAGE, &[]).query(q))
            .await
    }

    /// Whether the proxy answers.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(routes::HEALTHZ, &[]))
            .await
            .map(drop)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let bytes = self
            .http
            .bytes(self.http.request(routes::METRICS, &[]))
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
