//! `clawos audit tail`: the syscall audit trail from monitor-daemon.

use std::time::Duration;

use anyhow::anyhow;
use clap::Subcommand;

use crate::exit::{Exit, api_exit};
use crate::{block_on, state_dir};

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Print audit events (syscalls, alerts, drop reports), oldest first.
    Tail {
        /// Only this agent's events.
        #[arg(long)]
        agent: Option<String>,
        /// Only alerts and drop reports.
        #[arg(long)]
        alerts: bool,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Print at most this many (without --follow).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Keep printing new events.
        #[arg(short, long)]
        follow: bool,
        /// monitor-daemon URL.
        #[arg(long, env = "CLAWOS_MONITOR_URL", default_value = clawos_monitor_api::DEFAULT_URL)]
        monitor_url: String,
    },
}

/// Where audit events come from: the local monitor-daemon, or a control plane.
pub enum Events<'a> {
    Local(clawos_monitor_api::MonitorClient),
    Remote(&'a clawos_control_plane_api::ControlPlaneClient),
}

impl Events<'_> {
    async fn after(
        &self,
        agent: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<clawos_monitor_api::AuditEvent>, Exit> {
        match self {
            Self::Local(c) => c.events(agent, after, limit).await.map_err(api_exit),
            Self::Remote(c) => c
                .audit_events(&clawos_control_plane_api::EventsQuery {
                    after,
                    limit: Some(limit),
                    agent: agent.map(str::to_owned),
                })
                .await
                .map_err(api_exit),
        }
    }
}

/// `audit tail`: from the local monitor-daemon (its operator credential read here), or
/// through `remote`, a control plane.
pub fn run(
    cmd: AuditCmd,
    remote: Option<&clawos_control_plane_api::ControlPlaneClient>,
    json: bool,
) -> Result<(), Exit> {
    let AuditCmd::Tail {
        agent,
        alerts,
        after,
        limit,
        follow,
        monitor_url,
    } = cmd;
    let events = match remote {
        Some(c) => Events::Remote(c),
        None => {
            let token_path = clawos_monitor_api::token_path(&state_dir());
            let token = std::fs::read_to_string(&token_path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| {
                    Exit(
                        1,
                        anyhow!("monitor operator credential {}: {e}", token_path.display()),
                    )
                })?;
            Events::Local(clawos_monitor_api::MonitorClient::new(&monitor_url, &token))
        }
    };
    block_on(tail(
        &events,
        agent.as_deref(),
        alerts,
        after,
        limit,
        follow,
        json,
    ))
}

/// `skill web-search 1.0.0 answered in 12 ms → https://search:443 200` (requests a
/// skill's capabilities refused marked REFUSED).
fn skill_call_line(e: &clawos_monitor_api::AuditEvent) -> String {
    let Some(c) = &e.skill_call else {
        return format!(
            "SKILL RECORD UNREADABLE: {}",
            e.detail.as_deref().unwrap_or("-")
        );
    };
    let requests: Vec<String> = c
        .requests
        .iter()
        .map(|r| match (r.allowed, r.status) {
            (false, _) => format!("{} REFUSED", r.destination),
            (true, Some(s)) => format!("{} {s}", r.destination),
            (true, None) => format!("{} (no answer)", r.destination),
        })
        .collect();
    let mut line = format!(
        "skill {} {} {} in {} ms",
        c.skill, c.version, c.outcome, c.duration_ms
    );
    if !requests.is_empty() {
        line.push_str(&format!(" → {}", requests.join(", ")));
    }
    if let Some(d) = &e.detail {
        line.push_str(&format!(": {}", d.escape_debug()));
    }
    line
}

/// Prints audit events; with `follow`, keeps polling for new ones.
async fn tail(
    client: &Events<'_>,
    agent: Option<&str>,
    alerts_only: bool,
    mut after: u64,
    limit: usize,
    follow: bool,
    json: bool,
) -> Result<(), Exit> {
    use clawos_monitor_api::Kind;
    let mut printed = 0;
    loop {
        let batch = client
            .after(agent, after, if follow { 1000 } else { limit - printed })
            .await?;
        for e in &batch {
            after = e.seq;
            if alerts_only && e.kind == Kind::Syscall {
                continue;
            }
            printed += 1;
            if json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
                continue;
            }
            let who = if e.kind == Kind::SkillCall {
                // A skill call is made by an agent (through its VM) or an operator, not
                // by a process.
                match (
                    &e.agent,
                    e.skill_call.as_ref().and_then(|c| c.vm_id.as_ref()),
                ) {
                    (Some(a), Some(vm)) => format!("{a}/{vm}"),
                    (Some(a), None) => a.clone(),
                    (None, _) => "operator".into(),
                }
            } else {
                format!(
                    "{}/{}{} {}[{}]",
                    e.agent.as_deref().unwrap_or("-"),
                    e.vm.as_deref().unwrap_or("-"),
                    if e.guest_boot.is_some() { ":guest" } else { "" },
                    e.comm.as_deref().unwrap_or("-").escape_debug(),
                    e.pid.unwrap_or(0)
                )
            };
            let line = match e.kind {
                Kind::Syscall | Kind::Alert => {
                    let args = e
                        .args
                        .map(|a| {
                            a.iter()
                                .map(|v| format!("{v:#x}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    let path = e
                        .path
                        .as_ref()
                        .map(|p| format!(" {:?}", p))
                        .unwrap_or_default();
                    let alert = match (&e.rule, e.severity) {
                        (Some(r), Some(s)) => format!("ALERT {r} severity {s}: "),
                        _ => String::new(),
                    };
                    format!(
                        "{alert}{}({args}) = {}{path}",
                        e.syscall.as_deref().unwrap_or("?"),
                        e.ret.unwrap_or(0)
                    )
                }
                Kind::Drops => format!(
                    "DROPPED {} events in the kernel ({} in all)",
                    e.dropped.unwrap_or(0),
                    e.dropped_total.unwrap_or(0)
                ),
                Kind::ForwardDrops => format!(
                    "DROPPED {} events for the SIEM (spool full)",
                    e.dropped.unwrap_or(0)
                ),
                Kind::GuestDrops => format!(
                    "DROPPED {} events inside the VM ({})",
                    e.dropped.unwrap_or(0),
                    e.detail.as_deref().unwrap_or("-")
                ),
                Kind::SkillCall => skill_call_line(e),
            };
            println!("{:>8} {} {who} {line}", e.seq, e.ts);
        }
        if !follow && (batch.is_empty() || printed >= limit) {
            return Ok(());
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
