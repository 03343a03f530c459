//! What an agent may make the provider do on its behalf.
//!
//! The proxy sends the host's key upstream, so whatever the provider does for a request
//! it does with the operator's credentials and from the provider's network. Some
//! request features reach the internet from there — server-side tools (web search,
//! web fetch, code execution, MCP connectors), content fetched by URL, the Files API —
//! and beta flags switch on more. An agent in a VM with no network would get egress
//! through the provider. So each is refused unless the operator allowed it for that
//! agent (`CLAWOS_PROXY_AGENT_POLICY`); the default allows none.
//!
//! Policy file:
//!
//! ```json
//! {
//!   "default": {"anthropic_beta": [], "server_tools": []},
//!   "agents": {
//!     "researcher": {"anthropic_beta": ["web-fetch-2025-09-10"], "server_tools": ["web_search", "web_fetch"]}
//!   }
//! }
//! ```
//!
//! An agent listed under `agents` gets exactly its entry (it is not merged with
//! `default`). `server_tools` names, each a feature the provider runs:
//!
//! - a server tool by its `type` without the date (`web_search`, `web_fetch`,
//!   `code_execution`, `tool_search_tool_regex`, `advisor`, ...) or by its exact
//!   versioned type (`web_search_20250305`); on the OpenAI API, the tool `type`
//!   (`web_search_preview`, ...) and `web_search` for `web_search_options`;
//! - `mcp_servers`: the `mcp_servers` field and `mcp_toolset` tools (MCP connector);
//! - `container`: the `container` field (code execution containers, skills);
//! - `url_sources`: image and document blocks with a `url` source, OpenAI
//!   `image_url`s that are not `data:` URLs (the server fetches them);
//! - `file_sources`: `file` sources and `container_upload` blocks (Files API; the
//!   host key reaches every file of the organisation).
//!
//! Client tools — Anthropic-defined schemas the agent executes itself (`bash_*`,
//! `text_editor_*`, `computer_*`, `memory_*`) — and custom tools need nothing.

use std::collections::HashMap;
use std::path::Path;

use axum::http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use crate::config::ConfigError;
use crate::request::Endpoint;

/// What one agent may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPolicy {
    /// `anthropic-beta` flags passed upstream.
    #[serde(default)]
    pub anthropic_beta: Vec<String>,
    /// Provider-side features (see the module documentation).
    #[serde(default)]
    pub server_tools: Vec<String>,
}

/// Every agent's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    /// For agents not listed.
    #[serde(default)]
    pub default: AgentPolicy,
    #[serde(default)]
    pub agents: HashMap<String, AgentPolicy>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Policies {
    /// Reads a policy file (none: nothing allowed to anyone).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let p: Self = serde_json::from_str(&text)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        p.validate()
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        for (who, p) in std::iter::once(("default", &self.default))
            .chain(self.agents.iter().map(|(a, p)| (a.as_str(), p)))
        {
            for name in p.anthropic_beta.iter().chain(&p.server_tools) {
                if !valid_name(name) {
                    return Err(format!(
                        "{who}: {name:?} is not a beta flag or feature name ([A-Za-z0-9_.-])"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The policy of `agent`.
    pub fn for_agent(&self, agent: &str) -> &AgentPolicy {
        self.agents.get(agent).unwrap_or(&self.default)
    }
}

/// Anthropic-defined tools the client executes (the provider only knows their schema).
const CLIENT_TOOLS: [&str; 4] = ["bash", "text_editor", "computer", "memory"];

/// `web_search_20250305` → `web_search`.
fn undated(ty: &str) -> &str {
    match ty.rsplit_once('_') {
        Some((base, date)) if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => ty,
    }
}

impl AgentPolicy {
    fn allows(&self, names: &[&str]) -> bool {
        self.server_tools
            .iter()
            .any(|a| names.contains(&a.as_str()))
    }
}

fn refusal(agent: &str, what: &str, allow: &str) -> String {
    format!(
        "{what} is not allowed for agent {agent}: it runs on the provider's side with the host's credentials; an operator may allow {allow:?} for this agent in CLAWOS_PROXY_AGENT_POLICY"
    )
}

/// The first URL or file source in `v`, as the feature name that allows it.
fn source_feature(v: &Value) -> Option<(&'static str, &'static str)> {
    match v {
        Value::Array(a) => a.iter().find_map(source_feature),
        Value::Object(o) => {
            if let Some(src) = o.get("source").and_then(Value::as_object) {
                match src.get("type").and_then(Value::as_str) {
                    Some("url") => {
                        return Some((
                            "a content source of type \"url\" (the provider fetches the URL)",
                            "url_sources",
                        ));
                    }
                    Some("file") => {
                        return Some((
                            "a content source of type \"file\" (the Files API)",
                            "file_sources",
                        ));
                    }
                    _ => {}
                }
            }
            if o.get("type").and_then(Value::as_str) == Some("container_upload") {
                return Some((
                    "a container_upload block (a file from the Files API)",
                    "file_sources",
                ));
            }
            if let Some(iu) = o.get("image_url") {
                let url = iu.as_str().or_else(|| iu["url"].as_str()).unwrap_or("");
                if !url.starts_with("data:") {
                    return Some((
                        "an image_url that is not a data: URL (the server fetches the url)",
                        "url_sources",
                    ));
                }
            }
            if o.get("file")
                .and_then(Value::as_object)
                .is_some_and(|f| f.contains_key("file_id"))
            {
                return Some(("a file part with a file_id (the Files API)", "file_sources"));
            }
            o.values().find_map(source_feature)
        }
        _ => None,
    }
}

/// Checks a request against `agent`'s policy. `Ok` carries the `anthropic-beta` value to
/// send upstream (only allowed flags, and only on the Anthropic API); `Err` is a 403
/// message naming what was refused.
pub fn check(
    policy: &AgentPolicy,
    agent: &str,
    ep: Endpoint,
    headers: &HeaderMap,
    body: &Value,
) -> Result<Option<HeaderValue>, String> {
    let mut betas = Vec::new();
    if ep != Endpoint::ChatCompletions {
        for v in headers.get_all("anthropic-beta") {
            let v = v
                .to_str()
                .map_err(|_| "the anthropic-beta header is not ASCII".to_owned())?;
            for flag in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                if !policy.anthropic_beta.iter().any(|a| a == flag) {
                    return Err(format!(
                        "anthropic-beta flag {flag:?} is not allowed for agent {agent}; an operator may allow it for this agent in CLAWOS_PROXY_AGENT_POLICY"
                    ));
                }
                betas.push(flag);
            }
        }
    }
    let tools = body.get("tools").and_then(Value::as_array);
    match ep {
        Endpoint::Messages | Endpoint::CountTokens => {
            for (field, allow) in [("mcp_servers", "mcp_servers"), ("container", "container")] {
                if body.get(field).is_some_and(|v| !v.is_null()) && !policy.allows(&[allow]) {
                    return Err(refusal(agent, &format!("field {field:?}"), allow));
                }
            }
            for t in tools.into_iter().flatten() {
                let Some(ty) = t.get("type").and_then(Value::as_str) else {
                    continue;
                };
                let base = undated(ty);
                if ty == "custom" || (base != ty && CLIENT_TOOLS.contains(&base)) {
                    continue;
                }
                let allow = if base == "mcp_toolset" {
                    "mcp_servers"
                } else {
                    base
                };
                if !policy.allows(&[allow, ty]) {
                    return Err(refusal(agent, &format!("server-side tool {ty:?}"), allow));
                }
            }
        }
        Endpoint::ChatCompletions => {
            if body.get("web_search_options").is_some_and(|v| !v.is_null())
                && !policy.allows(&["web_search"])
            {
                return Err(refusal(
                    agent,
                    "field \"web_search_options\" (provider-side web search)",
                    "web_search",
                ));
            }
            for t in tools.into_iter().flatten() {
                let ty = t.get("type").and_then(Value::as_str).unwrap_or("function");
                if !matches!(ty, "function" | "custom") && !policy.allows(&[ty]) {
                    return Err(refusal(agent, &format!("tool type {ty:?}"), ty));
                }
            }
        }
    }
    for field in ["messages", "system"] {
        if let Some((what, allow)) = body.get(field).and_then(source_feature)
            && !policy.allows(&[allow])
        {
            return Err(refusal(agent, what, allow));
        }
    }
    if betas.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&betas.join(","))
        .map(Some)
        .map_err(|_| "the anthropic-beta header is not valid".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deny(p: &AgentPolicy, ep: Endpoint, body: Value) -> String {
        check(p, "a", ep, &HeaderMap::new(), &body).expect_err("refused")
    }

    #[test]
    fn nothing_provider_side_by_default() {
        let p = AgentPolicy::default();
        let m = Endpoint::Messages;
        assert!(
            deny(&p, m, json!({"tools": [{"type": "web_search_20250305"}]}))
                .contains("web_search_20250305")
        );
        assert!(
            deny(&p, m, json!({"tools": [{"type": "web_fetch_20260309"}]}))
                .contains("\"web_fetch\"")
        );
        assert!(deny(&p, m, json!({"tools": [{"type": "mcp_toolset"}]})).contains("mcp_servers"));
        assert!(deny(&p, m, json!({"mcp_servers": []})).contains("mcp_servers"));
        assert!(
            deny(&p, m, json!({"tools": [{"type": "bash_search_x"}]})).contains("bash_search_x")
        );
        assert!(
            deny(&p, m, json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://x"}}]}]}]}))
            .contains("url_sources")
        );
        assert!(
            deny(
                &p,
                Endpoint::ChatCompletions,
                json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://10.0.0.1/"}}]}]})
            )
            .contains("url_sources")
        );
        let ok = json!({"tools": [{"type": "bash_20250124"}, {"type": "computer_20251124"},
            {"type": "custom"}, {"name": "x"}], "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "data": "AA"}}]}]});
        assert_eq!(check(&p, "a", m, &HeaderMap::new(), &ok), Ok(None));
        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-beta",
            HeaderValue::from_static("context-1m-2025-08-07"),
        );
        let e = check(&p, "a", m, &h, &json!({})).expect_err("beta");
        assert!(e.contains("context-1m-2025-08-07"), "{e}");
    }

    #[test]
    fn allowed_features_and_flags_pass() {
        let p = AgentPolicy {
            anthropic_beta: vec!["a-1".into(), "b-2".into()],
            server_tools: vec!["web_search".into(), "code_execution_20250825".into()],
        };
        let mut h = HeaderMap::new();
        h.append("anthropic-beta", HeaderValue::from_static("a-1, b-2"));
        let body = json!({"tools": [{"type": "web_search_20260209"}, {"type": "code_execution_20250825"}]});
        assert_eq!(
            check(&p, "a", Endpoint::Messages, &h, &body),
            Ok(Some(HeaderValue::from_static("a-1,b-2")))
        );
        let other_version = json!({"tools": [{"type": "code_execution_20260120"}]});
        assert!(
            check(
                &p,
                "a",
                Endpoint::Messages,
                &HeaderMap::new(),
                &other_version
            )
            .is_err()
        );
    }

    #[test]
    fn policy_files_are_validated() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("p.json");
        std::fs::write(&f, r#"{"agents": {"x": {"server_tools": ["web search"]}}}"#).expect("w");
        assert!(Policies::load(Some(&f)).is_err());
        std::fs::write(&f, r#"{"agents": {"x": {"server_tool": ["web_search"]}}}"#).expect("w");
        assert!(
            Policies::load(Some(&f)).is_err(),
            "unknown fields are refused"
        );
        std::fs::write(&f, r#"{"agents": {"x": {"server_tools": ["web_search"]}}}"#).expect("w");
        let p = Policies::load(Some(&f)).expect("ok");
        assert_eq!(p.for_agent("x").server_tools, ["web_search"]);
        assert!(p.for_agent("y").server_tools.is_empty());
    }
}
