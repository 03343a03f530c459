//! `skill.toml`: what a skill is, what it may reach, and what it may use. Parsed and
//! checked in full before anything else looks at a bundle; every refusal names the
//! field and why.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BundleError;

/// Most a skill may ask for, whatever its manifest says.
pub const MAX_MEMORY_MIB: u32 = 1024;
/// Longest call a manifest may ask for.
pub const MAX_TIMEOUT_MS: u64 = 120_000;
/// Largest HTTP response a manifest may ask for.
pub const MAX_RESPONSE_KIB: u32 = 16 * 1024;

/// A skill's manifest (`skill.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkillManifest {
    /// The tool's name: 1–64 of `a-z 0-9 -`, starting with a letter.
    pub name: String,
    /// The skill's version (free text, 1–32 printable characters).
    pub version: String,
    /// What the tool does, shown to the model (1–2,000 characters).
    pub description: String,
    /// The JSON Schema of the tool's input; an object schema.
    pub input_schema: serde_json::Value,
    /// What the skill may reach. Nothing when absent.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// What one call may use.
    #[serde(default)]
    pub limits: Limits,
    /// Settings the component reads through `clawos:skill/config` (the operator may
    /// override them at install). Never secrets: those are `capabilities.secrets`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// Capabilities granted to a skill; everything not listed is denied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Outgoing HTTP.
    #[serde(default)]
    pub http: HttpCapability,
    /// Secrets the host adds to the skill's outgoing requests as headers.
    #[serde(default)]
    pub secrets: Vec<SecretGrant>,
}

/// Outgoing HTTP a skill may make.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCapability {
    /// Destinations, each `host:port` (HTTPS) or `http://host:port` (plain HTTP).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// A secret the host holds and sends as a request header to the allowed destinations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretGrant {
    /// The secret's name in the host's secret store: 1–64 of `A-Z 0-9 _`.
    pub name: String,
    /// The request header it is sent in (e.g. `X-Subscription-Token`).
    pub header: String,
    /// The `http.allow` entries it goes to; all of them when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
}

/// Per-call limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory the component may grow to, MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Wall-clock time of one call, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Fuel (roughly, WebAssembly instructions) of one call; none = only the timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Largest HTTP response body the skill may receive, KiB.
    #[serde(default = "default_response_kib")]
    pub response_kib: u32,
}

fn default_memory_mib() -> u32 {
    64
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_response_kib() -> u32 {
    1024
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: default_memory_mib(),
            timeout_ms: default_timeout_ms(),
            fuel: None,
            response_kib: default_response_kib(),
        }
    }
}

/// HTTP or HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// One parsed `http.allow` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub scheme: Scheme,
    /// Lower case; an IPv6 literal without brackets.
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}://[{}]:{}",
                self.scheme.as_str(),
                self.host,
                self.port
            )
        } else {
            write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

impl Destination {
    /// Parses `host:port` (HTTPS) or `http://host:port` / `https://host:port`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let (scheme, rest) = if let Some(r) = entry.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if let Some(r) = entry.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if entry.contains("://") {
            return Err("only http:// and https:// destinations exist".into());
        } else {
            (Scheme::Https, entry)
        };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, p) = r
                .split_once("]:")
                .ok_or("an IPv6 destination is written [addr]:port")?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{h:?} is not an IPv6 address"))?;
            (h.to_ascii_lowercase(), p)
        } else {
            let (h, p) = rest
                .rsplit_once(':')
                .ok_or("a destination needs a port (host:port)")?;
            if !valid_host(h) {
                return Err(format!("{h:?} is not a host name or IPv4 address"));
            }
            (h.to_ascii_lowercase(), p)
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a port (1–65535)"))?;
        Ok(Self { scheme, host, port })
    }
}

impl Destination {
    /// Whether a secret may be sent here: over TLS, or over plain http to a loopback
    /// address literal (a name could resolve anywhere).
    pub fn keeps_secrets(&self) -> bool {
        self.scheme == Scheme::Https
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// A DNS name (letters, digits, `-`, dots between labels) or an IPv4 literal.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Headers a secret may not be sent in: the ones that frame or route the request.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

impl SkillManifest {
    /// Parses and checks `skill.toml`.
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let m: Self = toml::from_str(text).map_err(|e| BundleError::Manifest {
            reason: e.message().to_owned(),
        })?;
        m.validate()?;
        Ok(m)
    }

    /// The allowed destinations, parsed.
    pub fn destinations(&self) -> Vec<Destination> {
        // Validated at parse time: every entry parses.
        self.capabilities
            .http
            .allow
            .iter()
            .filter_map(|e| Destination::parse(e).ok())
            .collect()
    }

    fn validate(&self) -> Result<(), BundleError> {
        let bad = |reason: String| Err(BundleError::Manifest { reason });
        if !valid_skill_name(&self.name) {
            return bad(format!(
                "name {:?}: 1–64 of a-z, 0-9 and '-', starting with a letter",
                self.name
            ));
        }
        // The version names files (`clawos skill pack` writes `<name>-<version>.skill`):
        // never a path.
        if self.version.is_empty()
            || self.version.len() > 32
            || self.version.starts_with('.')
            || !self
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'))
        {
            return bad(format!(
                "version {:?}: 1–32 of A-Z, a-z, 0-9, '.', '_', '+' and '-', not starting with '.'",
                self.version
            ));
        }
        let d = self.description.trim();
        if d.is_empty() || self.description.chars().count() > 2000 {
            return bad("description: 1–2,000 characters".into());
        }
        match &self.input_schema {
            serde_json::Value::Object(o) if o.get("type") == Some(&"object".into()) => {}
            _ => return bad("input_schema: a JSON Schema with type = \"object\"".into()),
        }
        if self.capabilities.http.allow.len() > 64 {
            return bad("capabilities.http.allow: at most 64 destinations".into());
        }
        for e in &self.capabilities.http.allow {
            if let Err(why) = Destination::parse(e) {
                return bad(format!("capabilities.http.allow entry {e:?}: {why}"));
            }
        }
        if !self.capabilities.secrets.is_empty() && self.capabilities.http.allow.is_empty() {
            return bad("capabilities.secrets without http.allow: nowhere to send them".into());
        }
        for s in &self.capabilities.secrets {
            if s.name.is_empty()
                || s.name.len() > 64
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return bad(format!(
                    "capabilities.secrets name {:?}: 1–64 of A-Z, 0-9 and '_'",
                    s.name
                ));
            }
            let allowed = self.destinations();
            for t in &s.to {
                match Destination::parse(t) {
                    Ok(d) if allowed.contains(&d) => {}
                    _ => {
                        return bad(format!(
                            "capabilities.secrets {:?}: `to` entry {t:?} is not in http.allow",
                            s.name
                        ));
                    }
                }
            }
            // Never in clear text across a network: a plain-http destination of a
            // secret must be this machine itself, named by a loopback address.
            let goes_to: Vec<Destination> = if s.to.is_empty() {
                allowed.clone()
            } else {
                s.to.iter()
                    .filter_map(|t| Destination::parse(t).ok())
                    .collect()
            };
            if let Some(d) = goes_to.iter().find(|d| !d.keeps_secrets()) {
                return bad(format!(
                    "capabilities.secrets {:?} would go in clear text to {d}: a secret goes \
                     to https:// destinations only (or plain http on a loopback address); \
                     name its https destinations in `to`",
                    s.name
                ));
            }
            let header = s.header.to_ascii_lowercase();
            if http::HeaderName::from_bytes(header.as_bytes()).is_err()
                || RESERVED_HEADERS.contains(&header.as_str())
            {
                return bad(format!(
                    "capabilities.secrets header {:?}: not a header a secret can be sent in",
                    s.header
                ));
            }
        }
        if self.capabilities.secrets.len() > 8 {
            return bad("capabilities.secrets: at most 8".into());
        }
        validate_config(&self.config).map_err(|reason| BundleError::Manifest {
            reason: format!("config: {reason}"),
        })?;
        let l = &self.limits;
        if l.memory_mib == 0 || l.memory_mib > MAX_MEMORY_MIB {
            return bad(format!("limits.memory_mib: 1–{MAX_MEMORY_MIB}"));
        }
        if l.timeout_ms == 0 || l.timeout_ms > MAX_TIMEOUT_MS {
            return bad(format!("limits.timeout_ms: 1–{MAX_TIMEOUT_MS}"));
        }
        if l.fuel == Some(0) {
            return bad("limits.fuel: more than 0 (or leave it out)".into());
        }
        if l.response_kib == 0 || l.response_kib > MAX_RESPONSE_KIB {
            return bad(format!("limits.response_kib: 1–{MAX_RESPONSE_KIB}"));
        }
        Ok(())
    }
}

/// Checks config keys (1–64 of `a-z 0-9 _ -`) and values (at most 4 KiB), at most 64.
pub fn validate_config(config: &BTreeMap<String, String>) -> Result<(), String> {
    if config.len() > 64 {
        return Err("at most 64 settings".into());
    }
    for (k, v) in config {
        if k.is_empty()
            || k.len() > 64
            || !k
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(format!("key {k:?}: 1–64 of a-z, 0-9, '_' and '-'"));
        }
        if v.len() > 4096 {
            return Err(format!("value of {k:?}: at most 4 KiB"));
        }
    }
    Ok(())
}

/// A skill (and tool) name: 1–64 of `a-z 0-9 -`, starting with a letter. Never a path.
pub fn valid_skill_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web-search"
version = "0.1.0"
description = "Searches the web."

[input_schema]
type = "object"
required = ["query"]
properties.query.type = "string"

[capabilities.http]
allow = ["search.example:443", "http://127.0.0.1:8888", "[::1]:9"]

[[capabilities.secrets]]
name = "BRAVE_API_KEY"
header = "X-Subscription-Token"
to = ["search.example:443"]

[limits]
memory_mib = 32
timeout_ms = 5000

[config]
backend = "searxng"
"#;

    #[test]
    fn a_full_manifest_parses_with_defaults_filled_in() {
        let m = SkillManifest::parse(GOOD).expect("parse");
        assert_eq!(m.name, "web-search");
        assert_eq!(m.limits.memory_mib, 32);
        assert_eq!(m.limits.response_kib, 1024);
        assert_eq!(m.limits.fuel, None);
        let d = m.destinations();
        assert_eq!(d[0].to_string(), "https://search.example:443");
        assert_eq!(d[1].to_string(), "http://127.0.0.1:8888");
        assert_eq!(d[2].to_string(), "https://[::1]:9");
        assert_eq!(m.input_schema["properties"]["query"]["type"], "string");
    }

    fn refusal(edit: impl Fn(&str) -> String) -> String {
        match SkillManifest::parse(&edit(GOOD)) {
            Err(BundleError::Manifest { reason }) => reason,
            other => panic!("expected a manifest refusal, got {other:?}"),
        }
    }

    #[test]
    fn each_bad_field_is_refused_by_name() {
        let cases: &[(&str, &str, &str)] = &[
            ("name = \"web-search\"", "name = \"../etc\"", "name"),
            ("name = \"web-search\"", "name = \"Web\"", "name"),
            ("version = \"0.1.0\"", "version = \"a b\"", "version"),
            ("version = \"0.1.0\"", "version = \"1/../../x\"", "version"),
            ("version = \"0.1.0\"", "version = \"..\"", "version"),
            ("type = \"object\"", "type = \"string\"", "input_schema"),
            (
                "\"search.example:443\"",
                "\"search.example\"",
                "needs a port",
            ),
            (
                "\"search.example:443\"",
                "\"ftp://x:21\"",
                "http:// and https://",
            ),
            ("\"search.example:443\"", "\"x:0\"", "not a port"),
            ("\"search.example:443\"", "\"a_b:1\"", "not a host name"),
            ("\"[::1]:9\"", "\"[zz]:9\"", "IPv6"),
            ("X-Subscription-Token", "Host", "header"),
            ("BRAVE_API_KEY", "brave", "secrets name"),
            (
                "to = [\"search.example:443\"]",
                "to = [\"other:443\"]",
                "not in http.allow",
            ),
            ("memory_mib = 32", "memory_mib = 4096", "memory_mib"),
            ("timeout_ms = 5000", "timeout_ms = 0", "timeout_ms"),
            ("timeout_ms = 5000", "fuel = 0", "fuel"),
            ("[limits]", "[limits]\nswap = 1", "unknown field"),
            ("backend = ", "Backend = ", "config: key"),
        ];
        for (from, to, expect) in cases {
            let reason = refusal(|s| s.replacen(from, to, 1));
            assert!(reason.contains(expect), "{from} → {to}: {reason}");
        }
    }

    #[test]
    fn a_secret_never_goes_in_clear_text_beyond_this_machine() {
        // No `to`: every allowed destination, plain http to a name among them.
        let reason = refusal(|s| {
            s.replace("to = [\"search.example:443\"]", "")
                .replace("\"[::1]:9\"", "\"[::1]:9\", \"http://search.local:80\"")
        });
        assert!(
            reason.contains("\"BRAVE_API_KEY\" would go in clear text to http://search.local:80"),
            "{reason}"
        );
        // Named in `to`, and a non-loopback address literal: refused too.
        let reason = refusal(|s| {
            s.replace("\"[::1]:9\"", "\"[::1]:9\", \"http://10.0.0.1:80\"")
                .replace(
                    "to = [\"search.example:443\"]",
                    "to = [\"http://10.0.0.1:80\"]",
                )
        });
        assert!(reason.contains("http://10.0.0.1:80"), "{reason}");
        // Loopback literals over plain http, and https anywhere: fine.
        let m = SkillManifest::parse(&GOOD.replace("to = [\"search.example:443\"]", ""))
            .expect("https and loopback only");
        assert!(m.destinations().iter().all(Destination::keeps_secrets));
        let ok = GOOD.replace(
            "to = [\"search.example:443\"]",
            "to = [\"http://127.0.0.1:8888\", \"search.example:443\"]",
        );
        SkillManifest::parse(&ok).expect("loopback http");
    }

    #[test]
    fn secrets_need_somewhere_to_go() {
        let reason = refusal(|s| {
            s.replace(
                r#""search.example:443", "http://127.0.0.1:8888", "[::1]:9""#,
                "",
            )
        });
        assert!(reason.contains("nowhere"), "{reason}");
    }

    #[test]
    fn names_are_never_paths() {
        for bad in ["", "a/b", "..", "-a", "1a", "a.b", &"a".repeat(65)] {
            assert!(!valid_skill_name(bad), "{bad:?}");
        }
        assert!(valid_skill_name("web-search2"));
    }
}
