//! How an image tells its guest agent which agent runtime to start: a JSON
//! [`RuntimeDescriptor`] at [`DESCRIPTOR_PATH`] in the (verity-protected) rootfs, written
//! by `clawos image build`. An image without one runs the built-in runtime
//! (`/sbin/clawos-agentd`) if it has it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where the descriptor lives in the rootfs.
pub const DESCRIPTOR_PATH: &str = "/etc/clawos/runtime.json";

/// The longest [`RuntimeDescriptor::ready_timeout_secs`] the guest accepts.
pub const MAX_READY_TIMEOUT_SECS: u64 = 3600;

/// The variable naming the MCP server of the host's skills (in the VM's environment
/// file when the host offers skills, and in the runtime's environment then).
pub const MCP_URL_VAR: &str = "CLAWOS_MCP_URL";

/// How the guest agent starts an image's agent runtime. The runtime runs as the `agent`
/// user (uid 1000) with no new privileges, in the audited agent cgroup, its working
/// directory `/workspace`, restarted whenever it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeDescriptor {
    /// Its name (`openclaw`): reported to the host, and the prefix of its console lines.
    pub name: String,
    /// Its version (for the host's view and the logs).
    pub version: String,
    /// The program (an absolute path in the rootfs) and its arguments.
    pub argv: Vec<String>,
    /// Its whole environment besides `PATH`, `HOME`, `USER` and the two below.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The variable that carries the VM's model (`--model` at start); `None`: the
    /// runtime is not told.
    #[serde(default)]
    pub model_env: Option<String>,
    /// The model when the VM was started without one.
    #[serde(default)]
    pub default_model: Option<String>,
    /// The variable that carries the per-boot gateway token; `None`: no token.
    #[serde(default)]
    pub gateway_token_env: Option<String>,
    /// `HOME`, an absolute path under `/workspace` (made if missing, owned by the
    /// agent user).
    pub home: String,
    /// Directories under `/workspace` (relative paths) made before each start and owned
    /// by the agent user: its state, which survives a restart of the VM.
    #[serde(default)]
    pub workspace_dirs: Vec<String>,
    /// How long it may take from start to answering `GET /healthz` on guest port 18789
    /// before the boot fails.
    pub ready_timeout_secs: u64,
    /// Set over `env` only when the host offers skills (the VM's `.env` names the MCP
    /// server, `CLAWOS_MCP_URL`, which the runtime then gets too): e.g. a config file
    /// that declares that server, which a runtime in a VM without skills must not get
    /// (it would find nothing there).
    #[serde(default)]
    pub skills_env: BTreeMap<String, String>,
}

impl RuntimeDescriptor {
    /// Checks what the guest relies on; the reason names the field.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(format!(
                "name {:?}: 1-32 lowercase letters, digits or '-'",
                self.name
            ));
        }
        match self.argv.first() {
            Some(p) if p.starts_with('/') => {}
            _ => return Err("argv: must start with an absolute program path".into()),
        }
        let relative_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('/')
                && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        };
        if let Some(d) = self.workspace_dirs.iter().find(|d| !relative_ok(d)) {
            return Err(format!(
                "workspace_dirs: {d:?} is not a plain relative path under /workspace"
            ));
        }
        match self.home.strip_prefix("/workspace/") {
            Some(rest) if relative_ok(rest) => {}
            _ => {
                return Err(format!(
                    "home {:?}: must be a directory under /workspace",
                    self.home
                ));
            }
        }
        let var_ok = |v: &str| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        };
        for v in [&self.model_env, &self.gateway_token_env]
            .into_iter()
            .flatten()
            .chain(self.env.keys())
            .chain(self.skills_env.keys())
        {
            if !var_ok(v) {
                return Err(format!("environment variable name {v:?}"));
            }
        }
        // What the guest agent sets itself is not the descriptor's to set (or, in
        // `skills_env`, to replace).
        let own = ["PATH", "HOME", "USER", MCP_URL_VAR]
            .into_iter()
            .chain(self.model_env.as_deref())
            .chain(self.gateway_token_env.as_deref());
        for v in own {
            if let Some(field) = [("env", &self.env), ("skills_env", &self.skills_env)]
                .into_iter()
                .find_map(|(f, m)| m.contains_key(v).then_some(f))
            {
                return Err(format!("{field}: {v} is set by the guest agent"));
            }
        }
        if let Some((k, _)) = self
            .env
            .iter()
            .chain(&self.skills_env)
            .find(|(_, v)| v.contains('\0'))
        {
            return Err(format!("environment variable {k}: value holds a NUL byte"));
        }
        if self.ready_timeout_secs == 0 || self.ready_timeout_secs > MAX_READY_TIMEOUT_SECS {
            return Err(format!(
                "ready_timeout_secs {}: must be 1 to {MAX_READY_TIMEOUT_SECS}",
                self.ready_timeout_secs
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openclaw() -> RuntimeDescriptor {
        RuntimeDescriptor {
            name: "openclaw".into(),
            version: "2026.9.6".into(),
            argv: vec!["/opt/node/bin/node".into(), "x.mjs".into()],
            env: BTreeMap::from([("OPENCLAW_STATE_DIR".into(), "/workspace/.openclaw".into())]),
            model_env: Some("CLAWOS_MODEL".into()),
            default_model: Some("claude-sonnet-4-5".into()),
            gateway_token_env: Some("OPENCLAW_GATEWAY_TOKEN".into()),
            home: "/workspace/.openclaw/home".into(),
            workspace_dirs: vec![".openclaw".into()],
            ready_timeout_secs: 600,
            skills_env: BTreeMap::from([(
                "OPENCLAW_CONFIG_PATH".into(),
                "/etc/openclaw/openclaw-skills.json".into(),
            )]),
        }
    }

    #[test]
    fn a_good_descriptor_passes_and_round_trips() {
        let d = openclaw();
        d.validate().expect("valid");
        let json = serde_json::to_string(&d).expect("json");
        assert_eq!(
            serde_json::from_str::<RuntimeDescriptor>(&json).expect("parse"),
            d
        );
    }

    /// A way to spoil a descriptor, and the field its refusal must name.
    type Spoil = (fn(&mut RuntimeDescriptor), &'static str);

    #[test]
    fn each_bad_field_is_named() {
        let cases: [Spoil; 10] = [
            (|d| d.name = "Open Claw".into(), "name"),
            (|d| d.argv = vec!["node".into()], "argv"),
            (
                |d| d.workspace_dirs = vec!["../etc".into()],
                "workspace_dirs",
            ),
            (|d| d.home = "/root".into(), "home"),
            (
                |d| d.gateway_token_env = Some("TOKEN=x".into()),
                "environment",
            ),
            (|d| d.ready_timeout_secs = 0, "ready_timeout_secs"),
            (
                |d| {
                    d.skills_env.insert("PATH".into(), "/tmp".into());
                },
                "skills_env: PATH is set by the guest agent",
            ),
            (
                |d| {
                    d.skills_env
                        .insert("OPENCLAW_GATEWAY_TOKEN".into(), "known".into());
                },
                "skills_env: OPENCLAW_GATEWAY_TOKEN",
            ),
            (
                |d| {
                    d.env.insert(MCP_URL_VAR.into(), "http://x".into());
                },
                "env: CLAWOS_MCP_URL",
            ),
            (
                |d| {
                    d.env.insert("A".into(), "x\0y".into());
                },
                "NUL",
            ),
        ];
        for (break_it, field) in cases {
            let mut d = openclaw();
            break_it(&mut d);
            let e = d.validate().expect_err(field);
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(openclaw()).expect("json");
        v["run_as_root"] = true.into();
        assert!(serde_json::from_value::<RuntimeDescriptor>(v).is_err());
    }
}
