//! The installed skills and their calls: what the operator API and the MCP server
//! share. Installing checks the whole bundle (signature, manifest, a component that
//! loads and answers `describe` within its limits) before anything is stored; every
//! call is audited — refused ones, and ones whose caller went away before the end, too.
//! An agent's calls are limited per minute and in flight ([`AgentLimits`]).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use clawos_service::limits::{Decision, InFlight, RateLimiter};
use clawos_skill_manager_api::{
    CallResult, CallerKind, InstallSkill, RecordKind, RequestSummary, SkillCallRecord, SkillInfo,
};
use ed25519_dalek::VerifyingKey;

use crate::SkillError;
use crate::bundle;
use crate::manifest::validate_config;
use crate::outbound::{RequestLog, RequestRecord, SecretHeader};
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
    /// The agent used its calls for this minute.
    #[error(
        "agent {agent:?} has made its {per_minute} skill calls for this minute: try again in {retry_after_secs} s"
    )]
    RateLimited {
        agent: String,
        per_minute: u32,
        retry_after_secs: u64,
    },
    /// The agent has its most calls running already.
    #[error("agent {agent:?} has {max} skill calls running already: wait for one to finish")]
    Busy { agent: String, max: usize },
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

/// How much one agent may call: per minute (GCRA: the whole minute's calls may come at
/// once, then one per `60 s / calls_per_minute`) and at once. Operators' calls are
/// not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLimits {
    pub calls_per_minute: u32,
    pub in_flight: usize,
    /// An agent past its limits can send refused calls as fast as it likes: one is
    /// recorded in the trail per agent and reason in this long, the next recorded one
    /// saying how many it stands for (all are counted in `/metrics`).
    pub refusals_recorded_every: std::time::Duration,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            calls_per_minute: 60,
            in_flight: 4,
            refusals_recorded_every: std::time::Duration::from_secs(1),
        }
    }
}

/// A loaded skill with what this host adds to it.
#[derive(Debug)]
struct Installed {
    loaded: LoadedSkill,
    info: SkillInfo,
    config: Arc<BTreeMap<String, String>>,
}

/// The JSONL audit trail of skill calls (`<state>/skills/audit.jsonl`, 0600). When the
/// file at its path is not the one open (an operator's log rotation moved it away), the
/// next record goes to a new file there: monitor-daemon, which follows the path, reads
/// the old file to its end and then the new one.
#[derive(Debug)]
struct Audit {
    path: PathBuf,
    /// The open file and its inode.
    file: Mutex<(std::fs::File, u64)>,
}

impl Audit {
    fn open_file(path: &Path) -> Result<(std::fs::File, u64), HostError> {
        use std::os::unix::fs::MetadataExt;
        let io = |source| HostError::Audit {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let ino = file.metadata().map_err(io)?.ino();
        Ok((file, ino))
    }

    fn open(path: &Path) -> Result<Self, HostError> {
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(Self::open_file(path)?),
        })
    }

    fn write(&self, record: &SkillCallRecord) -> Result<(), HostError> {
        use std::os::unix::fs::MetadataExt;
        let mut line = serde_json::to_string(record).unwrap_or_default();
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let moved = std::fs::symlink_metadata(&self.path).map_or(true, |m| m.ino() != f.1);
        if moved {
            *f = Self::open_file(&self.path)?;
        }
        f.0.write_all(line.as_bytes())
            .and_then(|()| f.0.sync_data())
            .map_err(|source| HostError::Audit {
                path: self.path.clone(),
                source,
            })
    }
}

use std::os::unix::fs::OpenOptionsExt;

fn summaries(requests: &[RequestRecord]) -> Vec<RequestSummary> {
    requests
        .iter()
        .map(|r| RequestSummary {
            destination: r.destination.clone(),
            allowed: r.allowed,
            status: r.status,
            bytes: r.bytes,
        })
        .collect()
}

/// An agent's place among its calls in flight, given back however the call ends.
struct Slot<'a> {
    running: &'a InFlight,
    agent: &'a str,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.running.release(self.agent);
    }
}

/// A call under way: if it is dropped before its answer (the agent's connection went
/// away), its audit record is written as `aborted`, with the requests the skill had
/// made by then.
struct Unfinished<'a> {
    audit: &'a Audit,
    counts: &'a CallCounts,
    started: std::time::Instant,
    requests: RequestLog,
    /// The record as known at the start; `None` once the call has an answer.
    record: Option<SkillCallRecord>,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.counts.running.fetch_sub(1, Ordering::Relaxed);
        let Some(mut rec) = self.record.take() else {
            return;
        };
        self.counts.aborted.fetch_add(1, Ordering::Relaxed);
        let requests = self
            .requests
            .lock()
            .map(|r| summaries(&r))
            .unwrap_or_default();
        rec.time = now();
        rec.aborted = true;
        let why = if std::thread::panicking() {
            "the call failed inside skill-manager (a panic; see its log)"
        } else {
            "the caller went away before the call ended"
        };
        rec.error = Some(why.into());
        rec.duration_ms = self.started.elapsed().as_millis() as u64;
        rec.requests = requests;
        if let Err(e) = self.audit.write(&rec) {
            tracing::error!(error = %e, "cannot write the audit record of an aborted skill call");
        }
    }
}

/// What the audit record keeps of a skill's own words: the record is one line that
/// monitor-daemon reads whole, and a skill must not be able to make it too long to read
/// (and so hide its refused requests). Its first lines and its error, each cut.
const AUDIT_LOG_LINES: usize = 16;
const AUDIT_TEXT_MAX: usize = 512;

/// `s`, cut at a character boundary to at most `max` bytes (with `…` when cut).
fn capped(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn audit_log(log: &[(crate::runtime::LogLevel, String)]) -> Vec<String> {
    let mut out: Vec<String> = log
        .iter()
        .take(AUDIT_LOG_LINES)
        .map(|(l, m)| capped(&format!("{l:?}: {m}"), AUDIT_TEXT_MAX))
        .collect();
    if log.len() > AUDIT_LOG_LINES {
        out.push(format!("… {} more lines", log.len() - AUDIT_LOG_LINES));
    }
    out
}

/// A call's audit record with what is known before it runs (no outcome yet: not ok,
/// no time spent).
fn record_of(skill: &str, version: &str, caller: &Caller) -> SkillCallRecord {
    let (kind, agent, vm_id) = match caller {
        Caller::Agent { agent, vm_id } => (CallerKind::Agent, Some(agent), Some(vm_id)),
        Caller::Operator => (CallerKind::Operator, None, None),
    };
    SkillCallRecord {
        time: now(),
        kind: RecordKind::SkillCall,
        skill: skill.to_owned(),
        version: version.to_owned(),
        caller: kind,
        agent: agent.cloned(),
        vm_id: vm_id.cloned(),
        ok: false,
        error: None,
        refused: None,
        refused_unrecorded_before: None,
        aborted: false,
        duration_ms: 0,
        input_bytes: 0,
        output_bytes: 0,
        requests: Vec::new(),
        log: Vec::new(),
    }
}

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
    limits: AgentLimits,
    rate: RateLimiter,
    running: InFlight,
    counts: CallCounts,
    /// Per agent that has been refused: when its last refusal was recorded, and how
    /// many since were not (an entry per agent an operator enabled a skill for).
    refusals: Mutex<RefusalsSeen>,
}

/// Per agent and reason: when its last refusal was recorded, and how many since were
/// not.
type RefusalsSeen = HashMap<(String, &'static str), (std::time::Instant, u64)>;

/// Whether a refusal at `now` is recorded: the first for its key, or the first after
/// `every` since the last recorded one; if so, how many it stands for besides itself.
fn record_this_one(
    seen: &mut RefusalsSeen,
    (agent, why): (&str, &'static str),
    now: std::time::Instant,
    every: std::time::Duration,
) -> Option<u64> {
    match seen.get_mut(&(agent.to_owned(), why)) {
        Some((last, skipped)) if now.duration_since(*last) < every => {
            *skipped += 1;
            None
        }
        Some((last, skipped)) => {
            *last = now;
            Some(std::mem::take(skipped))
        }
        None => {
            seen.insert((agent.to_owned(), why), (now, 0));
            Some(0)
        }
    }
}

/// How calls have gone since the daemon started (its `/metrics`).
#[derive(Debug, Default)]
pub struct CallCounts {
    /// The skill answered.
    pub answered: AtomicU64,
    /// The skill failed or was stopped (an error, a limit, a refused destination).
    pub failed: AtomicU64,
    /// Refused before running: the agent was past its limits.
    pub refused: AtomicU64,
    /// The caller went away before the answer.
    pub aborted: AtomicU64,
    /// Running now.
    pub running: AtomicI64,
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
        limits: AgentLimits,
    ) -> Result<Self, HostError> {
        let store = SkillStore::open(dir)?;
        let audit = Audit::open(&dir.join(clawos_skill_manager_api::AUDIT_FILE))?;
        let host = Self {
            store,
            runtime,
            key,
            secrets,
            skills: RwLock::default(),
            enabled: RwLock::default(),
            audit,
            limits,
            rate: RateLimiter::per_minute(limits.calls_per_minute),
            running: InFlight::new(limits.in_flight),
            counts: CallCounts::default(),
            refusals: Mutex::default(),
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

    /// How calls have gone so far.
    pub fn counts(&self) -> &CallCounts {
        &self.counts
    }

    /// Whether this refusal of `agent`'s (for `why`) is written to the trail, and then
    /// how many of its refusals for `why` since the last written one were not.
    fn refusal_to_record(&self, agent: &str, why: &'static str) -> Option<u64> {
        let mut seen = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        record_this_one(
            &mut seen,
            (agent, why),
            std::time::Instant::now(),
            self.limits.refusals_recorded_every,
        )
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
    /// answers as if it did not exist) and be within its [`AgentLimits`]. The call is
    /// audited whatever its outcome: refused, answered, failed, or given up by its
    /// caller (the future dropped: written as `aborted`, with the requests the skill
    /// had made).
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
        let mut _slot = None;
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
            // A place among the agent's calls in flight first, so a call refused for
            // that does not use up one of its calls for the minute.
            let refusal = if !self.running.try_acquire(agent) {
                Some(HostError::Busy {
                    agent: agent.clone(),
                    max: self.running.max(),
                })
            } else {
                _slot = Some(Slot {
                    running: &self.running,
                    agent,
                });
                match self.rate.check(agent) {
                    Decision::Allow => None,
                    Decision::Deny { retry_after } => Some(HostError::RateLimited {
                        agent: agent.clone(),
                        per_minute: self.limits.calls_per_minute,
                        retry_after_secs: retry_after.as_secs_f64().ceil() as u64,
                    }),
                }
            };
            if let Some(e) = refusal {
                self.counts.refused.fetch_add(1, Ordering::Relaxed);
                // Not every refusal is written (see `refusals_recorded_every`).
                let why = if matches!(e, HostError::RateLimited { .. }) {
                    "rate limit"
                } else {
                    "in flight"
                };
                if let Some(also) = self.refusal_to_record(agent, why) {
                    let mut rec = record_of(name, &installed.info.version, caller);
                    rec.refused = Some(why.into());
                    rec.refused_unrecorded_before = Some(also);
                    rec.error = Some(e.to_string());
                    self.audit.write(&rec)?;
                }
                return Err(e);
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
        let seen = RequestLog::default();
        self.counts.running.fetch_add(1, Ordering::Relaxed);
        let mut unfinished = Unfinished {
            audit: &self.audit,
            counts: &self.counts,
            started: std::time::Instant::now(),
            requests: Arc::clone(&seen),
            record: Some(SkillCallRecord {
                input_bytes: input_text.len() as u64,
                ..record_of(name, &installed.info.version, caller)
            }),
        };
        let out = self
            .runtime
            .invoke_recording(
                &installed.loaded,
                &input_text,
                secrets,
                Arc::clone(&installed.config),
                seen,
            )
            .await;
        unfinished.record = None;
        let (output, error) = match out.result {
            Ok(o) => (Some(o), None),
            Err(e) => (None, Some(e.to_string())),
        };
        if error.is_none() {
            &self.counts.answered
        } else {
            &self.counts.failed
        }
        .fetch_add(1, Ordering::Relaxed);
        let requests = summaries(&out.requests);
        let duration_ms = out.duration.as_millis() as u64;
        self.audit.write(&SkillCallRecord {
            ok: error.is_none(),
            error: error.as_deref().map(|e| capped(e, AUDIT_TEXT_MAX)),
            duration_ms,
            input_bytes: input_text.len() as u64,
            output_bytes: output.as_ref().map_or(0, String::len) as u64,
            requests: requests.clone(),
            log: audit_log(&out.log),
            ..record_of(name, &installed.info.version, caller)
        })?;
        Ok(CallResult {
            output,
            error,
            duration_ms,
            requests,
        })
    }
}

#[cfg(test)]
mod tests;
