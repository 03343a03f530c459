//! `clawos.toml`: one host's configuration. The documented file in this crate
//! ([`DEFAULTS`]) is the defaults; an operator's file is laid over it key by key, then
//! the environment (`CLAWOS_<SECTION>_<KEY>`). Every key the operator or the
//! environment sets must exist in the defaults with the same type, so a typo is an
//! error naming the key, never a setting silently ignored. The result is checked as a
//! whole before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The documented defaults (`crates/host/clawos.toml`), printed by
/// `clawos config default`.
pub const DEFAULTS: &str = include_str!("../clawos.toml");

/// Why a configuration cannot be used. Each names the file, key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not TOML: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: unknown key {key:?} (the keys here: {known})")]
    UnknownKey {
        origin: String,
        key: String,
        known: String,
    },
    #[error("{origin}: {key} must be {expected}, not {got}")]
    WrongType {
        origin: String,
        key: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("{var}: {why} (it sets {key})")]
    Env {
        var: String,
        key: String,
        why: String,
    },
    #[error("{key}: {why}")]
    Invalid { key: String, why: String },
}

/// One host, every daemon in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub state_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub start_timeout_secs: u64,
    pub stop_timeout_secs: u64,
    pub identity: Identity,
    pub proxy: Proxy,
    pub skills: Skills,
    pub monitor: Monitor,
    pub launcher: Launcher,
    pub orchestrator: Orchestrator,
    pub control_plane: ControlPlane,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    pub addr: String,
    pub anthropic_url: String,
    pub anthropic_key_file: PathBuf,
    pub rpm: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skills {
    pub enabled: bool,
    pub addr: String,
    pub resolve: Vec<String>,
    pub agent_calls_per_minute: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    pub enabled: bool,
    pub addr: String,
    pub syslog: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launcher {
    pub addr: String,
    pub image: PathBuf,
    pub signing_pubkey: String,
    pub backend: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Orchestrator {
    pub enabled: bool,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    pub enabled: bool,
    pub addr: String,
    pub tls_names: Vec<String>,
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

/// Lays `over` onto `base`: every key of `over` must be in `base`, with the same type
/// (lists of strings stay lists of strings).
fn merge(
    base: &mut toml::Table,
    over: toml::Table,
    prefix: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    for (k, v) in over {
        let key = format!("{prefix}{k}");
        let Some(slot) = base.get_mut(&k) else {
            return Err(ConfigError::UnknownKey {
                origin: origin.to_owned(),
                key,
                known: base.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        match (slot, v) {
            (toml::Value::Table(b), toml::Value::Table(o)) => {
                merge(b, o, &format!("{key}."), origin)?;
            }
            (slot, v) if std::mem::discriminant(slot) == std::mem::discriminant(&v) => {
                if let toml::Value::Array(items) = &v
                    && let Some(bad) = items.iter().find(|i| !i.is_str())
                {
                    return Err(ConfigError::WrongType {
                        origin: origin.to_owned(),
                        key,
                        expected: "a list of strings",
                        got: type_name(bad),
                    });
                }
                *slot = v;
            }
            (slot, v) => {
                return Err(ConfigError::WrongType {
                    origin: origin.to_owned(),
                    key,
                    expected: type_name(slot),
                    got: type_name(&v),
                });
            }
        }
    }
    Ok(())
}

/// `CLAWOS_<SECTION>_<KEY>` (or `CLAWOS_<KEY>` at the top), parsed as the default's type.
fn apply_env(
    table: &mut toml::Table,
    section: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (k, slot) in table.iter_mut() {
        if let toml::Value::Table(t) = slot {
            apply_env(t, Some(k), env)?;
            continue;
        }
        let key = section.map_or_else(|| k.clone(), |s| format!("{s}.{k}"));
        let var = format!("CLAWOS_{}", key.replace('.', "_").to_ascii_uppercase());
        let Some(text) = env(&var) else {
            continue;
        };
        let bad = |why: String| ConfigError::Env {
            var: var.clone(),
            key: key.clone(),
            why,
        };
        *slot = match slot {
            toml::Value::String(_) => toml::Value::String(text),
            toml::Value::Integer(_) => toml::Value::Integer(
                text.trim()
                    .parse()
                    .map_err(|_| bad(format!("{text:?} is not an integer")))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(match text.trim() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(bad(format!("{text:?} is not true or false"))),
            }),
            toml::Value::Array(_) => toml::Value::Array(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
            other => {
                return Err(bad(format!(
                    "{} cannot be set from the environment",
                    type_name(other)
                )));
            }
        };
    }
    Ok(())
}

impl HostConfig {
    /// The defaults, `file` over them (if given), the environment over both; checked.
    /// `default_state_dir` stands in for an empty `state_dir`.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        default_state_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(DEFAULTS).map_err(|e| ConfigError::Parse {
            path: "built-in defaults".into(),
            message: e.to_string(),
        })?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let over: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.message().to_owned(),
            })?;
            merge(&mut table, over, "", &path.display().to_string())?;
        }
        apply_env(&mut table, None, env)?;
        let mut cfg: Self =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    key: "(whole file)".into(),
                    why: e.message().to_owned(),
                })?;
        if cfg.state_dir.as_os_str().is_empty() {
            cfg.state_dir = default_state_dir.to_owned();
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The image bundle the launcher boots by default.
    pub fn image(&self) -> PathBuf {
        if self.launcher.image.as_os_str().is_empty() {
            self.state_dir.join("images/default")
        } else {
            self.launcher.image.clone()
        }
    }

    /// Checks what the types cannot: addresses, lists' entries, choices.
    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, why: String| ConfigError::Invalid {
            key: key.to_owned(),
            why,
        };
        if !self.state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!("{} is not an absolute path", self.state_dir.display()),
            ));
        }
        for (key, v) in [
            ("start_timeout_secs", self.start_timeout_secs),
            ("stop_timeout_secs", self.stop_timeout_secs),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, format!("{v} is not 1–3600 seconds")));
            }
        }
        let mut taken: Vec<(&str, SocketAddr)> = Vec::new();
        for (key, text, enabled, loopback_only) in [
            ("identity.addr", &self.identity.addr, true, true),
            ("proxy.addr", &self.proxy.addr, true, true),
            ("skills.addr", &self.skills.addr, self.skills.enabled, true),
            (
                "monitor.addr",
                &self.monitor.addr,
                self.monitor.enabled,
                true,
            ),
            ("launcher.addr", &self.launcher.addr, true, true),
            (
                "orchestrator.addr",
                &self.orchestrator.addr,
                self.orchestrator.enabled,
                true,
            ),
            (
                "control_plane.addr",
                &self.control_plane.addr,
                self.control_plane.enabled,
                false,
            ),
        ] {
            let addr: SocketAddr = text
                .parse()
                .map_err(|_| invalid(key, format!("{text:?} is not an IP:port address")))?;
            if !enabled {
                continue;
            }
            if loopback_only && !addr.ip().is_loopback() {
                return Err(invalid(
                    key,
                    format!(
                        "{addr} is not a loopback address: only the control plane listens beyond this machine"
                    ),
                ));
            }
            if addr.port() == 0 {
                return Err(invalid(
                    key,
                    "port 0: the CLI and the other daemons must know where it listens".into(),
                ));
            }
            let clash = taken.iter().find(|(_, t)| {
                t.port() == addr.port()
                    && (t.ip() == addr.ip()
                        || t.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some((other, _)) = clash {
                return Err(invalid(key, format!("{addr} is taken by {other}")));
            }
            taken.push((key, addr));
        }
        if !self.proxy.anthropic_url.starts_with("https://")
            && !self.proxy.anthropic_url.starts_with("http://")
        {
            return Err(invalid(
                "proxy.anthropic_url",
                format!("{:?} is not an http(s) URL", self.proxy.anthropic_url),
            ));
        }
        if self.proxy.rpm == 0 {
            return Err(invalid("proxy.rpm", "0 would refuse every request".into()));
        }
        if self.skills.agent_calls_per_minute == 0 {
            return Err(invalid(
                "skills.agent_calls_per_minute",
                "0 would refuse every call".into(),
            ));
        }
        for r in &self.skills.resolve {
            let ok = r.split_once('=').is_some_and(|(name, ip)| {
                !name.is_empty() && ip.parse::<std::net::IpAddr>().is_ok()
            });
            if !ok {
                return Err(invalid("skills.resolve", format!("{r:?} is not NAME=IP")));
            }
        }
        for s in &self.monitor.syslog {
            if !["tcp://", "udp://", "tls://"]
                .iter()
                .any(|p| s.starts_with(p))
            {
                return Err(invalid(
                    "monitor.syslog",
                    format!("{s:?} is not tcp://, udp:// or tls://IP:PORT"),
                ));
            }
        }
        if !["auto", "qemu", "firecracker"].contains(&self.launcher.backend.as_str()) {
            return Err(invalid(
                "launcher.backend",
                format!(
                    "{:?} is not auto, qemu or firecracker",
                    self.launcher.backend
                ),
            ));
        }
        let k = &self.launcher.signing_pubkey;
        if !k.is_empty() && (k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(invalid(
                "launcher.signing_pubkey",
                "not 64 hex digits (an Ed25519 public key)".into(),
            ));
        }
        if self.control_plane.enabled && self.control_plane.tls_names.is_empty() {
            return Err(invalid(
                "control_plane.tls_names",
                "its certificate needs at least one name".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<HostConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("clawos.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).expect("write");
        }
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        HostConfig::load(
            file.map(|_| path.as_path()),
            &|k| env.get(k).cloned(),
            Path::new("/var/lib/clawos"),
        )
    }

    #[test]
    fn the_documented_file_is_the_whole_default() {
        // Every field is in the file (the struct has no serde defaults: a missing key
        // would fail here), and the file parses as it is.
        let cfg = load(None, &[]).expect("defaults");
        assert_eq!(cfg.state_dir, Path::new("/var/lib/clawos"));
        assert_eq!(cfg.identity.addr, "127.0.0.1:2082");
        assert!(cfg.monitor.enabled && !cfg.control_plane.enabled);
        assert_eq!(cfg.image(), Path::new("/var/lib/clawos/images/default"));
        // And what it prints loads back to the same.
        let again = load(Some(&cfg.to_toml()), &[]).expect("round trip");
        assert_eq!(again, cfg);
    }

    #[test]
    fn a_file_and_the_environment_override_key_by_key() {
        let cfg = load(
            Some("stop_timeout_secs = 5\n[proxy]\nrpm = 7\n[skills]\nresolve = [\"search.local=127.0.0.1\"]\n"),
            &[
                ("CLAWOS_PROXY_ANTHROPIC_URL", "http://127.0.0.1:9"),
                ("CLAWOS_MONITOR_ENABLED", "no"),
                ("CLAWOS_MONITOR_SYSLOG", "tcp://127.0.0.1:514, udp://127.0.0.1:514"),
                ("CLAWOS_PROXY_RPM", "9"),
                ("CLAWOS_STATE_DIR", "/srv/clawos"),
            ],
        )
        .expect("config");
        assert_eq!(cfg.stop_timeout_secs, 5);
        assert_eq!(cfg.proxy.rpm, 9, "the environment wins over the file");
        assert_eq!(cfg.proxy.anthropic_url, "http://127.0.0.1:9");
        assert_eq!(cfg.skills.resolve, ["search.local=127.0.0.1"]);
        assert!(!cfg.monitor.enabled);
        assert_eq!(cfg.monitor.syslog.len(), 2);
        assert_eq!(cfg.state_dir, Path::new("/srv/clawos"));
        assert_eq!(cfg.proxy.addr, "127.0.0.1:11435", "the rest stays default");
    }

    #[test]
    fn each_mistake_is_named() {
        /// A file (or none), the environment, what the error must say.
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                Some("[proxy]\nadr = \"x\"\n"),
                &[],
                "unknown key \"proxy.adr\"",
            ),
            (Some("[proxi]\n"), &[], "unknown key \"proxi\""),
            (
                Some("[proxy]\nrpm = \"fast\"\n"),
                &[],
                "proxy.rpm must be an integer, not a string",
            ),
            (
                Some("[skills]\nresolve = [1]\n"),
                &[],
                "skills.resolve must be a list of strings",
            ),
            (Some("[proxy\n"), &[], "not TOML"),
            (
                None,
                &[("CLAWOS_PROXY_RPM", "many")],
                "CLAWOS_PROXY_RPM: \"many\" is not an integer (it sets proxy.rpm)",
            ),
            (
                None,
                &[("CLAWOS_SKILLS_ENABLED", "maybe")],
                "CLAWOS_SKILLS_ENABLED",
            ),
            (
                Some("[identity]\naddr = \"0.0.0.0:2082\"\n"),
                &[],
                "identity.addr: 0.0.0.0:2082 is not a loopback address",
            ),
            (
                Some("[identity]\naddr = \"localhost\"\n"),
                &[],
                "identity.addr: \"localhost\" is not an IP:port",
            ),
            (
                Some("[proxy]\naddr = \"127.0.0.1:2082\"\n"),
                &[],
                "proxy.addr: 127.0.0.1:2082 is taken by identity.addr",
            ),
            (
                Some("[control_plane]\nenabled = true\naddr = \"0.0.0.0:2080\"\n"),
                &[],
                "control_plane.addr: 0.0.0.0:2080 is taken by launcher.addr",
            ),
            (
                Some("[skills]\nresolve = [\"search.local\"]\n"),
                &[],
                "skills.resolve: \"search.local\" is not NAME=IP",
            ),
            (
                Some("[monitor]\nsyslog = [\"10.0.0.1:514\"]\n"),
                &[],
                "monitor.syslog",
            ),
            (
                Some("[launcher]\nbackend = \"kvmtool\"\n"),
                &[],
                "launcher.backend",
            ),
            (
                Some("[launcher]\nsigning_pubkey = \"abc\"\n"),
                &[],
                "launcher.signing_pubkey",
            ),
            (
                Some("state_dir = \"relative\"\n"),
                &[],
                "state_dir: relative is not an absolute path",
            ),
            (Some("start_timeout_secs = 0\n"), &[], "start_timeout_secs"),
            (
                Some("[proxy]\nanthropic_url = \"api.anthropic.com\"\n"),
                &[],
                "proxy.anthropic_url",
            ),
        ];
        for (file, env, expect) in cases {
            let e = load(*file, env).expect_err(expect).to_string();
            assert!(e.contains(expect), "{file:?} {env:?}: {e}");
        }
        // A disabled daemon's address may be anything: it is not used.
        load(
            Some("[skills]\nenabled = false\naddr = \"127.0.0.1:2082\"\n"),
            &[],
        )
        .expect("disabled");
    }
}
