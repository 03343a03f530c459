//! Sessions: each one's transcript is a JSON-lines file,
//! `<workspace>/.clawos/sessions/<id>.jsonl` (directory 0700, files 0600), so it
//! survives the runtime and lives on the workspace disk with the agent's work.
//!
//! Format, one JSON object per line:
//!
//! - first, a header: `{"type":"session","version":1,"id":"<id>","created":<unix s>}`;
//! - then one line per message, in order:
//!   `{"type":"message","at":<unix s>,"message":{"role":…,"content":…}}`, the message
//!   exactly as sent to or received from the Messages API (the assistant's content
//!   blocks as streamed; user messages are a task's input or `tool_result` blocks).
//!   Assistant lines also carry `"stop_reason"` and `"usage"`
//!   (`{"input_tokens","output_tokens"}`) of their model call, for the record.
//!
//! Lines of any other `type` are skipped when loading (room for later additions).
//! Every line is written whole and the file fsync'd before the runtime moves on, so a
//! runtime killed mid-task loses nothing it acknowledged; a final line cut short by
//! such a kill (no newline) was never acknowledged and is dropped on the next load.
//!
//! One task at a time per session: the file is `flock`ed for the task's duration
//! (kernel-held, so it is released however the runtime ends).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clawos_agentd_api::{SessionInfo, is_valid_session_id};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::unix_now;

/// What a session's interrupted tool calls are answered with.
pub const INTERRUPTED: &str = "interrupted: the agent runtime restarted before this tool finished";
/// Longest `last_user_message` in a listing.
const PREVIEW_CHARS: usize = 200;

/// A session store that cannot be used, or a transcript that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad session id {0:?}: ids are 1 to 64 characters of a-z, 0-9 and -")]
    BadId(String),
    #[error("session {id} is busy: another task is running in it; retry when it has finished")]
    Busy { id: String },
    #[error("{path} is not a directory (the session store must be a real directory)")]
    NotADirectory { path: PathBuf },
    #[error("session store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("transcript {path} line {line} is not a transcript line: {source}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// One line of a transcript file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Session {
        version: u32,
        id: String,
        created: u64,
    },
    Message {
        at: u64,
        message: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Value>,
    },
    #[serde(other)]
    Other,
}

/// The sessions of one workspace.
#[derive(Debug, Clone)]
pub struct SessionStore {
    top: PathBuf,
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SessionError + '_ {
    move |source| SessionError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `path` (0700) if missing; refuses anything but a real directory there (the
/// agent's shell can put a symlink in the workspace, and the store follows none).
fn ensure_dir(path: &Path) -> Result<(), SessionError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(SessionError::NotADirectory {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io_err(path))?;
            // The umask may have taken bits away, never added them; state it exactly.
            fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err(path))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

impl SessionStore {
    /// The store of the workspace at `workspace`, created if missing.
    pub fn open(workspace: &Path) -> Result<Self, SessionError> {
        let top = workspace.join(".clawos");
        ensure_dir(&top)?;
        let dir = top.join("sessions");
        ensure_dir(&dir)?;
        Ok(Self { top, dir })
    }

    /// The directory holding the transcripts.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The transcript file of session `id`.
    pub fn path(&self, id: &str) -> Result<PathBuf, SessionError> {
        if !is_valid_session_id(id) {
            return Err(SessionError::BadId(id.to_owned()));
        }
        Ok(self.dir.join(format!("{id}.jsonl")))
    }

    /// Takes session `id` for one task, creating it if new: locks it (or
    /// [`SessionError::Busy`]), loads its transcript and repairs an interrupted end
    /// (tool calls without results get [`INTERRUPTED`] results).
    pub fn acquire(&self, id: &str) -> Result<Session, SessionError> {
        // Again per task: the agent's shell may have replaced them since start-up.
        ensure_dir(&self.top)?;
        ensure_dir(&self.dir)?;
        let path = self.path(id)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor we own; it only changes the file's lock.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                SessionError::Busy { id: id.to_owned() }
            } else {
                io_err(&path)(e)
            });
        }
        let (lines, good_len) = read_lines(&mut file, &path)?;
        let file_len = file.metadata().map_err(io_err(&path))?.len();
        if good_len < file_len {
            // A line cut short by a kill mid-write: never acknowledged, dropped.
            file.set_len(good_len).map_err(io_err(&path))?;
        }
        let mut created = None;
        let mut messages = Vec::new();
        for line in lines {
            match line {
                Line::Session { created: c, .. } => created = created.or(Some(c)),
                Line::Message { message, .. } => messages.push(message),
                Line::Other => {}
            }
        }
        let is_new = created.is_none() && messages.is_empty();
        let mut session = Session {
            id: id.to_owned(),
            path,
            file,
            messages,
            is_new,
        };
        if created.is_none() {
            session.write_line(&Line::Session {
                version: 1,
                id: id.to_owned(),
                created: unix_now(),
            })?;
        }
        session.repair_interrupted()?;
        Ok(session)
    }

    /// Every session, most recently updated first. Unreadable transcripts are
    /// skipped: a listing is for finding sessions, not auditing them.
    pub fn list(&self) -> Result<Vec<SessionInfo>, SessionError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".jsonl") else {
                continue;
            };
            if !is_valid_session_id(id) {
                continue;
            }
            if let Ok(info) = self.info(id, &entry.path()) {
                out.push(info);
            }
        }
        out.sort_by(|a, b| b.updated.cmp(&a.updated).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    fn info(&self, id: &str, path: &Path) -> Result<SessionInfo, SessionError> {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path))?;
        let mtime = file
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let (lines, _) = read_lines(&mut file, path)?;
        let mut info = SessionInfo {
            id: id.to_owned(),
            created: 0,
            updated: 0,
            messages: 0,
            last_user_message: None,
        };
        for line in lines {
            match line {
                Line::Session { created, .. } => info.created = created,
                Line::Message { at, message, .. } => {
                    info.messages += 1;
                    info.updated = at;
                    if message.get("role").and_then(Value::as_str) == Some("user") {
                        let text = user_text(&message);
                        if !text.is_empty() {
                            info.last_user_message = Some(crate::truncate(&text, PREVIEW_CHARS));
                        }
                    }
                }
                Line::Other => {}
            }
        }
        if info.updated == 0 {
            info.updated = info.created.max(mtime);
        }
        Ok(info)
    }
}

/// The text a user typed in a message (its string content or text blocks; tool
/// results are not typed by a user).
fn user_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Reads a transcript: its complete lines, and the length they span (a trailing piece
/// without a newline is not included).
fn read_lines(file: &mut File, path: &Path) -> Result<(Vec<Line>, u64), SessionError> {
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(io_err(path))?;
    let good_len = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut lines = Vec::new();
    for (n, raw) in buf[..good_len].split(|&b| b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = serde_json::from_slice(raw).map_err(|source| SessionError::Corrupt {
            path: path.to_owned(),
            line: n + 1,
            source,
        })?;
        lines.push(line);
    }
    Ok((lines, good_len as u64))
}

/// The ids of the `tool_use` blocks of an assistant message.
pub fn tool_use_ids(message: &Value) -> Vec<String> {
    if message.get("role").and_then(Value::as_str) != Some("assistant") {
        return Vec::new();
    }
    message
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
                .filter_map(|b| b.get("id").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A `tool_result` block.
pub fn tool_result(id: &str, content: &str, is_error: bool) -> Value {
    let mut block = json!({"type": "tool_result", "tool_use_id": id, "content": content});
    if is_error && let Some(o) = block.as_object_mut() {
        o.insert("is_error".into(), Value::Bool(true));
    }
    block
}

/// A session taken for one task: its transcript, and the lock on it until dropped.
#[derive(Debug)]
pub struct Session {
    id: String,
    path: PathBuf,
    file: File,
    messages: Vec<Value>,
    is_new: bool,
}

impl Session {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The transcript's messages, oldest first.
    pub fn messages(&self) -> &[Value] {
        &self.messages
    }

    /// Whether the session had no transcript before this task.
    pub fn is_new(&self) -> bool {
        self.is_new
    }

    /// Appends a message and makes it durable before returning.
    pub fn append(&mut self, message: Value) -> Result<(), SessionError> {
        self.write_line(&Line::Message {
            at: unix_now(),
            message: message.clone(),
            stop_reason: None,
            usage: None,
        })?;
        self.messages.push(message);
        Ok(())
    }

    /// Appends an assistant message with its model call's stop reason and usage.
    pub fn append_assistant(
        &mut self,
        message: Value,
        stop_reason: Option<String>,
        usage: Value,
    ) -> Result<(), SessionError> {
        self.write_line(&Line::Message {
            at: unix_now(),
            message: message.clone(),
            stop_reason,
            usage: Some(usage),
        })?;
        self.messages.push(message);
        Ok(())
    }

    fn write_line(&mut self, line: &Line) -> Result<(), SessionError> {
        let mut buf = serde_json::to_vec(line).map_err(|e| SessionError::Io {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        buf.push(b'\n');
        self.file.write_all(&buf).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))
    }

    /// If the transcript ends with tool calls that have no results (the runtime died
    /// while running them), answers them with [`INTERRUPTED`] errors so the transcript
    /// is again one the Messages API accepts.
    fn repair_interrupted(&mut self) -> Result<(), SessionError> {
        let Some(last) = self.messages.last() else {
            return Ok(());
        };
        let ids = tool_use_ids(last);
        if ids.is_empty() {
            return Ok(());
        }
        let results: Vec<Value> = ids
            .iter()
            .map(|id| tool_result(id, INTERRUPTED, true))
            .collect();
        self.append(json!({"role": "user", "content": results}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SessionStore) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = SessionStore::open(d.path()).expect("open");
        (d, s)
    }

    #[test]
    fn modes_and_round_trip() {
        let (d, s) = store();
        let dir_mode = fs::metadata(d.path().join(".clawos/sessions"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        {
            let mut sess = s.acquire("abc").expect("acquire");
            assert!(sess.is_new());
            sess.append(json!({"role":"user","content":"hello there"}))
                .expect("append");
            sess.append_assistant(
                json!({"role":"assistant","content":[{"type":"text","text":"hi"}]}),
                Some("end_turn".into()),
                json!({"input_tokens":1,"output_tokens":2}),
            )
            .expect("append");
        }
        let path = s.path("abc").expect("path");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = fs::read_to_string(&path).expect("read");
        let first: Value =
            serde_json::from_str(text.lines().next().expect("header")).expect("json");
        assert_eq!(first["type"], "session");
        assert_eq!(first["id"], "abc");
        let sess = s.acquire("abc").expect("again");
        assert!(!sess.is_new());
        assert_eq!(sess.messages().len(), 2);
        assert_eq!(sess.messages()[1]["content"][0]["text"], "hi");
        drop(sess);
        let list = s.list().expect("list");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].messages, 2);
        assert_eq!(list[0].last_user_message.as_deref(), Some("hello there"));
    }

    #[test]
    fn one_task_at_a_time() {
        let (_d, s) = store();
        let held = s.acquire("x").expect("acquire");
        let e = s.acquire("x").expect_err("busy");
        assert!(matches!(e, SessionError::Busy { .. }), "{e}");
        drop(held);
        s.acquire("x").expect("free again");
    }

    #[test]
    fn ids_are_never_paths() {
        let (_d, s) = store();
        for bad in ["../x", "a/b", "", "A", ".."] {
            assert!(
                matches!(s.acquire(bad), Err(SessionError::BadId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn interrupted_tool_calls_get_results_and_torn_lines_are_dropped() {
        let (_d, s) = store();
        let path = s.path("int").expect("path");
        let lines = [
            json!({"type":"session","version":1,"id":"int","created":1}),
            json!({"type":"message","at":2,"message":{"role":"user","content":"go"}}),
            json!({"type":"message","at":3,"message":{"role":"assistant","content":[
                {"type":"text","text":"ok"},
                {"type":"tool_use","id":"toolu_a","name":"bash","input":{"command":"sleep 9"}},
                {"type":"tool_use","id":"toolu_b","name":"read_file","input":{"path":"x"}}]}}),
            json!({"type":"future_thing","x":1}),
        ];
        let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        text.push_str("{\"type\":\"message\",\"at\":4,\"mess");
        fs::write(&path, text).expect("write");
        let sess = s.acquire("int").expect("acquire");
        assert_eq!(sess.messages().len(), 3);
        let last = &sess.messages()[2];
        assert_eq!(last["role"], "user");
        assert_eq!(last["content"][0]["tool_use_id"], "toolu_a");
        assert_eq!(last["content"][1]["tool_use_id"], "toolu_b");
        assert_eq!(last["content"][1]["is_error"], true);
        assert_eq!(last["content"][0]["content"], INTERRUPTED);
        drop(sess);
        // The repair is in the file; the torn line is gone; loading again adds nothing.
        let sess = s.acquire("int").expect("again");
        assert_eq!(sess.messages().len(), 3);
        let on_disk = fs::read_to_string(&path).expect("read");
        assert!(on_disk.ends_with("\n") && !on_disk.contains("\"mess\n"));
    }

    #[test]
    fn corrupt_line_is_named() {
        let (_d, s) = store();
        let path = s.path("bad").expect("path");
        fs::write(
            &path,
            "{\"type\":\"session\",\"version\":1,\"id\":\"bad\",\"created\":1}\nnot json\n",
        )
        .expect("write");
        let e = s.acquire("bad").expect_err("corrupt");
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn symlinked_store_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(elsewhere.path(), d.path().join(".clawos")).expect("symlink");
        let e = SessionStore::open(d.path()).expect_err("symlink");
        assert!(matches!(e, SessionError::NotADirectory { .. }), "{e}");
    }
}
