//! The engine's [`Executor`] on real VMs: each attempt of an agent step boots a VM
//! through vm-launcher (its idempotency key the attempt's, its token budget the
//! step's), copies the step's inputs into `/workspace/in/` over the guest channel, gives
//! the VM's agent the prompt through the launcher's agent API, stores what the agent
//! wrote under `/workspace/out/` as artifacts, and removes a `fresh` VM afterwards. No
//! host path is ever shared with a VM: files travel as bytes over the launcher's API.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clawos_agentd_api::{ChatMessage, ChatRequest};
use clawos_api::ClientError;
use clawos_vm_launcher_api::{LauncherClient, StartVm, VmState};
use clawos_workflow::spec::VmMode;
use clawos_workflow::{
    AgentOutcome, AgentTask, ArtifactRef, ArtifactStore, Executor, RunId, RunState, StepError,
};

/// Where a step's agent leaves the files the next steps get.
pub const OUT_DIR: &str = "/workspace/out";
/// Where a step's VM finds the files of the steps it takes as inputs.
pub const IN_DIR: &str = "/workspace/in";

/// Most files one attempt may hand on, and the largest one (bytes).
const MAX_OUT_FILES: usize = 256;
const MAX_OUT_FILE_BYTES: u64 = 64 << 20;

/// Runs attempts as VMs.
#[derive(Debug)]
pub struct LauncherExecutor {
    launcher: LauncherClient,
    store: ArtifactStore,
    /// How long a VM may take to report ready.
    boot_timeout: Duration,
    /// The long-lived VM of each `vm: reuse` agent of a run.
    reused: Mutex<HashMap<(RunId, String), String>>,
}

impl LauncherExecutor {
    pub fn new(launcher: LauncherClient, store: ArtifactStore, boot_timeout: Duration) -> Self {
        Self {
            launcher,
            store,
            boot_timeout,
            reused: Mutex::new(HashMap::new()),
        }
    }
}

/// A DNS label from a step id (`per-file[3]` → `per-file-3`).
fn label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

/// The VM of an attempt: `wf-<8 hex of the run>-<step>-a<attempt>` for a fresh VM,
/// `wf-<8 hex>-<agent>` for a reused one; at most 63 characters (a long step id is cut
/// and a hash of it keeps names apart).
pub fn vm_name(task: &AgentTask) -> String {
    let run = task.run.as_str();
    let short = run.get(12..20).unwrap_or(run);
    let (tail, suffix) = match task.agent.vm {
        VmMode::Reuse => (label(&task.agent_name), String::new()),
        VmMode::Fresh => (label(&task.step), format!("-a{}", task.attempt)),
    };
    let room = 63 - 3 - short.len() - 1 - suffix.len();
    let tail = if tail.len() <= room {
        tail
    } else {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        tail.hash(&mut h);
        let hash = format!("{:08x}", h.finish() as u32);
        format!("{}-{hash}", tail[..room - 9].trim_end_matches('-'))
    };
    format!("wf-{short}-{tail}{suffix}")
}

/// The attempt's idempotency key in the launcher's alphabet (`[A-Za-z0-9._:/-]`): a map
/// item's `step[3]` becomes `step.3`.
fn launcher_key(key: &str) -> String {
    key.chars()
        .filter(|c| *c != ']')
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:/-".contains(c) {
                c
            } else {
                '.'
            }
        })
        .collect()
}

/// How a launcher or agent error counts for retries: a spent token budget is never
/// retried (another attempt would spend it again); an image the launcher refuses, or
/// an agent that gave up on its own limits, will not pass either; the rest may.
fn classify(what: &str, e: &ClientError) -> StepError {
    let text = e.to_string();
    let msg = format!("{what}: {text}");
    if text.contains("budget") {
        return StepError::budget(msg);
    }
    match e.code() {
        c if c.starts_with("image_") => StepError::fatal(msg),
        "invalid_request" | "not_found" | "step_limit" | "time_limit" | "no_user_message"
        | "malformed_request" => StepError::fatal(msg),
        _ => StepError::transient(msg),
    }
}

fn media_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()) {
        Some(e) if e == "md" => "text/markdown",
        Some(e) if e == "txt" || e == "log" => "text/plain",
        Some(e) if e == "json" => "application/json",
        Some(e) if e == "html" => "text/html",
        Some(e) if e == "csv" => "text/csv",
        Some(e) if e == "png" => "image/png",
        _ => "application/octet-stream",
    }
}

impl LauncherExecutor {
    /// Starts (or finds) the attempt's VM and waits until it runs.
    async fn vm_for(&self, task: &AgentTask) -> Result<String, StepError> {
        let name = vm_name(task);
        let reuse = task.agent.vm == VmMode::Reuse;
        if reuse {
            let key = (task.run.clone(), task.agent_name.clone());
            if let Some(vm) = self.reused.lock().ok().and_then(|m| m.get(&key).cloned())
                && matches!(
                    self.launcher.get(&vm).await.map(|v| v.state),
                    Ok(VmState::Running)
                )
            {
                return Ok(vm);
            }
        }
        let req = StartVm {
            name: name.clone(),
            model: Some(task.agent.model.clone()),
            mem_mib: task.agent.mem_mib,
            vcpus: 1,
            image: Some(task.agent.image.clone()),
            snapshots: false,
            idempotency_key: (!reuse).then(|| launcher_key(&task.idempotency_key)),
            token_budget: task.budget_tokens,
        };
        match self.launcher.start(&req).await {
            Ok(_) => {}
            // A reused VM that already runs is what we want.
            Err(e) if reuse && e.code() == clawos_api::code::CONFLICT => {}
            Err(e) => return Err(classify(&format!("start VM {name}"), &e)),
        }
        let deadline = Instant::now() + self.boot_timeout;
        loop {
            match self.launcher.get(&name).await {
                Ok(vm) if vm.state == VmState::Running => break,
                Ok(vm) if matches!(vm.state, VmState::Failed | VmState::Stopped) => {
                    return Err(StepError::transient(format!(
                        "VM {name} failed to boot: {}",
                        vm.reason.unwrap_or_default()
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(classify(&format!("VM {name}"), &e)),
            }
            if Instant::now() > deadline {
                return Err(StepError::transient(format!(
                    "VM {name} was not running within {} s",
                    self.boot_timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if reuse && let Ok(mut m) = self.reused.lock() {
            m.insert((task.run.clone(), task.agent_name.clone()), name.clone());
        }
        Ok(name)
    }

    /// Copies the step's inputs into `/workspace/in/<dir>/<name>`.
    async fn copy_in(&self, vm: &str, inputs: &[(String, ArtifactRef)]) -> Result<(), StepError> {
        for (dir, a) in inputs {
            let data = {
                use std::io::Read;
                let mut f = self
                    .store
                    .open(&a.sha256)
                    .map_err(|e| StepError::fatal(format!("input {}: {e}", a.name)))?;
                let mut buf = Vec::with_capacity(a.size as usize);
                f.read_to_end(&mut buf)
                    .map_err(|e| StepError::fatal(format!("input {}: {e}", a.name)))?;
                buf
            };
            let path = format!("{IN_DIR}/{dir}/{}", a.name);
            self.launcher
                .put_file(vm, &path, data)
                .await
                .map_err(|e| classify(&format!("copy {path} into {vm}"), &e))?;
        }
        Ok(())
    }

    /// Stores every file under `/workspace/out/` (recursively) as an artifact.
    async fn collect(&self, vm: &str) -> Result<Vec<ArtifactRef>, StepError> {
        let mut out = Vec::new();
        let mut dirs = vec![String::new()];
        while let Some(rel) = dirs.pop() {
            let path = if rel.is_empty() {
                OUT_DIR.to_owned()
            } else {
                format!("{OUT_DIR}/{rel}")
            };
            let entries = match self.launcher.list_files(vm, &path).await {
                Ok(e) => e,
                // No out/ directory: the agent handed nothing on.
                Err(e) if rel.is_empty() && e.status().is_some_and(|s| s < 500) => {
                    return Ok(out);
                }
                Err(e) => return Err(classify(&format!("list {path} in {vm}"), &e)),
            };
            for e in entries {
                let name = if rel.is_empty() {
                    e.name.clone()
                } else {
                    format!("{rel}/{}", e.name)
                };
                match e.kind.as_str() {
                    "dir" => dirs.push(name),
                    "file" => {
                        if out.len() >= MAX_OUT_FILES {
                            return Err(StepError::fatal(format!(
                                "the agent left more than {MAX_OUT_FILES} files in {OUT_DIR}"
                            )));
                        }
                        if e.size > MAX_OUT_FILE_BYTES {
                            return Err(StepError::fatal(format!(
                                "{OUT_DIR}/{name} is {} bytes, over the {MAX_OUT_FILE_BYTES}-byte limit",
                                e.size
                            )));
                        }
                        let data = self
                            .launcher
                            .get_file(vm, &format!("{OUT_DIR}/{name}"))
                            .await
                            .map_err(|e| {
                                classify(&format!("copy {OUT_DIR}/{name} out of {vm}"), &e)
                            })?;
                        let r = self
                            .store
                            .put(&data, &name, media_type(&name))
                            .map_err(|e| StepError::transient(format!("store {name}: {e}")))?;
                        out.push(r);
                    }
                    // Symlinks and the like are not followed out of the VM.
                    _ => {}
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn remove(&self, vm: &str) {
        let _ = self.launcher.stop(vm).await;
        if let Err(e) = self.launcher.delete(vm).await
            && e.status() != Some(404)
        {
            tracing::warn!(vm, error = %e, "cannot delete a step's VM");
        }
    }

    async fn attempt(&self, task: &AgentTask) -> Result<AgentOutcome, StepError> {
        let vm = self.vm_for(task).await?;
        let result = async {
            self.copy_in(&vm, &task.inputs).await?;
            let req = ChatRequest {
                model: None,
                messages: vec![ChatMessage::new("user", &task.prompt)],
                stream: false,
                session: Some(label(&format!("{}-a{}", task.step, task.attempt))),
                tool_events: None,
            };
            let done = self
                .launcher
                .agent_chat(&vm, &req)
                .await
                .map_err(|e| classify(&format!("the agent in {vm}"), &e))?;
            let artifacts = self.collect(&vm).await?;
            Ok(AgentOutcome {
                output: done
                    .choices
                    .into_iter()
                    .next()
                    .map(|c| c.message.content)
                    .unwrap_or_default(),
                artifacts,
                tokens: done.usage.total_tokens,
                vm: vm.clone(),
            })
        }
        .await;
        if task.agent.vm == VmMode::Fresh {
            self.remove(&vm).await;
        }
        result
    }
}

impl Executor for LauncherExecutor {
    async fn run(&self, task: AgentTask) -> Result<AgentOutcome, StepError> {
        let t = Instant::now();
        tracing::info!(run = %task.run, step = %task.step, attempt = task.attempt, vm = %vm_name(&task), "attempt started");
        let r = self.attempt(&task).await;
        match &r {
            Ok(o) => {
                tracing::info!(run = %task.run, step = %task.step, attempt = task.attempt, tokens = o.tokens, ms = t.elapsed().as_millis() as u64, "attempt succeeded")
            }
            Err(e) => {
                tracing::warn!(run = %task.run, step = %task.step, attempt = task.attempt, error = %e, "attempt failed")
            }
        }
        r
    }

    /// An attempt that was in flight when the orchestrator stopped cannot be joined
    /// again (its agent's answer went to the connection that died with it), so its VM
    /// is removed and the engine retries the step in a new one.
    async fn reattach(&self, task: AgentTask) -> Result<AgentOutcome, StepError> {
        let vm = vm_name(&task);
        if task.agent.vm == VmMode::Fresh {
            self.remove(&vm).await;
        }
        Err(StepError::lost(format!(
            "the orchestrator restarted while {vm} ran this attempt; it was removed"
        )))
    }

    async fn cancel(&self, task: &AgentTask) {
        let vm = vm_name(task);
        tracing::info!(run = %task.run, step = %task.step, vm, "stopping a cancelled or timed-out attempt");
        match task.agent.vm {
            VmMode::Fresh => self.remove(&vm).await,
            VmMode::Reuse => {
                let _ = self.launcher.stop(&vm).await;
            }
        }
    }

    async fn run_finished(&self, run: &RunId, _state: RunState) {
        let vms: Vec<String> = self
            .reused
            .lock()
            .map(|mut m| {
                let keys: Vec<_> = m.keys().filter(|(r, _)| r == run).cloned().collect();
                keys.into_iter().filter_map(|k| m.remove(&k)).collect()
            })
            .unwrap_or_default();
        for vm in vms {
            self.remove(&vm).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_vm_names_are_dns_labels() {
        assert_eq!(label("per-file[3]"), "per-file-3");
        assert_eq!(label("--A__b--"), "a-b");
        let long = "x".repeat(80);
        let name = |step: &str| {
            let spec: clawos_workflow::spec::AgentSpec = clawos_workflow::spec::AgentSpec {
                image: "default".into(),
                model: "m".into(),
                mem_mib: 384,
                budget_tokens: None,
                vm: VmMode::Fresh,
            };
            vm_name(&AgentTask {
                run: "0123456789ab0011223344556677".parse().expect("run id"),
                step: step.into(),
                attempt: 2,
                idempotency_key: "k".into(),
                agent_name: "a".into(),
                agent: spec,
                prompt: String::new(),
                inputs: vec![],
                timeout: Duration::from_secs(1),
                budget_tokens: None,
            })
        };
        assert_eq!(name("research"), "wf-00112233-research-a2");
        assert_eq!(name("per-file[3]"), "wf-00112233-per-file-3-a2");
        let a = name(&long);
        let b = name(&format!("{long}y"));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.ends_with("-a2"));
    }

    #[test]
    fn idempotency_keys_fit_the_launchers_alphabet() {
        let k = launcher_key("01a233f25268ca7457e3a9804948/review[0]/1");
        assert_eq!(k, "01a233f25268ca7457e3a9804948/review.0/1");
        assert!(clawos_vm_launcher_api::valid_idempotency_key(&k));
    }

    #[test]
    fn budget_refusals_are_not_retried() {
        let e = ClientError::Api {
            status: 429,
            code: "rate_limited".into(),
            message: "model call refused (429 rate_limited): token budget of this VM exhausted"
                .into(),
            request_id: String::new(),
        };
        assert_eq!(classify("x", &e).kind, clawos_workflow::ErrorKind::Budget);
        let e = ClientError::Api {
            status: 429,
            code: "rate_limited".into(),
            message: "60 requests per minute".into(),
            request_id: String::new(),
        };
        assert_eq!(
            classify("x", &e).kind,
            clawos_workflow::ErrorKind::Transient
        );
        let e = ClientError::Api {
            status: 422,
            code: "image_bad_signature".into(),
            message: "signature".into(),
            request_id: String::new(),
        };
        assert_eq!(classify("x", &e).kind, clawos_workflow::ErrorKind::Fatal);
    }
}
