//! A stand-in for the web search backends the `web-search` skill speaks, for tests and
//! the offline demo (a VM has no network, and this machine reaches no search engine):
//!
//! - SearXNG: `GET /search?q=...&format=json` → `{"query", "results": [{"title", "url",
//!   "content"}], "number_of_results"}`; another `format` is 403, as SearXNG answers
//!   when JSON is not enabled;
//! - Brave: `GET /res/v1/web/search?q=...&count=N` → `{"query": {"original"}, "web":
//!   {"results": [{"title", "url", "description"}]}}`; with a key configured, a request
//!   without that `X-Subscription-Token` is 401 (Brave's answer to a bad token).
//!
//! Results come from a small corpus (built in, or a JSON file): documents ranked by how
//! many of the query's words they contain, best first, those with none left out. Not a
//! search engine: the point is the wire format and a deterministic answer.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// One document the stand-in can find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    pub title: String,
    pub url: String,
    pub snippet: String,
}

/// The built-in corpus: a few pages about what ClawOS is built from.
pub fn builtin_corpus() -> Vec<Document> {
    let doc = |title: &str, url: &str, snippet: &str| Document {
        title: title.to_owned(),
        url: url.to_owned(),
        snippet: snippet.to_owned(),
    };
    vec![
        doc(
            "ClawOS: autonomous AI agents in hardened microVMs",
            "https://clawos.example/",
            "ClawOS runs each AI agent in its own microVM with a signed, dm-verity verified image, a short-lived identity and an audited LLM proxy.",
        ),
        doc(
            "Firecracker: secure and fast microVMs for serverless computing",
            "https://firecracker-microvm.github.io/",
            "Firecracker is an open source virtualization technology purpose-built for creating and managing secure, multi-tenant container and function-based services.",
        ),
        doc(
            "dm-verity — The Linux Kernel documentation",
            "https://docs.kernel.org/admin-guide/device-mapper/verity.html",
            "Device-Mapper's verity target provides transparent integrity checking of block devices using a cryptographic digest provided by the kernel crypto API.",
        ),
        doc(
            "Model Context Protocol: specification",
            "https://modelcontextprotocol.io/specification",
            "MCP is an open protocol that lets AI applications connect to tools and data sources; servers expose tools, resources and prompts over JSON-RPC.",
        ),
        doc(
            "The WebAssembly Component Model",
            "https://component-model.bytecodealliance.org/",
            "Components are portable, sandboxed WebAssembly programs with typed interfaces described in WIT; WASI defines their system interfaces.",
        ),
        doc(
            "Wasmtime: a fast and secure runtime for WebAssembly",
            "https://wasmtime.dev/",
            "Wasmtime is a standalone runtime for WebAssembly, WASI and the component model, with fuel, epoch interruption and resource limits.",
        ),
        doc(
            "QEMU microvm machine type",
            "https://www.qemu.org/docs/master/system/i386/microvm.html",
            "microvm is a minimalist machine type without PCI nor ACPI support, designed for short-lived guests and fast boot.",
        ),
        doc(
            "SearXNG: a privacy-respecting metasearch engine",
            "https://docs.searxng.org/",
            "SearXNG aggregates results from search services; its Search API answers GET /search with format=json when JSON output is enabled.",
        ),
    ]
}

/// Lowercase alphanumeric words of `text`.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The documents matching `query`, best first, at most `count`.
pub fn search<'a>(corpus: &'a [Document], query: &str, count: usize) -> Vec<&'a Document> {
    let wanted = words(query);
    let mut scored: Vec<(usize, usize, &Document)> = corpus
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let have = words(&format!("{} {}", d.title, d.snippet));
            let score = wanted.iter().filter(|w| have.contains(w)).count();
            (score > 0).then_some((score, i, d))
        })
        .collect();
    // Higher score first; the corpus order breaks ties (stable, deterministic).
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(count).map(|(_, _, d)| d).collect()
}

/// What the server holds.
#[derive(Debug)]
pub struct StandIn {
    pub corpus: Vec<Document>,
    /// The `X-Subscription-Token` Brave's route requires, if any.
    pub brave_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SearxQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BraveQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    count: Option<usize>,
}

/// Results per answer unless the request asks (Brave's default count is 20; the
/// corpus is smaller anyway).
const DEFAULT_COUNT: usize = 10;

async fn searxng(State(s): State<Arc<StandIn>>, Query(q): Query<SearxQuery>) -> Response {
    if q.format.as_deref() != Some("json") {
        return (StatusCode::FORBIDDEN, "only format=json is served here\n").into_response();
    }
    let results: Vec<_> = search(&s.corpus, &q.q, DEFAULT_COUNT)
        .into_iter()
        .map(
            |d| json!({"title": d.title, "url": d.url, "content": d.snippet, "engine": "stand-in"}),
        )
        .collect();
    Json(json!({
        "query": q.q,
        "number_of_results": results.len(),
        "results": results,
        "answers": [],
        "suggestions": [],
        "unresponsive_engines": [],
    }))
    .into_response()
}

async fn brave(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(q): Query<BraveQuery>,
) -> Response {
    if let Some(key) = &s.brave_key {
        let given = headers
            .get("x-subscription-token")
            .and_then(|v| v.to_str().ok());
        if given != Some(key.as_str()) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"type": "ErrorResponse", "error": {"code": "SUBSCRIPTION_TOKEN_INVALID", "status": 401, "detail": "The provided subscription token is invalid."}})),
            )
                .into_response();
        }
    }
    let count = q.count.unwrap_or(DEFAULT_COUNT).clamp(1, 20);
    let results: Vec<_> = search(&s.corpus, &q.q, count)
        .into_iter()
        .map(|d| json!({"title": d.title, "url": d.url, "description": d.snippet, "type": "search_result"}))
        .collect();
    Json(json!({
        "type": "search",
        "query": {"original": q.q},
        "web": {"type": "search", "results": results},
    }))
    .into_response()
}

/// The routes: SearXNG's `/search`, Brave's `/res/v1/web/search`, and `/healthz`.
pub fn router(standin: StandIn) -> axum::Router {
    axum::Router::new()
        .route("/search", get(searxng))
        .route("/res/v1/web/search", get(brave))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::new(standin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_match_comes_first_and_nothing_unrelated_comes_at_all() {
        let corpus = builtin_corpus();
        let found = search(&corpus, "What is ClawOS? agents in microVMs", 10);
        assert_eq!(found[0].url, "https://clawos.example/");
        assert!(found.len() < corpus.len(), "{found:?}");
        assert!(search(&corpus, "zzzz qqqq", 10).is_empty());
        assert_eq!(search(&corpus, "the", 2).len(), 2, "count caps the answer");
        // Case and punctuation do not matter.
        assert_eq!(
            search(&corpus, "WASMTIME!", 1)[0].url,
            "https://wasmtime.dev/"
        );
    }
}
