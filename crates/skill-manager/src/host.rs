//! The installed skills and their calls: what the operator API and the MCP server
//! share. Installing checks the whole bundle (signature, manifest, a component that
//! loads and answers `describe` within its limits) before anything is stored; every
//! call is audited.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use clawos_skill_manager_api::{CallResult, InstallSkill, RequestSummary, SkillInfo};
use ed25519_dalek::VerifyingKey;

use crate::SkillError;
use crate::bundle;
use crate::manifest::validate_config;
use crate::outbound::SecretHeader;
use crate::runtime::{LoadedSkill, SkillRuntime};
use crate::store::{SkillStore, StoreError, StoredSkill};

/// Why an operator request failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Skill(#[from] SkillError),
    #[error(transparent)]
    Bundle(#[from] crate::BundleError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("no skill named {0:?} is installed")]
    NotFound(String),
    #[error("skill {skill:?} is not enabled for agent {agent:?}")]
    NotEnabled { skill: String, agent: String },
    #[error("audit trail {}: {source}", path.display())]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An agent, as its verified token says.
    Agent { agent: String, vm_id: String },
    /// The operator (a test call through the operator API).
    Operator,
}

/// A loaded skill with what this host adds to it.
#[derive(Debug)]
struct Installed {
    loaded: LoadedSkill,
    info: SkillInfo,
    config: Arc<BTreeMap<String, String>>,
}

/// The JSONL audit trail of skill calls (`<state>/skills/audit.jsonl`, 0600).
#[derive(Debug)]
struct Audit {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Audit {
    fn open(path: &Path) -> Result<Self, HostError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| HostError::Audit {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    fn write(&self, record: &serde_json::Value) -> Result<(), HostError> {
        let mut line = record.to_string();
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_data())
            .map_err(|source| HostError::Audit {
                path: self.path.clone(),
                source,
            })
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// The skills of this host.
#[derive(Debug)]
pub struct SkillHost {
    store: SkillStore,
    runtime: SkillRuntime,
    key: Option<VerifyingKey>,
    secrets: HashMap<String, String>,
    skills: RwLock<BTreeMap<String, Arc<Installed>>>,
    enabled: RwLock<BTreeMap<String, Vec<String>>>,
    audit: Audit,
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl SkillHost {
    /// Opens the store in `dir`, loads (compiles or takes from the cache) every
    /// installed skill. A stored skill that no longer loads is logged and skipped.
    pub fn open(
        dir: &Path,
        runtime: SkillRuntime,
        key: Option<VerifyingKey>,
        secrets: HashMap<String, String>,
    ) -> Result<Self, HostError> {
        let store = SkillStore::open(dir)?;
        let audit = Audit::open(&dir.join("audit.jsonl"))?;
        let host = Self {
            store,
            runtime,
            key,
            secrets,
            skills: RwLock::default(),
            enabled: RwLock::default(),
            audit,
        };
        for s in host.store.all()? {
            if host.key.is_some() && !s.signed {
                // Installed while this daemon had no key: not trusted now that it has.
                tracing::error!(skill = %s.name, "installed unsigned, and a signing key is now configured: not loaded (remove it and install it signed)");
                continue;
            }
            match host.load(&s) {
                Ok(i) => {
                    host.write_skills().insert(s.name.clone(), Arc::new(i));
                }
                Err(e) => {
                    tracing::error!(skill = %s.name, error = %e, "installed skill does not load; skipped")
                }
            }
        }
        let mut en = BTreeMap::<String, Vec<String>>::new();
        for (skill, agent) in host.store.enablements()? {
            en.entry(skill).or_default().push(agent);
        }
        *host.enabled.write().unwrap_or_else(|p| p.into_inner()) = en;
        Ok(host)
    }

    fn write_skills(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Installed>>> {
        self.skills.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_skills(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Installed>>> {
        self.skills.read().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, s: &StoredSkill) -> Result<Installed, HostError> {
        let manifest = crate::manifest::SkillManifest::parse(&s.manifest)?;
        let loaded = self.runtime.load(&manifest, &s.component)?;
        let mut config = manifest.config.clone();
        config.extend(s.config.clone());
        let info = SkillInfo {
            name: s.name.clone(),
            version: manifest.version.clone(),
            description: manifest.description.clone(),
            digest: s.digest.clone(),
            signed: s.signed,
            installed_at: s.installed_at.clone(),
            http_allow: manifest.capabilities.http.allow.clone(),
            secrets: manifest
                .capabilities
                .secrets
                .iter()
                .map(|g| g.name.clone())
                .collect(),
            config: config.clone(),
            agents: Vec::new(),
        };
        Ok(Installed {
            loaded,
            info,
            config: Arc::new(config),
        })
    }

    /// Installs an uploaded bundle. Nothing is stored unless every check passes.
    pub async fn install(&self, req: InstallSkill) -> Result<SkillInfo, HostError> {
        let component = base64::engine::general_purpose::STANDARD
            .decode(req.component_base64.as_bytes())
            .map_err(|e| HostError::Invalid(format!("component_base64: {e}")))?;
        validate_config(&req.config).map_err(|r| HostError::Invalid(format!("config: {r}")))?;
        let b = bundle::from_parts(
            req.manifest.into_bytes(),
            component,
            req.instructions.map(String::into_bytes),
            req.signature.as_deref().map(str::as_bytes),
            self.key.as_ref(),
            Path::new(bundle::SIGNATURE_FILE),
        )?;
        let stored = StoredSkill {
            name: b.manifest.name.clone(),
            manifest: b.manifest_text.clone(),
            component: b.component,
            instructions: b.instructions,
            signed: b.signed,
            digest: b.digest,
            installed_at: now(),
            config: req.config,
        };
        let installed = self.load(&stored)?;
        // It must run: `describe` within its own limits.
        let d = self.runtime.describe(&installed.loaded).await;
        if let Err(e) = d.result {
            return Err(HostError::Invalid(format!("describe failed: {e}")));
        }
        self.store.insert(&stored)?;
        let info = installed.info.clone();
        self.write_skills()
            .insert(stored.name.clone(), Arc::new(installed));
        tracing::info!(skill = %info.name, version = %info.version, signed = info.signed, digest = %info.digest, "skill installed");
        Ok(info)
    }

    /// Every installed skill, with the agents it is enabled for.
    pub fn list(&self) -> Vec<SkillInfo> {
        let enabled = self.enabled.read().unwrap_or_else(|p| p.into_inner());
        self.read_skills()
            .values()
            .map(|i| {
                let mut info = i.info.clone();
                info.agents = enabled.get(&info.name).cloned().unwrap_or_default();
                info
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<SkillInfo, HostError> {
        self.list()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| HostError::NotFound(name.to_owned()))
    }

    pub fn remove(&self, name: &str) -> Result<(), HostError> {
        if !self.store.remove(name)? {
            return Err(HostError::NotFound(name.to_owned()));
        }
        self.write_skills().remove(name);
        self.enabled
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        tracing::info!(skill = %name, "skill removed");
        Ok(())
    }

    pub fn enable(&self, name: &str, agent: &str) -> Result<(), HostError> {
        if !self.store.enable(name, agent)? {
            return Err(HostError::NotFound(name.to_owned()));
        }
        let mut en = self.enabled.write().unwrap_or_else(|p| p.into_inner());
        let agents = en.entry(name.to_owned()).or_default();
        if !agents.iter().any(|a| a == agent) {
            agents.push(agent.to_owned());
            agents.sort();
        }
        Ok(())
    }

    pub fn disable(&self, name: &str, agent: &str) -> Result<(), HostError> {
        if !self.read_skills().contains_key(name) {
            return Err(HostError::NotFound(name.to_owned()));
        }
        self.store.disable(name, agent)?;
        if let Some(a) = self
            .enabled
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(name)
        {
            a.retain(|x| x != agent);
        }
        Ok(())
    }

    /// The skills `agent` may see and call, with their input schemas.
    pub fn tools_for(&self, agent: &str) -> Vec<(SkillInfo, serde_json::Value)> {
        let enabled = self.enabled.read().unwrap_or_else(|p| p.into_inner());
        self.read_skills()
            .values()
            .filter(|i| {
                enabled
                    .get(&i.info.name)
                    .is_some_and(|a| a.iter().any(|x| x == agent))
            })
            .map(|i| (i.info.clone(), i.loaded.manifest.input_schema.clone()))
            .collect()
    }

    /// Runs skill `name` for `caller`; an agent must have it enabled (a disabled skill
    /// answers as if it did not exist). The call is audited whatever its outcome.
    pub async fn call(
        &self,
        name: &str,
        caller: &Caller,
        input: &serde_json::Value,
    ) -> Result<CallResult, HostError> {
        let installed = self
            .read_skills()
            .get(name)
            .cloned()
            .ok_or_else(|| HostError::NotFound(name.to_owned()))?;
        if let Caller::Agent { agent, .. } = caller {
            let ok = self
                .enabled
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .is_some_and(|a| a.iter().any(|x| x == agent));
            if !ok {
                return Err(HostError::NotFound(name.to_owned()));
            }
        }
        let secrets: Vec<SecretHeader> = installed
            .loaded
            .manifest
            .capabilities
            .secrets
            .iter()
            .filter_map(|g| {
                let value = self.secrets.get(&g.name)?;
                SecretHeader::for_grant(g, value)
            })
            .collect();
        let input_text = input.to_string();
        let out = self
            .runtime
            .invoke(
                &installed.loaded,
                &input_text,
                secrets,
                Arc::clone(&installed.config),
            )
            .await;
        let (output, error) = match out.result {
            Ok(o) => (Some(o), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let requests: Vec<RequestSummary> = out
            .requests
            .iter()
            .map(|r| RequestSummary {
                destination: r.destination.clone(),
                allowed: r.allowed,
                status: r.status,
                bytes: r.bytes,
            })
            .collect();
        let duration_ms = out.duration.as_millis() as u64;
        let (agent, vm_id) = match caller {
            Caller::Agent { agent, vm_id } => (Some(agent.as_str()), Some(vm_id.as_str())),
            Caller::Operator => (None, None),
        };
        self.audit.write(&serde_json::json!({
            "time": now(),
            "kind": "skill_call",
            "skill": name,
            "version": installed.info.version,
            "caller": if agent.is_some() { "agent" } else { "operator" },
            "agent": agent,
            "vm_id": vm_id,
            "ok": error.is_none(),
            "error": error,
            "duration_ms": duration_ms,
            "input_bytes": input_text.len(),
            "output_bytes": output.as_ref().map_or(0, String::len),
            "requests": requests,
            "log": out.log.iter().map(|(l, m)| format!("{l:?}: {m}")).collect::<Vec<_>>(),
        }))?;
        Ok(CallResult {
            output,
            error,
            duration_ms,
            requests,
        })
    }
}
