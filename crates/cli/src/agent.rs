//! `clawos agent`: give a VM's agent a task and watch it work, through the launcher's
//! agent API (`run`, `chat`), and list its sessions.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::anyhow;
use clap::{Args, Subcommand};
use clawos_agentd_api::{ChatMessage, ChatRequest, ToolCallEvent, ToolResultEvent, Usage};
use clawos_vm_launcher_api::{AgentEvent, LauncherClient};
use serde::Serialize;

use crate::exit::Exit;
use crate::output::print_json;

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Give the VM's agent one task; stream its answer to stdout and its tool calls to
    /// stderr (one line each). Exits non-zero if the task fails (8: a rate or token
    /// budget of the inference proxy ran out).
    Run(RunArgs),
    /// Talk with the VM's agent: each line you type is a task in one session.
    Chat {
        /// VM name.
        name: String,
        /// Continue this session [default: a new one].
        #[arg(long)]
        session: Option<String>,
    },
    /// List the sessions of the VM's agent (transcripts under /workspace/.clawos/sessions).
    Sessions {
        /// VM name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM name.
    name: String,
    /// The task.
    #[arg(long, short)]
    message: String,
    /// Run in this session (created if new) [default: a new one].
    #[arg(long)]
    session: Option<String>,
    /// Model for this task [default: the VM's].
    #[arg(long)]
    model: Option<String>,
}

/// What `agent run --json` prints once the task is done.
#[derive(Debug, Default, Serialize)]
struct TaskOutcome {
    session: Option<String>,
    answer: String,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    tool_calls: Vec<ToolCallOutcome>,
}

#[derive(Debug, Serialize)]
struct ToolCallOutcome {
    id: String,
    name: String,
    input: serde_json::Value,
    ok: Option<bool>,
    output: Option<String>,
}

pub async fn run(cmd: AgentCmd, client: &LauncherClient, json: bool) -> Result<u8, Exit> {
    match cmd {
        AgentCmd::Run(a) => {
            let outcome = task(client, &a.name, &a.message, a.session, a.model, !json).await?;
            if json {
                print_json(&outcome).map_err(|e| Exit(1, e))?;
            }
            Ok(0)
        }
        AgentCmd::Chat { name, session } => chat(client, &name, session).await,
        AgentCmd::Sessions { name } => {
            let list = client.agent_sessions(&name).await?;
            if json {
                print_json(&list).map_err(|e| Exit(1, e))?;
            } else {
                println!(
                    "{:<40} {:>12} {:>9}  LAST TASK",
                    "SESSION", "UPDATED", "MESSAGES"
                );
                for s in &list.sessions {
                    println!(
                        "{:<40} {:>12} {:>9}  {}",
                        s.id,
                        s.updated,
                        s.messages,
                        s.last_user_message
                            .as_deref()
                            .unwrap_or("")
                            .replace('\n', " ")
                    );
                }
            }
            Ok(0)
        }
    }
}

fn one_line(v: &impl Serialize, max: usize) -> String {
    let s = serde_json::to_string(v).unwrap_or_default();
    shorten(&s, max)
}

fn shorten(s: &str, max: usize) -> String {
    let s = s.replace('\n', "\\n");
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// The exit code a failed task maps to.
fn task_exit_code(code: Option<&str>) -> u8 {
    match code {
        Some(clawos_agentd_api::code::RATE_LIMITED) => 8,
        Some(c) => clawos_api::exit_code(c),
        None => 1,
    }
}

/// Runs one task, streaming. With `show`, text goes to stdout as it arrives and each
/// tool call and result to stderr.
async fn task(
    client: &LauncherClient,
    vm: &str,
    message: &str,
    session: Option<String>,
    model: Option<String>,
    show: bool,
) -> Result<TaskOutcome, Exit> {
    let req = ChatRequest {
        model,
        messages: vec![ChatMessage::new("user", message)],
        stream: true,
        session,
        tool_events: Some(true),
    };
    let mut stream = client.agent_chat_stream(vm, &req).await?;
    let mut out = TaskOutcome {
        session: stream.session.clone(),
        ..TaskOutcome::default()
    };
    let mut stdout = std::io::stdout();
    while let Some(event) = stream.next().await {
        let event = event.map_err(|e| Exit(7, e.into()))?;
        match event {
            AgentEvent::Text(t) => {
                if show {
                    let _ = stdout.write_all(t.as_bytes());
                    let _ = stdout.flush();
                }
                out.answer.push_str(&t);
            }
            AgentEvent::ToolCall(ToolCallEvent { id, name, input }) => {
                if show {
                    // Tool lines start on a line of their own, after any answer text.
                    if !out.answer.is_empty() && !out.answer.ends_with('\n') {
                        println!();
                    }
                    eprintln!("→ {name} {}", one_line(&input, 160));
                }
                out.tool_calls.push(ToolCallOutcome {
                    id,
                    name,
                    input,
                    ok: None,
                    output: None,
                });
            }
            AgentEvent::ToolResult(ToolResultEvent {
                id,
                name,
                ok,
                output,
            }) => {
                if show {
                    let mark = if ok { "ok" } else { "failed" };
                    eprintln!("← {name} {mark}: {}", shorten(&output, 160));
                }
                if let Some(c) = out.tool_calls.iter_mut().rev().find(|c| c.id == id) {
                    c.ok = Some(ok);
                    c.output = Some(output);
                }
            }
            AgentEvent::Finished {
                finish_reason,
                usage,
                session,
            } => {
                out.finish_reason = Some(finish_reason);
                out.usage = usage;
                if session.is_some() {
                    out.session = session;
                }
            }
            AgentEvent::Failed(body) => {
                if show && !out.answer.is_empty() {
                    println!();
                }
                let code = body.error.code.clone();
                return Err(Exit(
                    task_exit_code(code.as_deref()),
                    anyhow!(
                        "the agent's task failed ({}): {}",
                        code.as_deref().unwrap_or(&body.error.kind),
                        body.error.message
                    ),
                ));
            }
        }
    }
    if show {
        if !out.answer.ends_with('\n') {
            println!();
        }
        let tokens = out.usage.map_or(0, |u| u.total_tokens);
        eprintln!(
            "[session {} · {} tool call(s) · {tokens} tokens]",
            out.session.as_deref().unwrap_or("?"),
            out.tool_calls.len()
        );
    }
    Ok(out)
}

async fn chat(client: &LauncherClient, vm: &str, session: Option<String>) -> Result<u8, Exit> {
    let tty = std::io::stdin().is_terminal();
    let mut session = session;
    if tty {
        eprintln!("Talking with the agent of {vm}; an empty line or /exit ends (Ctrl-D too).");
    }
    loop {
        if tty {
            eprint!("you> ");
            let _ = std::io::stderr().flush();
        }
        // One line at a time; a blocking read is fine between tasks.
        let mut line = String::new();
        let n = tokio::task::spawn_blocking(move || {
            let r = std::io::stdin().lock().read_line(&mut line);
            r.map(|n| (n, line))
        })
        .await
        .map_err(|e| Exit(1, e.into()))?
        .map_err(|e| Exit(1, anyhow!("read stdin: {e}")))?;
        let (n, line) = n;
        let text = line.trim();
        if n == 0 || text.is_empty() || text == "/exit" {
            return Ok(0);
        }
        match task(client, vm, text, session.clone(), None, true).await {
            Ok(o) => session = o.session.or(session),
            // A failed task ends this turn, not the conversation.
            Err(Exit(_, e)) if tty => eprintln!("clawos: {e:#}"),
            Err(e) => return Err(e),
        }
    }
}
