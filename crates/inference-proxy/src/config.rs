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
#[derive(Debug, Clone)]
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
    /// Requests one agent may have in flight at once (429 past it).
    pub max_in_flight: usize,
    /// `max_tokens` given to OpenAI-API requests that set no maximum while a token
    /// budget is on, so their reservation bounds them.
    pub default_max_tokens: u64,
    /// Beta flags and provider-side features each agent may use.
    pub policies: crate::policy::Policies,
    /// Client connections.
    pub connections: crate::conns::ConnLimits,
    /// Longest wait for a request body once its head has arrived (408 after).
    pub body_timeout: std::time::Duration,
}

/// Default per-agent in-flight cap.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// Default `max_tokens` for OpenAI-API requests without one, under a budget.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// Default request body timeout.
pub const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for ProxyConfig {
    /// Loopback port 11435, no upstreams, no budgets: a base for tests and tools, which
    /// must still set upstreams, paths and the operator credential.
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 11435)),
            upstreams: Vec::new(),
            rpm: 60,
            tokens_per_minute: 0,
            tokens_per_day: 0,
            tokens_total: 0,
            issuer: None,
            audience: "inference-proxy".into(),
            static_tokens: None,
            ledger_path: PathBuf::from("ledger.db"),
            audit_path: PathBuf::from("audit.jsonl"),
            admin_token: String::new(),
            upstream_timeout: std::time::Duration::from_secs(600),
            audit_rotation: crate::ledger::AuditRotation::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            policies: crate::policy::Policies::default(),
            connections: crate::conns::ConnLimits::default(),
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

impl ProxyConfig {
    /// Refuses a configuration the proxy cannot keep its promises with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.upstreams.is_empty() {
            return err("no upstreams configured".into());
        }
        if self.admin_token.trim().is_empty() {
            return err("the operator credential is empty".into());
        }
        if self.rpm == 0 {
            return err("CLAWOS_PROXY_RATE_LIMIT_RPM must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return err("CLAWOS_PROXY_MAX_IN_FLIGHT must be at least 1".into());
        }
        if self.default_max_tokens == 0 {
            return err("CLAWOS_PROXY_DEFAULT_MAX_TOKENS must be at least 1".into());
        }
        let c = &self.connections;
        if c.max_connections < MIN_CONNECTIONS {
            return err(format!(
                "CLAWOS_PROXY_MAX_CONNECTIONS must be at least {MIN_CONNECTIONS}, not {}",
                c.max_connections
            ));
        }
        if c.max_per_peer == 0 || c.max_per_peer > c.max_connections {
            return err(format!(
                "CLAWOS_PROXY_MAX_CONNECTIONS_PER_PEER must be 1..={} (CLAWOS_PROXY_MAX_CONNECTIONS), not {}",
                c.max_connections, c.max_per_peer
            ));
        }
        for (name, d) in [
            ("CLAWOS_PROXY_HEADER_TIMEOUT_SECS", c.header_timeout),
            ("CLAWOS_PROXY_IDLE_TIMEOUT_SECS", c.idle_timeout),
            ("CLAWOS_PROXY_BODY_TIMEOUT_SECS", self.body_timeout),
            ("CLAWOS_PROXY_UPSTREAM_TIMEOUT_SECS", self.upstream_timeout),
        ] {
            if d.is_zero() {
                return err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// The fewest client connections the proxy runs with.
pub const MIN_CONNECTIONS: usize = 16;

/// The flag without which [`check_dev_tokens`] refuses static tokens.
pub const INSECURE_DEV_TOKENS_FLAG: &str =
    "--insecure-dev-tokens (CLAWOS_PROXY_INSECURE_DEV_TOKENS=1)";

/// The gate in front of the development-only static tokens
/// (`--static-tokens`, `CLAWOS_PROXY_STATIC_TOKENS`): they replace identity-manager's
/// JWTs with a fixed token → agent map, so nothing about a request is verified (no
/// signature, expiry, audience or revocation). Refused unless `insecure_dev_tokens`
/// ([`INSECURE_DEV_TOKENS_FLAG`]) says so, and never next to an issuer (which one
/// authenticates would be a guess).
pub fn check_dev_tokens(
    static_tokens: Option<&std::path::Path>,
    insecure_dev_tokens: bool,
    issuer: Option<&str>,
) -> Result<(), ConfigError> {
    let Some(file) = static_tokens else {
        return Ok(());
    };
    if let Some(iss) = issuer {
        return Err(ConfigError(format!(
            "both CLAWOS_IDENTITY_ISSUER ({iss}) and CLAWOS_PROXY_STATIC_TOKENS ({}) are set: set one (static tokens skip JWT verification)",
            file.display()
        )));
    }
    if !insecure_dev_tokens {
        return Err(ConfigError(format!(
            "CLAWOS_PROXY_STATIC_TOKENS (--static-tokens {}) skips JWT verification: agents' requests would not be verified. Refusing to start without {INSECURE_DEV_TOKENS_FLAG}, for development only; in production set CLAWOS_IDENTITY_ISSUER instead",
            file.display()
        )));
    }
    Ok(())
}

/// Reads the operator credential file, or creates it (0600, random).
pub fn admin_token(path: &std::path::Path) -> Result<String, ConfigError> {
    clawos_service::operator_token(path).map_err(ConfigError)
}

/// An upstream's key: the variable `api_key_env` names, else the file its `_FILE`
/// variant names (how systemd's `LoadCredential=` hands a secret over).
fn api_key(u: &Upstream, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    if let Some(k) = env(&u.api_key_env).filter(|k| !k.trim().is_empty()) {
        return Ok(k);
    }
    let file_var = format!("{}_FILE", u.api_key_env);
    let Some(path) = env(&file_var).filter(|p| !p.is_empty()) else {
        return Err(ConfigError(format!(
            "upstream {}: {} is not set on the host (nor {file_var})",
            u.name, u.api_key_env
        )));
    };
    let key = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError(format!("upstream {}: {file_var} {path}: {e}", u.name)))?;
    let key = key.trim().to_owned();
    if key.is_empty() {
        return Err(ConfigError(format!(
            "upstream {}: {file_var} {path} is empty",
            u.name
        )));
    }
    Ok(key)
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
        u.api_key = api_key(u, env)?;
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
    fn a_key_can_come_from_the_file_its_file_variable_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("anthropic-api-key");
        std::fs::write(&file, "sk-ant-from-file\n").expect("write");
        let path = file.display().to_string();
        let env = |k: &str| (k == "ANTHROPIC_API_KEY_FILE").then(|| path.clone());
        let ups = upstreams(None, "https://api.anthropic.com", &env).expect("ok");
        assert_eq!(ups[0].api_key, "sk-ant-from-file");
        // The variable itself wins over the file.
        let both = |k: &str| match k {
            "ANTHROPIC_API_KEY" => Some("sk-ant-env".to_owned()),
            "ANTHROPIC_API_KEY_FILE" => Some(path.clone()),
            _ => None,
        };
        let ups = upstreams(None, "https://api.anthropic.com", &both).expect("ok");
        assert_eq!(ups[0].api_key, "sk-ant-env");
        // A missing or empty file is refused by name.
        for (content, expect) in [(None, "No such file"), (Some("  \n"), "is empty")] {
            let f = dir.path().join("other");
            let _ = std::fs::remove_file(&f);
            if let Some(c) = content {
                std::fs::write(&f, c).expect("write");
            }
            let p = f.display().to_string();
            let env = |k: &str| (k == "ANTHROPIC_API_KEY_FILE").then(|| p.clone());
            let e = upstreams(None, "https://api.anthropic.com", &env).expect_err("refused");
            assert!(
                e.to_string().contains("ANTHROPIC_API_KEY_FILE") && e.to_string().contains(expect),
                "{e}"
            );
        }
    }

    #[test]
    fn limits_are_validated() {
        let ok = ProxyConfig {
            upstreams: upstreams(None, "http://x", &|_| Some("k".into())).expect("ups"),
            admin_token: "0123456789abcdef".into(),
            ..ProxyConfig::default()
        };
        ok.validate().expect("defaults are valid");
        let mut bad = ok.clone();
        bad.max_in_flight = 0;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.connections.max_per_peer = bad.connections.max_connections + 1;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.connections.header_timeout = std::time::Duration::ZERO;
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.connections.max_connections = 3;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn static_tokens_need_the_insecure_flag_and_no_issuer() {
        let f = std::path::Path::new("/etc/tokens.json");
        check_dev_tokens(None, false, None).expect("no static tokens");
        check_dev_tokens(None, false, Some("http://127.0.0.1:2082")).expect("JWTs");
        let e = check_dev_tokens(Some(f), false, None).expect_err("without the flag");
        let m = e.to_string();
        for s in [
            "--insecure-dev-tokens",
            "CLAWOS_PROXY_INSECURE_DEV_TOKENS=1",
            "CLAWOS_PROXY_STATIC_TOKENS",
            "/etc/tokens.json",
            "not be verified",
        ] {
            assert!(m.contains(s), "{s:?} missing from {m}");
        }
        check_dev_tokens(Some(f), true, None).expect("with the flag");
        let e = check_dev_tokens(Some(f), true, Some("http://127.0.0.1:2082")).expect_err("both");
        assert!(e.to_string().contains("CLAWOS_IDENTITY_ISSUER"), "{e}");
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
