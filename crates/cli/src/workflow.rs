//! `clawos workflow`: submit workflow specs to the orchestrator and follow their runs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use clawos_orchestrator_api::{Approval, OrchestratorClient, RunState, RunStatus, SubmitRun};

use crate::exit::Exit;
use crate::output::print_json;

#[derive(Debug, Subcommand)]
pub enum WorkflowCmd {
    /// Submit a workflow spec (YAML); prints the run id. With --wait, follows the run
    /// and exits 0 only if it succeeded.
    Run {
        /// The spec file.
        file: PathBuf,
        /// A value for one of the spec's inputs (repeatable).
        #[arg(long = "input", value_name = "KEY=VALUE")]
        inputs: Vec<String>,
        /// Follow the run's events until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// List runs, newest first.
    List,
    /// A run's steps: state, attempts, duration, tokens.
    Status {
        /// Run id.
        run: String,
    },
    /// A run's events (its journal); -f follows until the run ends.
    Logs {
        /// Run id.
        run: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Approve (or --reject) an approval step that is waiting.
    Approve {
        run: String,
        step: String,
        /// Reject instead: the run ends `rejected`.
        #[arg(long)]
        reject: bool,
        /// Why (recorded in the journal).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Cancel a run: its running steps' VMs are stopped, nothing else starts.
    Cancel { run: String },
    /// The artifacts a run's steps produced (content-addressed).
    Artifacts { run: String },
    /// Write an artifact's bytes to a file (or stdout with `-`).
    Artifact {
        /// The artifact's sha256.
        sha256: String,
        /// Where to write it.
        #[arg(long, short, default_value = "-")]
        out: PathBuf,
    },
}

fn parse_inputs(raw: &[String]) -> Result<BTreeMap<String, String>, Exit> {
    raw.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Exit(2, anyhow!("--input {kv:?} is not KEY=VALUE")))
        })
        .collect()
}

/// The exit code of a finished run: 0 succeeded, 1 failed or rejected, 4 cancelled.
fn run_exit(state: RunState) -> u8 {
    match state {
        RunState::Succeeded | RunState::Running => 0,
        RunState::Cancelled => 4,
        RunState::Failed | RunState::Rejected => 1,
    }
}

fn print_status(s: &RunStatus) {
    println!(
        "run {} ({}): {}{}",
        s.run.id,
        s.run.workflow,
        s.run.state,
        s.run
            .reason
            .as_deref()
            .map(|r| format!(" — {r}"))
            .unwrap_or_default()
    );
    println!(
        "{:<28} {:<9} {:<10} {:>8} {:>9} {:>9}  DETAIL",
        "STEP", "KIND", "STATE", "ATTEMPTS", "DURATION", "TOKENS"
    );
    for st in &s.steps {
        let detail = st
            .error
            .clone()
            .or_else(|| st.output.clone())
            .unwrap_or_default()
            .replace('\n', " ");
        let detail: String = detail.chars().take(60).collect();
        println!(
            "{:<28} {:<9} {:<10} {:>8} {:>9} {:>9}  {detail}",
            st.id,
            st.kind,
            st.state,
            st.attempts,
            st.duration_ms
                .map(|d| format!("{:.1}s", d as f64 / 1000.0))
                .unwrap_or_default(),
            st.tokens
        );
    }
}

/// Prints events after `after` until the run ends (when following); returns the last
/// state seen.
async fn follow(
    c: &OrchestratorClient,
    run: &str,
    follow: bool,
    json: bool,
) -> Result<RunState, Exit> {
    let mut after = 0;
    loop {
        let events = c.events(run, after).await?;
        for e in &events {
            after = after.max(e.seq);
            if json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            } else {
                println!(
                    "{:>5} {} {:<22} {:<20} {}",
                    e.seq,
                    e.time_ms,
                    e.kind,
                    e.step.as_deref().unwrap_or("-"),
                    if e.detail.is_null() {
                        String::new()
                    } else {
                        e.detail.to_string()
                    }
                );
            }
        }
        let _ = std::io::stdout().flush();
        let state = c.get(run).await?.run.state;
        if !follow || (state.is_final() && events.is_empty()) {
            return Ok(state);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn run(cmd: WorkflowCmd, c: &OrchestratorClient, json: bool) -> Result<u8, Exit> {
    match cmd {
        WorkflowCmd::Run { file, inputs, wait } => {
            let spec = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))
                .map_err(|e| Exit(1, e))?;
            let inputs = parse_inputs(&inputs)?;
            let run = c.submit(&SubmitRun { spec, inputs }).await?;
            if !wait {
                if json {
                    print_json(&run).map_err(|e| Exit(1, e))?;
                } else {
                    println!("{}", run.id);
                }
                return Ok(0);
            }
            eprintln!("run {} submitted; following its events", run.id);
            let state = follow(c, &run.id, true, false).await?;
            let status = c.get(&run.id).await?;
            if json {
                print_json(&status).map_err(|e| Exit(1, e))?;
            } else {
                print_status(&status);
            }
            Ok(run_exit(state))
        }
        WorkflowCmd::List => {
            let runs = c.list().await?;
            if json {
                print_json(&runs).map_err(|e| Exit(1, e))?;
            } else {
                println!("{:<28} {:<24} {:<10} REASON", "RUN", "WORKFLOW", "STATE");
                for r in &runs {
                    println!(
                        "{:<28} {:<24} {:<10} {}",
                        r.id,
                        r.workflow,
                        r.state,
                        r.reason.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(0)
        }
        WorkflowCmd::Status { run } => {
            let s = c.get(&run).await?;
            if json {
                print_json(&s).map_err(|e| Exit(1, e))?;
            } else {
                print_status(&s);
            }
            Ok(0)
        }
        WorkflowCmd::Logs { run, follow: f } => {
            follow(c, &run, f, json).await?;
            Ok(0)
        }
        WorkflowCmd::Approve {
            run,
            step,
            reject,
            reason,
        } => {
            c.approve(
                &run,
                &step,
                &Approval {
                    approved: !reject,
                    reason,
                },
            )
            .await?;
            eprintln!(
                "{run}/{step}: {}",
                if reject { "rejected" } else { "approved" }
            );
            Ok(0)
        }
        WorkflowCmd::Cancel { run } => {
            let s = c.cancel(&run).await?;
            if json {
                print_json(&s).map_err(|e| Exit(1, e))?;
            } else {
                print_status(&s);
            }
            Ok(0)
        }
        WorkflowCmd::Artifacts { run } => {
            let list = c.artifacts(&run).await?;
            if json {
                print_json(&list).map_err(|e| Exit(1, e))?;
            } else {
                println!(
                    "{:<64} {:>10} {:<24} {:<16} NAME",
                    "SHA256", "SIZE", "MEDIA TYPE", "STEP"
                );
                for a in &list {
                    println!(
                        "{:<64} {:>10} {:<24} {:<16} {}",
                        a.sha256,
                        a.size,
                        a.media_type,
                        a.step.as_deref().unwrap_or("-"),
                        a.name
                    );
                }
            }
            Ok(0)
        }
        WorkflowCmd::Artifact { sha256, out } => {
            let bytes = c.artifact(&sha256).await?;
            if out.as_os_str() == "-" {
                std::io::stdout()
                    .write_all(&bytes)
                    .map_err(|e| Exit(1, e.into()))?;
            } else {
                std::fs::write(&out, &bytes)
                    .with_context(|| format!("write {}", out.display()))
                    .map_err(|e| Exit(1, e))?;
                eprintln!("wrote {} bytes to {}", bytes.len(), out.display());
            }
            Ok(0)
        }
    }
}
