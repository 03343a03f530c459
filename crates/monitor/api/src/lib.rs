//! monitor-daemon's REST API, owned here once: its route table ([`routes`]), its wire
//! types (audit events, watches, queries, the guest stream header) and
//! [`MonitorClient`], used by the daemon itself, by vm-launcher (which registers its
//! VMs' processes and relays guest streams), by `clawos audit tail` and by the tests.
//!
//! | route | body / query → answer |
//! |---|---|
//! | [`routes::WATCH`] | [`WatchRequest`] → 201 [`WatchAdded`]: watch a pid (and its children) or a cgroup |
//! | [`routes::UNWATCH`] | [`UnwatchQuery`] (`?pid=N` or `?cgroup=PATH`) → 204 |
//! | [`routes::WATCHES`] | → `[WatchRequest]` |
//! | [`routes::EVENTS`] | [`EventsQuery`] (`?agent=A&after=SEQ&limit=N`) → `[AuditEvent]` from the JSONL trail |
//! | [`routes::METRICS`], [`routes::HEALTHZ`] | Prometheus text; liveness |
//!
//! `/v1/*` needs `Authorization: Bearer <token>`, the token being
//! `<state>/monitor/admin.token` (0600). Errors are `clawos_api::ErrorBody`.

use std::path::PathBuf;
use std::time::Duration;

pub use clawos_api::ClientError;
use clawos_api::HttpClient;
use serde::{Deserialize, Serialize};

/// Default address of the daemon.
pub const DEFAULT_URL: &str = "http://127.0.0.1:2084";

/// The route table, mounted by the daemon and called by [`MonitorClient`].
pub mod routes {
    use clawos_api::Route;

    pub const WATCH: Route = Route::post("/v1/watch");
    pub const UNWATCH: Route = Route::delete("/v1/watch");
    pub const WATCHES: Route = Route::get("/v1/watch");
    pub const EVENTS: Route = Route::get("/v1/events");
    pub const METRICS: Route = Route::get("/metrics");
    pub const HEALTHZ: Route = Route::get("/healthz");
}

/// What an audit line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Kind {
    /// One system call of a watched process, at its exit.
    Syscall,
    /// A rule matched a system call.
    Alert,
    /// Events the kernel could not hand over (ring buffer full).
    Drops,
    /// Events the SIEM forwarder had to skip (its spool was full).
    ForwardDrops,
    /// Events recorded inside a VM that never reached the trail: its ring buffer was
    /// full, its queue overflowed or a connection broke while the host was away, or
    /// the VM was over its quota (`detail` says which; an over-quota report carries
    /// the `guest_seq` of the last event it covers).
    GuestDrops,
    /// A call of a skill (skill-manager's audit record, followed into this trail):
    /// `skill_call` says which, by whom, how it ended and where its requests went.
    SkillCall,
}

/// One JSONL line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEvent {
    /// Per-host sequence number: consecutive, so a gap shows a loss.
    pub seq: u64,
    /// RFC 3339 time, nanoseconds.
    pub ts: String,
    pub host: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nr: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscall: Option<String>,
    /// Raw argument registers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<[u64; 6]>,
    /// Return value (negative errno on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<i64>,
    /// The path argument, for syscalls that take one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Alerts: the rule that matched and its severity (0–10, CEF's scale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<u8>,
    /// Drops: how many were lost since the last report, and in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_total: Option<u64>,
    /// Events recorded inside a VM (by its `clawos-audit`): the guest's boot id, and
    /// the guest's own sequence number of the event in that boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_boot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_seq: Option<u64>,
    /// Guest drops: where they were lost. Skill calls: why one failed or was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Skill calls: the call (absent when skill-manager's record could not be read;
    /// `detail` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skill_call: Option<SkillCall>,
    /// Events followed from another service's trail: where the record ends in it, so
    /// that a restarted daemon reads on from there (each record once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePlace>,
}

/// A skill call, as the host's trail records it (from skill-manager's record; what
/// the skill logged is left in skill-manager's own trail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SkillCall {
    pub skill: String,
    pub version: String,
    /// `agent` or `operator`.
    pub caller: String,
    /// The calling VM's boot (`<vm>-<start time>`), for an agent's call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// `answered`, `failed`, `refused` (the agent's limits) or `aborted` (its caller
    /// went away).
    pub outcome: String,
    pub duration_ms: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Where the skill's requests went.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<SkillRequest>,
    /// Refusals of the same agent and reason that skill-manager did not write before
    /// this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_unrecorded_before: Option<u64>,
}

/// One outgoing request of a skill call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SkillRequest {
    /// `scheme://host:port`.
    pub destination: String,
    /// `false`: the skill's capabilities do not allow it, and it was not sent.
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub bytes: u64,
}

/// A place in a followed file: its inode, and the offset just past a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourcePlace {
    pub inode: u64,
    pub offset: u64,
}

impl AuditEvent {
    /// An event of `kind` with no details yet.
    pub fn new(seq: u64, ts: String, host: &str, kind: Kind) -> Self {
        Self {
            seq,
            ts,
            host: host.to_owned(),
            kind,
            agent: None,
            vm: None,
            pid: None,
            tid: None,
            comm: None,
            nr: None,
            syscall: None,
            args: None,
            ret: None,
            path: None,
            rule: None,
            severity: None,
            dropped: None,
            dropped_total: None,
            guest_boot: None,
            guest_seq: None,
            detail: None,
            skill_call: None,
            source: None,
        }
    }
}

/// What to watch: a process (with the children it forks from then on) or a cgroup v2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    #[serde(default)]
    pub pid: Option<u32>,
    /// A cgroup v2 directory, e.g. `/sys/fs/cgroup/firecracker/clawos-a1`.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The agent its events are tagged with.
    pub agent: String,
    /// The VM its events are tagged with.
    #[serde(default)]
    pub vm: Option<String>,
}

impl std::str::FromStr for WatchRequest {
    type Err = String;

    /// `pid=N,agent=A[,vm=V]` or `cgroup=PATH,agent=A[,vm=V]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut w = WatchRequest {
            pid: None,
            cgroup: None,
            agent: String::new(),
            vm: None,
        };
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("watch {s:?}: expected key=value, got {part:?}"))?;
            match k {
                "pid" => {
                    w.pid = Some(
                        v.parse()
                            .map_err(|_| format!("watch {s:?}: pid {v:?} is not a number"))?,
                    );
                }
                "cgroup" => w.cgroup = Some(v.into()),
                "agent" => w.agent = v.into(),
                "vm" => w.vm = Some(v.into()),
                _ => {
                    return Err(format!(
                        "watch {s:?}: unknown key {k:?} (pid, cgroup, agent, vm)"
                    ));
                }
            }
        }
        w.check()?;
        Ok(w)
    }
}

impl WatchRequest {
    /// Exactly one of pid and cgroup; a label-safe agent name.
    pub fn check(&self) -> Result<(), String> {
        if self.pid.is_some() == self.cgroup.is_some() {
            return Err("a watch names exactly one of pid or cgroup".into());
        }
        check_label("agent", &self.agent)?;
        if let Some(vm) = &self.vm {
            check_label("vm", vm)?;
        }
        if let Some(c) = &self.cgroup
            && (!c.is_absolute() || !c.starts_with("/sys/fs/cgroup"))
        {
            return Err(format!(
                "cgroup {} must be a directory under /sys/fs/cgroup",
                c.display()
            ));
        }
        Ok(())
    }
}

/// An agent or VM label: 1-63 characters of `A-Z a-z 0-9 - _ .`.
pub fn check_label(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {v:?}: 1-63 characters of A-Z a-z 0-9 - _ ."
        ))
    }
}

impl GuestStreamHeader {
    /// Label-safe agent and VM names.
    pub fn check(&self) -> Result<(), String> {
        check_label("agent", &self.agent)?;
        check_label("vm", &self.vm)
    }
}

/// The answer to [`routes::WATCH`]: the tag the watch's events carry in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchAdded {
    pub tag: u32,
}

/// The query of [`routes::UNWATCH`]: the pid or the cgroup whose watches end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnwatchQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// The query of [`routes::EVENTS`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    /// Only this agent's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Events with a larger sequence number.
    #[serde(default)]
    pub after: u64,
    /// At most this many (default 1000, at most 10 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A typed client.
#[derive(Debug, Clone)]
pub struct MonitorClient {
    http: HttpClient,
}

/// Longest wait for any answer: the daemon answers from memory or its trail file.
const TIMEOUT: Duration = Duration::from_secs(30);

impl MonitorClient {
    /// A client of the daemon at `base`, presenting the operator `token`.
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            http: HttpClient::new("monitor-daemon", base).with_token(token),
        }
    }

    /// Starts watching a process or cgroup.
    pub async fn watch(&self, req: &WatchRequest) -> Result<(), ClientError> {
        let r = self.http.request(routes::WATCH, &[]).timeout(TIMEOUT);
        self.http.send(r.json(req)).await.map(drop)
    }

    /// Stops watching a process.
    pub async fn unwatch_pid(&self, pid: u32) -> Result<(), ClientError> {
        let q = UnwatchQuery {
            pid: Some(pid),
            cgroup: None,
        };
        let r = self.http.request(routes::UNWATCH, &[]).timeout(TIMEOUT);
        self.http.send(r.query(&q)).await.map(drop)
    }

    /// The active watches.
    pub async fn watches(&self) -> Result<Vec<WatchRequest>, ClientError> {
        let r = self.http.request(routes::WATCHES, &[]).timeout(TIMEOUT);
        self.http.json(r).await
    }

    /// Events after sequence number `after`, optionally of one agent.
    pub async fn events(
        &self,
        agent: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, ClientError> {
        let q = EventsQuery {
            agent: agent.map(str::to_owned),
            after,
            limit: Some(limit),
        };
        let r = self.http.request(routes::EVENTS, &[]).timeout(TIMEOUT);
        self.http.json(r.query(&q)).await
    }
}

/// Where a state directory keeps the daemon's operator token.
pub fn token_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("monitor/admin.token")
}

/// The Unix socket (0600) where the daemon takes the audit streams of VMs' guests,
/// relayed by vm-launcher from each VM's vsock port
/// 2084 (`clawos_syscall_probe::stream::AUDIT_PORT`). A relay first sends one
/// [`GuestStreamHeader`] line, then the guest's bytes unchanged.
pub fn guest_socket_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("monitor/guest.sock")
}

/// The first line (JSON, then `\n`) of a relayed guest audit stream. The relay, not
/// the guest, names the VM: nothing the guest sends decides where its events are filed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestStreamHeader {
    /// The operator token (`<state>/monitor/admin.token`).
    pub token: String,
    pub agent: String,
    pub vm: String,
}
