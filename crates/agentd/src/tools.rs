//! The tools the model may call: `bash`, and file tools confined to the workspace by
//! [`clawos_guest::workspace::Workspace`] (the kernel resolves every path beneath the
//! root with `openat2(RESOLVE_BENEATH)`, so `..`, absolute paths and symlinks cannot
//! lead out).
//!
//! The confinement is the file tools' contract, not the VM's security boundary: the
//! runtime runs as the unprivileged `agent` user, and `bash` can do whatever that user
//! can. It keeps the file tools predictable (a path means a file of the workspace) and
//! the runtime's own mistakes inside it.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clawos_guest::workspace::Workspace;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// Largest file `read_file` and `edit_file` take.
pub const MAX_READ_BYTES: u64 = 1 << 20;
/// `bash`'s timeout when the model names none.
pub const DEFAULT_SHELL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `bash` waits for output still in the pipe once the shell has exited (and
/// its process group has been killed): only a process that left the group can hold
/// the pipe open that long.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The built-in tools' names (a skill of the same name is not offered to the model).
pub const BUILT_IN: [&str; 5] = ["bash", "read_file", "write_file", "edit_file", "list_files"];

/// What the tools need: the workspace, and the limits of their outputs.
#[derive(Debug)]
pub struct Tools {
    workspace: Arc<Workspace>,
    root: PathBuf,
    output_cap: usize,
    max_shell: Duration,
}

/// A tool's answer to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    /// Whether the tool did what was asked (for `bash`: exit status 0); `false` is
    /// sent as `is_error`.
    pub ok: bool,
    pub text: String,
}

impl ToolOutput {
    pub(crate) fn ok(text: impl Into<String>) -> Self {
        Self {
            ok: true,
            text: text.into(),
        }
    }
    pub(crate) fn err(text: impl Into<String>) -> Self {
        Self {
            ok: false,
            text: text.into(),
        }
    }
}

#[derive(Deserialize)]
struct BashInput {
    command: String,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
struct PathInput {
    path: String,
}

#[derive(Deserialize)]
struct WriteInput {
    path: String,
    content: String,
}

#[derive(Deserialize)]
struct EditInput {
    path: String,
    old_text: String,
    new_text: String,
}

#[derive(Deserialize)]
struct ListInput {
    #[serde(default)]
    path: Option<String>,
}

fn parse<T: for<'de> Deserialize<'de>>(tool: &str, input: &Value) -> Result<T, ToolOutput> {
    T::deserialize(input).map_err(|e| ToolOutput::err(format!("invalid input for {tool}: {e}")))
}

impl Tools {
    /// Opens the workspace root the tools are confined to.
    pub fn new(root: &Path, output_cap: usize, max_shell: Duration) -> io::Result<Self> {
        Ok(Self {
            workspace: Arc::new(Workspace::open(root)?),
            root: root.to_owned(),
            output_cap,
            max_shell,
        })
    }

    /// The tool definitions sent with every model call.
    pub fn definitions(&self) -> Value {
        let root = self.root.display();
        let max = self.max_shell.as_secs();
        json!([
            {
                "name": "bash",
                "description": format!(
                    "Run a shell command with /bin/sh -c in {root} (the working directory) \
                     as the agent user. Returns stdout and stderr together (the first {} bytes) \
                     and the exit status. The command is killed, with every process it started, \
                     after timeout_secs (default 60, at most {max}); processes still running \
                     when it ends are killed too (detach long-lived ones with setsid and \
                     redirect their output). No stdin.",
                    self.output_cap
                ),
                "input_schema": {
                    "type": "object",
                    "properties": {
                        "command": {"type": "string", "description": "The shell command."},
                        "timeout_secs": {"type": "integer", "minimum": 1, "maximum": max,
                            "description": "Seconds before the command is killed (default 60)."}
                    },
                    "required": ["command"]
                }
            },
            {
                "name": "read_file",
                "description": format!(
                    "Read a UTF-8 text file of the workspace ({root}), at most 1 MiB. Paths are \
                     relative to {root} or absolute under it; nothing outside it can be read."
                ),
                "input_schema": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}},
                    "required": ["path"]
                }
            },
            {
                "name": "write_file",
                "description": format!(
                    "Create or replace a file in the workspace ({root}) with the given content, \
                     creating missing parent directories."
                ),
                "input_schema": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                    "required": ["path", "content"]
                }
            },
            {
                "name": "edit_file",
                "description": "Replace old_text with new_text in a workspace file. old_text \
                    must occur exactly once (include surrounding lines to make it unique).",
                "input_schema": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string"},
                        "old_text": {"type": "string"},
                        "new_text": {"type": "string"}
                    },
                    "required": ["path", "old_text", "new_text"]
                }
            },
            {
                "name": "list_files",
                "description": format!(
                    "List a workspace directory (default: {root}): directories end in /, \
                     symlinks in @, files show their size."
                ),
                "input_schema": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}}
                }
            }
        ])
    }

    /// Runs tool `name` with the model's `input`. Failures are answers to the model
    /// (`ok: false`), never errors of the runtime.
    pub async fn run(&self, name: &str, input: &Value) -> ToolOutput {
        match name {
            "bash" => match parse::<BashInput>(name, input) {
                Ok(i) => self.bash(&i.command, i.timeout_secs).await,
                Err(e) => e,
            },
            "read_file" => match parse::<PathInput>(name, input) {
                Ok(i) => self.blocking(move |t| t.read_file(&i.path)).await,
                Err(e) => e,
            },
            "write_file" => match parse::<WriteInput>(name, input) {
                Ok(i) => {
                    self.blocking(move |t| t.write_file(&i.path, &i.content))
                        .await
                }
                Err(e) => e,
            },
            "edit_file" => match parse::<EditInput>(name, input) {
                Ok(i) => {
                    self.blocking(move |t| t.edit_file(&i.path, &i.old_text, &i.new_text))
                        .await
                }
                Err(e) => e,
            },
            "list_files" => match parse::<ListInput>(name, input) {
                Ok(i) => {
                    self.blocking(move |t| t.list_files(i.path.as_deref().unwrap_or(".")))
                        .await
                }
                Err(e) => e,
            },
            other => ToolOutput::err(format!(
                "unknown tool {other:?}: the built-in tools are {}",
                BUILT_IN.join(", ")
            )),
        }
    }

    /// Runs a file operation on the blocking pool: file system calls must not stall
    /// the single-threaded runtime (a FIFO can block an open forever).
    async fn blocking(
        &self,
        f: impl FnOnce(&FileTools) -> Result<String, String> + Send + 'static,
    ) -> ToolOutput {
        let ft = FileTools {
            workspace: Arc::clone(&self.workspace),
            root: self.root.clone(),
            output_cap: self.output_cap,
        };
        match tokio::task::spawn_blocking(move || f(&ft)).await {
            Ok(Ok(text)) => ToolOutput::ok(text),
            Ok(Err(text)) => ToolOutput::err(text),
            Err(e) => ToolOutput::err(format!("the tool failed: {e}")),
        }
    }

    async fn bash(&self, command: &str, timeout_secs: Option<u64>) -> ToolOutput {
        let mut note = String::new();
        let timeout = match timeout_secs {
            None => DEFAULT_SHELL_TIMEOUT.min(self.max_shell),
            Some(0) => return ToolOutput::err("timeout_secs must be at least 1"),
            Some(s) if Duration::from_secs(s) > self.max_shell => {
                note = format!(
                    "[timeout_secs {s} lowered to the {} s maximum]\n",
                    self.max_shell.as_secs()
                );
                self.max_shell
            }
            Some(s) => Duration::from_secs(s),
        };
        match run_shell(command, &self.root, timeout, self.output_cap).await {
            Ok(r) => {
                let mut text = note;
                text.push_str(&r.output.render());
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                let ok = match r.end {
                    ShellEnd::Exited(code) => {
                        text.push_str(&format!("[exit status: {code}]"));
                        code == 0
                    }
                    ShellEnd::Signal(sig) => {
                        text.push_str(&format!("[killed by signal {sig}]"));
                        false
                    }
                    ShellEnd::TimedOut => {
                        text.push_str(&format!(
                            "[killed: timed out after {} s]",
                            timeout.as_secs()
                        ));
                        false
                    }
                };
                ToolOutput { ok, text }
            }
            Err(e) => ToolOutput::err(format!("cannot run /bin/sh: {e}")),
        }
    }
}

/// The file tools, on the blocking pool.
struct FileTools {
    workspace: Arc<Workspace>,
    root: PathBuf,
    output_cap: usize,
}

fn shown(e: io::Error) -> String {
    e.to_string()
}

impl FileTools {
    /// Refuses what is not a regular file before opening it (opening a FIFO would
    /// block). The check follows symlinks outside the workspace only to read their
    /// type; the open that follows is confined.
    fn check_regular(&self, path: &str) -> Result<String, String> {
        let rel = self.workspace.relative(path).map_err(shown)?;
        if let Ok(m) = std::fs::metadata(self.root.join(&rel))
            && !m.is_file()
        {
            return Err(if m.is_dir() {
                format!("{path} is a directory (use list_files)")
            } else {
                format!("{path} is not a regular file")
            });
        }
        Ok(rel)
    }

    fn read_text(&self, path: &str) -> Result<(String, u32), String> {
        self.check_regular(path)?;
        let mut f = self.workspace.open_read(path).map_err(shown)?;
        let meta = f.metadata().map_err(|e| format!("{path}: {e}"))?;
        if meta.len() > MAX_READ_BYTES {
            return Err(format!(
                "{path} is {} bytes, over the {MAX_READ_BYTES}-byte limit of this tool; read parts \
                 of it with bash (head, tail, sed -n)",
                meta.len()
            ));
        }
        let mut buf = Vec::new();
        // `take`: the file may grow between the size check and the read.
        (&mut f)
            .take(MAX_READ_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{path}: {e}"))?;
        if buf.len() as u64 > MAX_READ_BYTES {
            return Err(format!(
                "{path} is over the {MAX_READ_BYTES}-byte limit of this tool"
            ));
        }
        let len = buf.len();
        let text = String::from_utf8(buf).map_err(|_| {
            format!("{path} is not UTF-8 text ({len} bytes); inspect it with bash (file, xxd)")
        })?;
        Ok((text, meta.permissions().mode() & 0o7777))
    }

    fn read_file(&self, path: &str) -> Result<String, String> {
        self.read_text(path).map(|(t, _)| t)
    }

    /// Creates the missing parent directories of `rel`, one level at a time, each
    /// checked to be a directory beneath the root (through the confined `list`) before
    /// the next is made in it. `Workspace` has no confined mkdir; between the check and
    /// the mkdir only the agent itself could swap a directory for a symlink, and the
    /// file itself is then still created by the confined [`Workspace::create`].
    fn make_parents(&self, rel: &str) -> Result<(), String> {
        let Some((parent, _)) = rel.rsplit_once('/') else {
            return Ok(());
        };
        let mut prefix = String::new();
        for part in parent.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            match self.workspace.list(&prefix) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.to_string()),
            }
            match std::fs::create_dir(self.root.join(&prefix)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create directory {prefix}: {e}")),
            }
            self.workspace.list(&prefix).map_err(shown)?;
        }
        Ok(())
    }

    fn write_bytes(&self, path: &str, data: &[u8], mode: u32) -> Result<(), String> {
        let rel = self.workspace.relative(path).map_err(shown)?;
        self.make_parents(&rel)?;
        let mut pending = self.workspace.create(path, mode).map_err(shown)?;
        if let Err(e) = pending.file.write_all(data) {
            pending.abort();
            return Err(format!("{path}: {e}"));
        }
        pending.commit().map_err(|e| format!("{path}: {e}"))
    }

    fn write_file(&self, path: &str, content: &str) -> Result<String, String> {
        let rel = self.workspace.relative(path).map_err(shown)?;
        if let Ok(m) = std::fs::symlink_metadata(self.root.join(&rel))
            && m.is_dir()
        {
            return Err(format!("{path} is a directory"));
        }
        self.write_bytes(path, content.as_bytes(), 0o644)?;
        Ok(format!("wrote {} bytes to {path}", content.len()))
    }

    fn edit_file(&self, path: &str, old: &str, new: &str) -> Result<String, String> {
        if old.is_empty() {
            return Err("old_text is empty; it must be text that occurs once in the file".into());
        }
        let (text, mode) = self.read_text(path)?;
        let n = text.matches(old).count();
        if n != 1 {
            return Err(format!(
                "old_text matches {n} times in {path}; it must match exactly once{}",
                if n == 0 {
                    " (check whitespace and line breaks, or read the file first)"
                } else {
                    " (include more surrounding text to make it unique)"
                }
            ));
        }
        let updated = text.replacen(old, new, 1);
        self.write_bytes(path, updated.as_bytes(), mode)?;
        Ok(format!(
            "replaced 1 occurrence in {path} (now {} bytes)",
            updated.len()
        ))
    }

    fn list_files(&self, path: &str) -> Result<String, String> {
        let entries = self.workspace.list(path).map_err(shown)?;
        if entries.is_empty() {
            return Ok(format!("{path} is empty"));
        }
        let mut out = CappedOutput::new(self.output_cap);
        for e in entries {
            let line = match e.kind.as_str() {
                "dir" => format!("{}/\n", e.name),
                "symlink" => format!("{}@\n", e.name),
                "file" => format!("{} ({} bytes)\n", e.name, e.size),
                _ => format!("{} ({})\n", e.name, e.kind),
            };
            out.push(line.as_bytes());
        }
        Ok(out.render())
    }
}

/// Output kept up to a cap, counting what was dropped.
#[derive(Debug)]
pub struct CappedOutput {
    buf: Vec<u8>,
    cap: usize,
    total: u64,
}

impl CappedOutput {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            total: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.cap.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The kept output as text (invalid UTF-8 replaced), with a note if some was
    /// dropped.
    pub fn render(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.buf).into_owned();
        if self.total > self.buf.len() as u64 {
            if !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&format!("[output truncated: {} bytes total]", self.total));
        }
        s
    }
}

/// How a shell command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellEnd {
    Exited(i32),
    Signal(i32),
    TimedOut,
}

/// A finished shell command.
#[derive(Debug)]
pub struct ShellResult {
    pub output: CappedOutput,
    pub end: ShellEnd,
}

/// Kills a process group when dropped: the command's, whether it finished, timed out or
/// its task was cancelled (runtime shutdown, task time limit).
struct GroupKiller(Option<i32>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: kill(2) with a negative pid signals that process group; it
            // touches no memory of ours. The group is the command's own (process_group(0)
            // made the shell its leader).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// Runs `/bin/sh -c command` in `cwd`, in its own process group, with stdout and
/// stderr into one pipe (so their order is kept), for at most `timeout`.
pub async fn run_shell(
    command: &str,
    cwd: &Path,
    timeout: Duration,
    cap: usize,
) -> io::Result<ShellResult> {
    let (reader, writer) = io::pipe()?;
    let mut child = {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(cwd)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .kill_on_drop(true);
        cmd.spawn()?
        // `cmd`, holding our copies of the pipe's write end, is dropped here, so the
        // pipe ends when the command's processes are gone.
    };
    let killer = GroupKiller(child.id().and_then(|p| i32::try_from(p).ok()));
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())?;
    let mut output = CappedOutput::new(cap);
    let deadline = Instant::now() + timeout;
    let end = {
        let mut buf = vec![0u8; 8192];
        let mut reading = true;
        let status = loop {
            tokio::select! {
                s = child.wait() => break Some(s?),
                r = pipe.read(&mut buf), if reading => match r {
                    Ok(0) | Err(_) => reading = false,
                    Ok(n) => output.push(&buf[..n]),
                },
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        // Whatever the command left running goes with it.
        drop(killer);
        let status = match status {
            Some(s) => Some(s),
            None => {
                let _ = child.wait().await;
                None
            }
        };
        let drain_until = Instant::now() + DRAIN_GRACE;
        while reading {
            match tokio::time::timeout_at(drain_until, pipe.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => output.push(&buf[..n]),
                _ => reading = false,
            }
        }
        match status {
            None => ShellEnd::TimedOut,
            Some(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(c), _) => ShellEnd::Exited(c),
                (None, Some(sig)) => ShellEnd::Signal(sig),
                (None, None) => ShellEnd::Exited(-1),
            },
        }
    };
    Ok(ShellResult { output, end })
}

#[cfg(test)]
mod tests;
