//! The inference proxy's reading of an agent's request body, through its public API:
//! `request::parse` (JSON object, duplicate keys refused), `request::check` (the typed
//! fields that decide routing and cost, and the input-token estimate the budget
//! reserves), and `policy::check` with the default policy (no provider-side tools, no
//! beta flags). The first input byte picks the endpoint; the rest is the body.
//!
//! Invariants: no panic; the strict parser agrees with plain `serde_json` except that it
//! refuses duplicate keys (so the proxy checks the same fields the upstream obeys);
//! `check` reports exactly the model and stream flag the body has, never a zero or
//! missing `max_tokens` on the Messages API, and an estimate at least the bytes of the
//! messages' text; the default policy never lets through an MCP connector, a
//! container, a provider-side web/code tool or a beta flag.

#![no_main]

use axum::http::{HeaderMap, HeaderValue};
use clawos_inference_proxy::policy::{self, AgentPolicy};
use clawos_inference_proxy::request::{self, Endpoint};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Bytes of every string under `v` (values, not keys).
fn string_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(string_bytes).sum(),
        Value::Object(o) => o.values().map(string_bytes).sum(),
        _ => 0,
    }
}

fn present(v: &Value, field: &str) -> bool {
    v.get(field).is_some_and(|x| !x.is_null())
}

/// What the default policy must never let through, checked independently of it.
fn provider_side(ep: Endpoint, v: &Value) -> Option<String> {
    let tool_types = v
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("type").and_then(Value::as_str));
    match ep {
        Endpoint::Messages | Endpoint::CountTokens => {
            for f in ["mcp_servers", "container"] {
                if present(v, f) {
                    return Some(format!("field {f}"));
                }
            }
            for ty in tool_types {
                if ["web_search", "web_fetch", "code_execution", "mcp_toolset"]
                    .iter()
                    .any(|p| ty.starts_with(p))
                {
                    return Some(format!("tool {ty}"));
                }
            }
        }
        Endpoint::ChatCompletions => {
            if present(v, "web_search_options") {
                return Some("web_search_options".into());
            }
            for ty in tool_types {
                if !matches!(ty, "function" | "custom") {
                    return Some(format!("tool {ty}"));
                }
            }
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let plain = serde_json::from_slice::<Value>(body);
    let v = match request::parse(body) {
        Ok(v) => {
            assert!(v.is_object());
            match &plain {
                Ok(p) => assert_eq!(p, &v, "the strict parser read other values"),
                Err(e) => panic!("the strict parser accepted what serde_json refuses: {e}"),
            }
            v
        }
        Err(e) => {
            if let Ok(Value::Object(_)) = plain {
                assert!(
                    e.contains("duplicate key"),
                    "a JSON object without duplicate keys was refused: {e}"
                );
            }
            return;
        }
    };
    let selected = match sel % 3 {
        0 => Endpoint::Messages,
        1 => Endpoint::ChatCompletions,
        _ => Endpoint::CountTokens,
    };
    let policy = AgentPolicy::default();
    let mut beta = HeaderMap::new();
    beta.insert(
        "anthropic-beta",
        HeaderValue::from_static("files-api-2025-04-14"),
    );
    for ep in [
        selected,
        Endpoint::Messages,
        Endpoint::ChatCompletions,
        Endpoint::CountTokens,
    ] {
        assert!(!ep.path().is_empty() && !ep.kind().is_empty());
        let _ = ep.api();
        let estimate = request::input_estimate(ep, &v);
        assert!(
            estimate >= string_bytes(&v["messages"]),
            "the estimate {estimate} is below the messages' text"
        );
        if let Ok(s) = request::check(ep, &v) {
            assert_eq!(Some(s.model.as_str()), v["model"].as_str());
            assert!(!s.model.is_empty());
            assert!(v.get("stream").is_none_or(Value::is_boolean));
            assert_eq!(
                s.stream,
                v["stream"] == Value::Bool(true) && ep != Endpoint::CountTokens
            );
            assert!(s.choices >= 1);
            assert_eq!(s.input_estimate, estimate);
            if ep == Endpoint::Messages {
                let m = v["max_tokens"].as_u64();
                assert!(m.is_some_and(|m| m > 0) && s.max_output == m, "{s:?}");
            }
            if let Some(m) = v["max_tokens"].as_u64() {
                assert!(s.max_output.is_some_and(|o| o >= m), "{s:?}");
            }
        }
        let verdict = policy::check(&policy, "fuzz-agent", ep, &HeaderMap::new(), &v);
        match &verdict {
            Ok(betas) => {
                assert!(betas.is_none(), "beta flags out of none: {betas:?}");
                if let Some(what) = provider_side(ep, &v) {
                    panic!("the default policy let {what} through on {ep:?}");
                }
            }
            Err(m) => assert!(!m.is_empty()),
        }
        // A beta flag nobody allowed: refused on the Anthropic API, ignored on OpenAI's.
        let with_beta = policy::check(&policy, "fuzz-agent", ep, &beta, &v);
        if ep == Endpoint::ChatCompletions {
            assert_eq!(with_beta.is_ok(), verdict.is_ok());
        } else {
            assert!(
                with_beta.is_err(),
                "an unallowed beta flag passed on {ep:?}"
            );
        }
    }
});
