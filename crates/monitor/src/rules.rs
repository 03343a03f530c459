//! Per-agent syscall rules: a deny list (a match is an alert) and an optional allow
//! list (anything outside it is an alert). Every agent gets the default rules, merged
//! with its own.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// Syscalls a VMM or agent process has no business making: an alert by default.
pub const DEFAULT_DENY: &[&str] = &[
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "mount",
    "umount2",
    "pivot_root",
    "swapon",
    "swapoff",
    "reboot",
    "bpf",
    "setns",
];

/// One agent's (or the default) rules, as configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// Syscall names that raise an alert.
    #[serde(default)]
    pub deny: Vec<String>,
    /// When set, syscalls not named here raise an alert.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Alert severity, 0–10 (CEF scale).
    #[serde(default)]
    pub severity: Option<u8>,
}

/// The rules file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default)]
    pub default: Option<RuleSet>,
    #[serde(default)]
    pub agents: BTreeMap<String, RuleSet>,
}

/// An invalid rules file.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("rules: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("rules: unknown syscall name {name:?} in {scope}")]
    UnknownSyscall { name: String, scope: String },
    #[error("rules: severity {severity} in {scope} is outside 0-10")]
    Severity { severity: u8, scope: String },
}

#[derive(Debug, Clone)]
struct Compiled {
    deny: BTreeSet<String>,
    allow: Option<BTreeSet<String>>,
    severity: u8,
}

/// Compiled rules, checked for every event.
#[derive(Debug, Clone)]
pub struct Rules {
    default: Compiled,
    agents: BTreeMap<String, Compiled>,
}

fn known(name: &str) -> bool {
    name.parse::<syscalls::x86_64::Sysno>().is_ok()
}

fn compile(set: &RuleSet, base: Option<&Compiled>, scope: &str) -> Result<Compiled, RulesError> {
    for n in set.deny.iter().chain(set.allow.iter().flatten()) {
        if !known(n) {
            return Err(RulesError::UnknownSyscall {
                name: n.clone(),
                scope: scope.into(),
            });
        }
    }
    let severity = set.severity.or(base.map(|b| b.severity)).unwrap_or(8);
    if severity > 10 {
        return Err(RulesError::Severity {
            severity,
            scope: scope.into(),
        });
    }
    let mut deny: BTreeSet<String> = base.map(|b| b.deny.clone()).unwrap_or_default();
    deny.extend(set.deny.iter().cloned());
    let allow = match &set.allow {
        Some(a) => Some(a.iter().cloned().collect()),
        None => base.and_then(|b| b.allow.clone()),
    };
    Ok(Compiled {
        deny,
        allow,
        severity,
    })
}

impl Rules {
    /// The built-in default: [`DEFAULT_DENY`] for everyone.
    pub fn builtin() -> Self {
        Self {
            default: Compiled {
                deny: DEFAULT_DENY.iter().map(|s| (*s).to_owned()).collect(),
                allow: None,
                severity: 8,
            },
            agents: BTreeMap::new(),
        }
    }

    /// Parses and checks a rules file (JSON). Its `default` adds to the built-in deny
    /// list; each agent's rules add to the default.
    pub fn from_json(text: &str) -> Result<Self, RulesError> {
        let file: RulesFile = serde_json::from_str(text)?;
        let builtin = Self::builtin().default;
        let default = match &file.default {
            Some(d) => compile(d, Some(&builtin), "default")?,
            None => builtin,
        };
        let mut agents = BTreeMap::new();
        for (name, set) in &file.agents {
            agents.insert(
                name.clone(),
                compile(set, Some(&default), &format!("agent {name}"))?,
            );
        }
        Ok(Self { default, agents })
    }

    /// The rule a syscall by `agent` breaks, with its severity.
    pub fn check(&self, agent: Option<&str>, syscall: &str) -> Option<(String, u8)> {
        let r = agent
            .and_then(|a| self.agents.get(a))
            .unwrap_or(&self.default);
        if r.deny.contains(syscall) {
            return Some((format!("deny:{syscall}"), r.severity));
        }
        if let Some(allow) = &r.allow
            && !allow.contains(syscall)
        {
            return Some((format!("not-allowed:{syscall}"), r.severity));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_agent_lists_and_bad_files() {
        let r = Rules::builtin();
        assert_eq!(
            r.check(Some("a"), "ptrace"),
            Some(("deny:ptrace".into(), 8))
        );
        assert_eq!(r.check(None, "getppid"), None);
        let r = Rules::from_json(
            r#"{"default":{"deny":["kill"]},
                "agents":{"strict":{"allow":["read","write","getppid"],"severity":10}}}"#,
        )
        .expect("rules");
        assert_eq!(
            r.check(Some("other"), "kill"),
            Some(("deny:kill".into(), 8))
        );
        assert_eq!(r.check(Some("strict"), "getppid"), None);
        assert_eq!(
            r.check(Some("strict"), "openat"),
            Some(("not-allowed:openat".into(), 10))
        );
        assert_eq!(
            r.check(Some("strict"), "mount"),
            Some(("deny:mount".into(), 10))
        );
        let e = Rules::from_json(r#"{"agents":{"x":{"deny":["nosuchcall"]}}}"#).expect_err("bad");
        assert!(
            e.to_string().contains("nosuchcall") && e.to_string().contains("agent x"),
            "{e}"
        );
        assert!(Rules::from_json(r#"{"default":{"severity":11}}"#).is_err());
        assert!(Rules::from_json(r#"{"defaults":{}}"#).is_err());
    }
}
