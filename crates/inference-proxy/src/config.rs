//! Proxy configuration, validated before the port opens.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Which provider API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKind {
    Anthropic,
    Openai,
}

/// One upstream provider. The key comes from the host's environment and is never
/// printed.
#[derive(Clone, serde::Deserialize)]
pub struct Upstream {
    pub name: String,
    #[serde(rename = "api")]
    pub kind: ApiKind,
    pub base_url: String,
    /// Environment variable holding the real API key.
    pub api_key_env: String,
    /// Model names served; a trailing `*` matches a prefix.
    pub models: Vec<String>,
    #[serde(skip)]
    pub api_key: String,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .field("models", &self.models)
            .finish()
    }
}

impl Upstream {
    /// Whether this upstream serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| match m.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => m == model,
        })
    }
}

/// A configuration problem, named.
#[derive(Debug, thiserror::Error)]
#[error("inference-proxy config: {0}")]
pub struct ConfigError(pub String);

/// Everything the proxy needs.
#[derive(Debug)]
pub struct ProxyConfig {
    pub addr: SocketAddr,
    pub upstreams: Vec<Upstream>,
    pub rpm: u32,
    /// Tokens per agent per rolling minute (0: no budget).
    pub tokens_per_minute: u64,
    /// Tokens per agent per UTC day (0: no budget).
    pub tokens_per_day: u64,
    /// Tokens per agent in total (0: no budget).
    pub tokens_total: u64,
    /// identity-manager issuer URL (JWT auth), or static tokens for development.
    pub issuer: Option<String>,
    pub audience: String,
    pub static_tokens: Option<std::collections::HashMap<String, String>>,
    pub ledger_path: PathBuf,
    pub audit_path: PathBuf,
    /// Operator credential for `GET /v1/usage`.
    pub admin_token: String,
    /// Longest wait for a non-streaming upstream answer (504 after).
    pub upstream_timeout: std::time::Duration,
    /// Audit file rotation.
    pub audit_rotation: crate::ledger::AuditRotation,
}

/// Reads the operator credential file, or creates it (0600, random).
pub fn admin_token(path: &std::path::Path) -> Result<String, ConfigError> {
    clawos_service::operator_token(path).map_err(ConfigError)
}

/// Reads upstreams from a JSON file (`[{"name", "api", "base_url", "api_key_env",
/// "models"}]`), or the default single Anthropic upstream, and resolves their keys from
/// `env`.
pub fn upstreams(
    file: Option<&std::path::Path>,
    default_anthropic_url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Upstream>, ConfigError> {
    let mut ups: Vec<Upstream> = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| ConfigError(format!("{}: {e}", f.display())))?;
            serde_json::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", f.display())))?
        }
        None => vec![Upstream {
            name: "anthropic".into(),
            kind: ApiKind::Anthropic,
            base_url: default_anthropic_url.into(),
            api_key_env: "ANTHROPIC_API_KEY".into(),
            models: vec!["*".into()],
            api_key: String::new(),
        }],
    };
    if ups.is_empty() {
        return Err(ConfigError("no upstreams configured".into()));
    }
    for u in &mut ups {
        if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
            return Err(ConfigError(format!(
                "upstream {}: base_url {:?} is not http(s)",
                u.name, u.base_url
            )));
        }
        u.api_key = env(&u.api_key_env)
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| {
                ConfigError(format!(
                    "upstream {}: {} is not set on the host",
                    u.name, u.api_key_env
                ))
            })?;
    }
    Ok(ups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_environment_and_never_print() {
        let env = |k: &str| (k == "ANTHROPIC_API_KEY").then(|| "sk-ant-secret".to_owned());
        let ups = upstreams(None, "https://api.anthropic.com", &env).expect("ok");
        assert_eq!(ups[0].api_key, "sk-ant-secret");
        assert!(!format!("{ups:?}").contains("sk-ant-secret"));
        let none = |_: &str| None;
        let e = upstreams(None, "https://api.anthropic.com", &none).expect_err("no key");
        assert!(e.to_string().contains("ANTHROPIC_API_KEY"), "{e}");
        let e = upstreams(None, "ftp://x", &env).expect_err("bad url");
        assert!(e.to_string().contains("not http"), "{e}");
    }

    #[test]
    fn model_patterns() {
        let u = Upstream {
            name: "u".into(),
            kind: ApiKind::Anthropic,
            base_url: "http://x".into(),
            api_key_env: "K".into(),
            models: vec!["claude-*".into(), "exact".into()],
            api_key: String::new(),
        };
        assert!(u.serves("claude-sonnet-4-5") && u.serves("exact"));
        assert!(!u.serves("gpt-4o") && !u.serves("exactly"));
    }
}
