//! The tool-use loop of one task: send the transcript and the tools to the model, run
//! the tools it asks for, send their results back, until it answers without asking
//! for one. Every message is in the session's transcript before the loop moves on.

use std::time::Instant as StdInstant;

use clawos_agentd_api::{ToolCallEvent, ToolCallSummary, ToolResultEvent, Usage};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::config::Config;
use crate::llm::{Endpoint, EndpointError, LlmClient, ModelError, ModelTurn};
use crate::mcp::McpClient;
use crate::session::{Session, SessionError, tool_result};
use crate::tools::{BUILT_IN, ToolOutput, Tools};
use crate::{log, truncate};

/// Characters of a tool's output shown in events and task reports (the model gets up
/// to the output cap).
pub const PREVIEW_CHARS: usize = 500;

/// What a running task reports as it goes (for a streaming answer).
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    /// A piece of the model's text.
    Text(String),
    ToolCall(ToolCallEvent),
    ToolResult(ToolResultEvent),
}

/// One task: its input and how to run it.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// The new user message.
    pub input: String,
    /// Added to the runtime's system prompt for this task.
    pub system: Option<String>,
    /// `(role, text)` messages that precede the input in a new session.
    pub history: Vec<(String, String)>,
    pub model: String,
    /// For the log: the task's id.
    pub task_id: String,
}

/// A finished task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutcome {
    /// The text of the model's last answer.
    pub text: String,
    /// OpenAI's finish reason (`stop`, `length`, `content_filter`).
    pub finish_reason: String,
    pub steps: u32,
    pub usage: Usage,
    pub tool_calls: Vec<ToolCallSummary>,
}

/// A task that did not finish. The message is what the operator sees.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "the task hit its step limit: {max} model calls (--max-steps) and the model still asked for tools; continue the session to let it go on"
    )]
    StepLimit { max: u32 },
    #[error(
        "the task hit its time limit: {secs} s (--max-task-secs) without the model finishing; continue the session to let it go on"
    )]
    TimeLimit { secs: u64 },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the agent runtime is shutting down; the task was stopped")]
    Shutdown,
}

/// Why the runtime cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("bad --llm-url {url:?}: {source}")]
    Endpoint {
        url: String,
        #[source]
        source: EndpointError,
    },
    #[error("cannot open the workspace {path}: {source}")]
    Workspace {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sessions(#[from] SessionError),
}

/// The runtime's shared parts: settings, model client, tools, sessions.
#[derive(Debug)]
pub struct Agent {
    pub(crate) config: Config,
    llm: LlmClient,
    tools: Tools,
    tool_defs: Value,
    /// The host's skills (MCP tools), when the runtime was given an MCP server.
    mcp: Option<McpClient>,
    pub(crate) sessions: crate::session::SessionStore,
}

/// The tools of one task: the built-in ones and the skills offered when it started.
struct TaskTools {
    definitions: Value,
    /// Names the model may call that are skills.
    skills: Vec<String>,
}

/// What the model is told about where it is; a request's `system` messages follow.
fn base_system_prompt(root: &str) -> String {
    format!(
        "You are an AI agent running inside a ClawOS microVM as the unprivileged user \
         `agent`. Your workspace is {root}: do your work there with the tools (bash, \
         read_file, write_file, edit_file, list_files). Work step by step and check your \
         results. When you are done, answer with a short summary of what you did."
    )
}

impl Agent {
    pub fn new(config: Config) -> Result<Self, AgentError> {
        let endpoint = Endpoint::parse(&config.llm_url).map_err(|source| AgentError::Endpoint {
            url: config.llm_url.clone(),
            source,
        })?;
        let tools = Tools::new(&config.workspace, config.output_cap, config.max_shell).map_err(
            |source| AgentError::Workspace {
                path: config.workspace.clone(),
                source,
            },
        )?;
        let sessions = crate::session::SessionStore::open(&config.workspace)?;
        let mcp = config
            .mcp_url
            .as_deref()
            .and_then(|url| match McpClient::new(url) {
                Ok(c) => Some(c),
                Err(e) => {
                    log!("skills off: the MCP server URL {url:?} is not usable: {e}");
                    None
                }
            });
        Ok(Self {
            llm: LlmClient::new(endpoint, config.api_key.clone()),
            tool_defs: tools.definitions(),
            tools,
            mcp,
            sessions,
            config,
        })
    }

    /// The tools for a task starting now: the built-in ones, and the skills the MCP
    /// server offers this agent at this moment (enabled or disabled between tasks). A
    /// server that cannot be reached costs the task its skills, not the task.
    async fn task_tools(&self, task: &str) -> TaskTools {
        let mut definitions = self.tool_defs.as_array().cloned().unwrap_or_default();
        let mut skills = Vec::new();
        if let Some(mcp) = &self.mcp {
            match tokio::time::timeout(crate::mcp::LIST_TIMEOUT, mcp.list_tools()).await {
                Ok(Ok(tools)) => {
                    for t in tools {
                        if !crate::mcp::is_tool_name(&t.name) || BUILT_IN.contains(&t.name.as_str())
                        {
                            log!("skill {:?} not offered: not a usable tool name", t.name);
                            continue;
                        }
                        definitions.push(json!({
                            "name": t.name,
                            "description": t.description,
                            "input_schema": t.input_schema,
                        }));
                        skills.push(t.name);
                    }
                }
                Ok(Err(e)) => log!("task={task} skills unavailable: {e}"),
                Err(_) => log!(
                    "task={task} skills unavailable: the MCP server did not list its tools within {} s",
                    crate::mcp::LIST_TIMEOUT.as_secs()
                ),
            }
        }
        TaskTools {
            definitions: Value::Array(definitions),
            skills,
        }
    }

    /// Runs tool `name`: a skill through the MCP server, else a built-in tool.
    async fn run_tool(&self, tools: &TaskTools, name: &str, input: &Value) -> ToolOutput {
        let Some(mcp) = self
            .mcp
            .as_ref()
            .filter(|_| tools.skills.iter().any(|s| s == name))
        else {
            return self.tools.run(name, input).await;
        };
        let arguments = if input.is_object() {
            input.clone()
        } else {
            json!({})
        };
        match mcp.call_tool(name, &arguments).await {
            Ok(r) => {
                let text = truncate(&r.text, self.config.output_cap);
                if r.is_error {
                    ToolOutput::err(text)
                } else {
                    ToolOutput::ok(text)
                }
            }
            Err(e) => ToolOutput::err(format!("the skill {name} could not be called: {e}")),
        }
    }

    /// Runs one task in `session`, reporting progress on `events` (a closed receiver is
    /// fine: the task goes on).
    pub async fn run_task(
        &self,
        session: &mut Session,
        spec: TaskSpec,
        events: &UnboundedSender<TaskEvent>,
    ) -> Result<TaskOutcome, TaskError> {
        let started = StdInstant::now();
        let deadline = Instant::now() + self.config.max_task;
        let time_limit = || TaskError::TimeLimit {
            secs: self.config.max_task.as_secs(),
        };
        let sid = session.id().to_owned();
        if session.is_new() {
            // A new session's history comes from the request; it must start with the
            // user, as the Messages API requires.
            let mut seen_user = false;
            for (role, text) in &spec.history {
                seen_user |= role == "user";
                if seen_user && !text.trim().is_empty() {
                    session.append(json!({"role": role, "content": text}))?;
                }
            }
        }
        session.append(json!({"role": "user", "content": spec.input}))?;
        let tools = self.task_tools(&spec.task_id).await;
        let mut system = base_system_prompt(&self.config.workspace.display().to_string());
        if !tools.skills.is_empty() {
            system.push_str(&format!(
                " You also have these skills, which run on the host and are the only way to \
                 reach the internet from here: {}.",
                tools.skills.join(", ")
            ));
        }
        if let Some(extra) = spec.system.as_deref().filter(|s| !s.trim().is_empty()) {
            system.push_str("\n\n");
            system.push_str(extra);
        }
        let mut steps = 0u32;
        let mut usage = Usage::default();
        let mut tool_calls = Vec::new();
        let mut text_sent = false;
        loop {
            if Instant::now() >= deadline {
                return Err(time_limit());
            }
            steps += 1;
            let body = serde_json::to_vec(&json!({
                "model": spec.model,
                "max_tokens": self.config.max_tokens,
                "system": system,
                "messages": request_messages(session.messages()),
                "tools": tools.definitions,
                "stream": true,
            }))
            .map_err(|e| ModelError::Protocol(format!("cannot encode the request: {e}")))?;
            let call_started = StdInstant::now();
            let mut separated = !text_sent;
            let mut on_text = |t: &str| {
                if !separated {
                    // Text of an earlier step came before: keep the steps apart.
                    let _ = events.send(TaskEvent::Text("\n\n".to_owned()));
                    separated = true;
                }
                text_sent = true;
                let _ = events.send(TaskEvent::Text(t.to_owned()));
            };
            let turn: ModelTurn =
                match tokio::time::timeout_at(deadline, self.llm.call(body, &mut on_text)).await {
                    Err(_) => return Err(time_limit()),
                    Ok(Err(e)) => {
                        log!(
                            "model call failed session={sid} task={} step={steps} ms={}: {e}",
                            spec.task_id,
                            call_started.elapsed().as_millis()
                        );
                        return Err(e.into());
                    }
                    Ok(Ok(t)) => t,
                };
            let stop = turn.stop_reason.clone().unwrap_or_default();
            log!(
                "model call session={sid} task={} step={steps} stop_reason={stop} input_tokens={} output_tokens={} ms={}",
                spec.task_id,
                turn.usage.prompt(),
                turn.usage.output,
                call_started.elapsed().as_millis()
            );
            usage.prompt_tokens += turn.usage.prompt();
            usage.completion_tokens += turn.usage.output;
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
            session.append_assistant(
                json!({"role": "assistant", "content": turn.content}),
                turn.stop_reason.clone(),
                json!({"input_tokens": turn.usage.prompt(), "output_tokens": turn.usage.output}),
            )?;
            let calls: Vec<(String, String, Value)> = turn
                .content
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
                .map(|b| {
                    let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    (
                        s("id"),
                        s("name"),
                        b.get("input").cloned().unwrap_or(json!({})),
                    )
                })
                .collect();
            if calls.is_empty() {
                if stop == "pause_turn" && steps < self.config.max_steps {
                    // The API paused a long turn of its own tools; sending the
                    // transcript back lets it continue.
                    continue;
                }
                return Ok(TaskOutcome {
                    text: text_of(&turn.content),
                    finish_reason: finish_reason(&stop).to_owned(),
                    steps,
                    usage,
                    tool_calls,
                });
            }
            // Every tool call gets a result in the transcript, run or not, so the
            // session stays one the Messages API accepts.
            let not_run = |why: &str| -> Value {
                let results: Vec<Value> = calls
                    .iter()
                    .map(|(id, _, _)| tool_result(id, &format!("not run: {why}"), true))
                    .collect();
                json!({"role": "user", "content": results})
            };
            if stop != "tool_use" {
                session.append(not_run(&format!(
                    "the model stopped ({stop}) before finishing its tool calls"
                )))?;
                return Ok(TaskOutcome {
                    text: text_of(&turn.content),
                    finish_reason: finish_reason(&stop).to_owned(),
                    steps,
                    usage,
                    tool_calls,
                });
            }
            if steps >= self.config.max_steps {
                session.append(not_run("the task reached its step limit (--max-steps)"))?;
                return Err(TaskError::StepLimit {
                    max: self.config.max_steps,
                });
            }
            let mut results = Vec::with_capacity(calls.len());
            for (i, (id, name, input)) in calls.iter().enumerate() {
                let _ = events.send(TaskEvent::ToolCall(ToolCallEvent {
                    id: id.clone(),
                    name: name.clone(),
                    input: input.clone(),
                }));
                let tool_started = StdInstant::now();
                let out =
                    match tokio::time::timeout_at(deadline, self.run_tool(&tools, name, input))
                        .await
                    {
                        Ok(out) => out,
                        Err(_) => {
                            for (id, _, _) in &calls[i..] {
                                results.push(tool_result(
                                    id,
                                    "not run: the task reached its time limit (--max-task-secs)",
                                    true,
                                ));
                            }
                            session.append(json!({"role": "user", "content": results}))?;
                            return Err(time_limit());
                        }
                    };
                log!(
                    "tool session={sid} task={} name={name} ok={} ms={}",
                    spec.task_id,
                    out.ok,
                    tool_started.elapsed().as_millis()
                );
                let preview = truncate(&out.text, PREVIEW_CHARS);
                let _ = events.send(TaskEvent::ToolResult(ToolResultEvent {
                    id: id.clone(),
                    name: name.clone(),
                    ok: out.ok,
                    output: preview.clone(),
                }));
                tool_calls.push(ToolCallSummary {
                    name: name.clone(),
                    input: input.clone(),
                    ok: out.ok,
                    output_preview: preview,
                });
                let text = if out.text.is_empty() {
                    "(no output)"
                } else {
                    &out.text
                };
                results.push(tool_result(id, text, !out.ok));
            }
            session.append(json!({"role": "user", "content": results}))?;
            log!(
                "step done session={sid} task={} step={steps} tools={} elapsed_ms={}",
                spec.task_id,
                calls.len(),
                started.elapsed().as_millis()
            );
        }
    }
}

/// OpenAI's finish reason for an Anthropic stop reason.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// The text blocks of an answer, joined.
fn text_of(content: &[Value]) -> String {
    content
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The transcript as the Messages API accepts it: string contents as text blocks,
/// empty text blocks and then empty messages left out, consecutive messages of one
/// role merged (a task's input after tool results of an interrupted task, say), and
/// nothing before the first user message.
pub fn request_messages(transcript: &[Value]) -> Vec<Value> {
    let mut out: Vec<(String, Vec<Value>)> = Vec::new();
    for m in transcript {
        let Some(role) = m.get("role").and_then(Value::as_str) else {
            continue;
        };
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) if !s.is_empty() => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(b)) => b
                .iter()
                .filter(|b| {
                    !(b.get("type").and_then(Value::as_str) == Some("text")
                        && b.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .is_empty())
                })
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        if blocks.is_empty() || (out.is_empty() && role != "user") {
            continue;
        }
        match out.last_mut() {
            Some((r, b)) if r == role => b.extend(blocks),
            _ => out.push((role.to_owned(), blocks)),
        }
    }
    out.into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_messages_are_valid_for_the_api() {
        let t = vec![
            json!({"role":"assistant","content":"before any user"}),
            json!({"role":"user","content":"a"}),
            json!({"role":"assistant","content":[{"type":"text","text":""},{"type":"tool_use","id":"t1","name":"bash","input":{}}]}),
            json!({"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"x"}]}),
            json!({"role":"user","content":"next task"}),
            json!({"role":"assistant","content":[]}),
            json!({"role":"user","content":"again"}),
        ];
        let r = request_messages(&t);
        assert_eq!(r.len(), 3, "{r:#?}");
        assert_eq!(
            r[0],
            json!({"role":"user","content":[{"type":"text","text":"a"}]})
        );
        assert_eq!(
            r[1]["content"],
            json!([{"type":"tool_use","id":"t1","name":"bash","input":{}}])
        );
        assert_eq!(
            r[2]["content"],
            json!([
                {"type":"tool_result","tool_use_id":"t1","content":"x"},
                {"type":"text","text":"next task"},
                {"type":"text","text":"again"}
            ])
        );
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_reason("end_turn"), "stop");
        assert_eq!(finish_reason("max_tokens"), "length");
        assert_eq!(finish_reason("refusal"), "content_filter");
    }
}
