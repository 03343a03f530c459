//! The usage ledger (SQLite, one row per request) and the audit trail (JSONL, one line
//! per request), written together by one thread in batches, off the request path.
//!
//! Durability: a batch is at most [`BATCH`] records or [`BATCH_WINDOW`] old; the audit
//! file is fsynced and the ledger transaction committed (WAL, `synchronous=NORMAL`) at
//! the end of every batch. A crash loses at most the batch in flight; on shutdown the
//! channel is drained before the thread exits. Neither stream holds prompt or
//! completion text or any credential.
//!
//! Who used which model when, and how much, is the operator's business only: the
//! files are created 0600 (the database's `-wal` and `-shm` inherit its mode, rotated
//! audit files keep theirs) and existing ones are tightened when the ledger opens; the
//! proxy's state directory is 0700 ([`private_dir`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clawos_inference_proxy_api::UsageRow;
use rusqlite::{Connection, params};
use serde::Serialize;

use crate::usage::Usage;

/// Most records per batch.
pub const BATCH: usize = 512;
/// Longest a record waits for its batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// One proxied request.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub request_id: String,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub agent: String,
    pub vm_id: String,
    pub model: String,
    pub upstream: String,
    pub api: &'static str,
    /// `messages`, `chat_completions` or `count_tokens`.
    pub kind: &'static str,
    pub stream: bool,
    pub status: u16,
    #[serde(flatten)]
    pub usage: Usage,
    /// Tokens charged to the agent's budgets: the reported usage, or the reservation
    /// when a successful answer reported none.
    pub charged_tokens: u64,
    pub latency_ms: u64,
    /// Why the request failed or was cut short, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors opening the ledger or audit file (startup only).
#[derive(Debug, thiserror::Error)]
#[error("ledger: {0}")]
pub struct LedgerError(pub String);

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates `dir` if needed and makes it 0700.
pub fn private_dir(dir: &Path) -> Result<(), LedgerError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| LedgerError(format!("{}: {e}", dir.display())))
}

/// Makes `path` 0600, creating it (empty) if it does not exist.
fn private_file(path: &Path) -> Result<(), LedgerError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| LedgerError(format!("{}: {e}", path.display())))
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Columns added after the first schema, with their definitions.
const ADDED_COLUMNS: [(&str, &str); 3] = [
    ("kind", "TEXT NOT NULL DEFAULT 'messages'"),
    ("server_tool_requests", "INTEGER NOT NULL DEFAULT 0"),
    ("charged_tokens", "INTEGER"),
];

fn open_db(path: &Path) -> Result<Connection, LedgerError> {
    // An empty file is a valid new database; SQLite gives `-wal` and `-shm` the mode
    // of the database file.
    private_file(path)?;
    let db = Connection::open(path).map_err(|e| LedgerError(format!("{}: {e}", path.display())))?;
    let err = |e: rusqlite::Error| LedgerError(format!("{}: {e}", path.display()));
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS requests (
           request_id TEXT PRIMARY KEY, time_ms INTEGER NOT NULL, agent TEXT NOT NULL, vm_id TEXT NOT NULL,
           model TEXT NOT NULL, upstream TEXT NOT NULL, api TEXT NOT NULL, stream INTEGER NOT NULL,
           status INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
           cache_creation_input_tokens INTEGER NOT NULL, cache_read_input_tokens INTEGER NOT NULL,
           latency_ms INTEGER NOT NULL, error TEXT);
         CREATE INDEX IF NOT EXISTS requests_agent_time ON requests (agent, time_ms);",
    )
    .map_err(err)?;
    let have: Vec<String> = db
        .prepare("SELECT name FROM pragma_table_info('requests')")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .map_err(err)?;
    for (col, def) in ADDED_COLUMNS {
        if !have.iter().any(|h| h == col) {
            db.execute_batch(&format!("ALTER TABLE requests ADD COLUMN {col} {def}"))
                .map_err(err)?;
            if col == "kind" {
                db.execute_batch(
                    "UPDATE requests SET kind = 'chat_completions' WHERE api = 'openai'",
                )
                .map_err(err)?;
            }
        }
    }
    for suffix in ["-wal", "-shm", "-journal"] {
        let f = with_suffix(path, suffix);
        if f.exists() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| LedgerError(format!("{}: {e}", f.display())))?;
        }
    }
    Ok(db)
}

/// When the audit file rotates, and how many old files are kept
/// (`audit.jsonl.1` newest … `.N` oldest).
#[derive(Debug, Clone, Copy)]
pub struct AuditRotation {
    pub max_bytes: u64,
    pub keep: u32,
}

impl Default for AuditRotation {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            keep: 5,
        }
    }
}

/// Renames `audit.jsonl` to `.1` (shifting older ones up, dropping the oldest) and
/// opens a fresh file.
fn rotate(path: &Path, keep: u32) -> std::io::Result<File> {
    let numbered = |n: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    std::fs::rename(path, numbered(1))?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Makes the audit file and every rotated one (`audit.jsonl.N`) 0600.
fn tighten_audit_files(path: &Path) -> Result<(), LedgerError> {
    private_file(path)?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| LedgerError(format!("{}: {e}", dir.display())))?;
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.strip_prefix(&prefix)
            .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))
                .map_err(|err| LedgerError(format!("{}: {err}", e.path().display())))?;
        }
    }
    Ok(())
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct Ledger {
    tx: Option<mpsc::Sender<Record>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub db_path: PathBuf,
}

impl Ledger {
    /// Opens both files and starts the writer.
    pub fn open(db_path: &Path, audit_path: &Path) -> Result<Self, LedgerError> {
        Self::open_with(db_path, audit_path, AuditRotation::default())
    }

    /// Like [`Ledger::open`] with an explicit rotation policy.
    pub fn open_with(
        db_path: &Path,
        audit_path: &Path,
        rotation: AuditRotation,
    ) -> Result<Self, LedgerError> {
        let db = open_db(db_path)?;
        tighten_audit_files(audit_path)?;
        let audit = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(audit_path)
            .map_err(|e| LedgerError(format!("{}: {e}", audit_path.display())))?;
        let (tx, rx) = mpsc::channel();
        let audit_path = audit_path.to_owned();
        let thread = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || writer(db, audit, &audit_path, rotation, rx))
            .map_err(|e| LedgerError(format!("writer thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            db_path: db_path.to_owned(),
        })
    }

    /// Queues a record (never blocks the request).
    pub fn record(&self, r: Record) {
        if let Some(tx) = &self.tx
            && tx.send(r).is_err()
        {
            tracing::error!("ledger writer is gone; a usage record was lost");
        }
    }
}

impl Drop for Ledger {
    /// Drains what is queued before returning.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer(
    mut db: Connection,
    mut audit: File,
    audit_path: &Path,
    rotation: AuditRotation,
    rx: mpsc::Receiver<Record>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let deadline = std::time::Instant::now() + BATCH_WINDOW;
        while batch.len() < BATCH {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut lines = String::new();
        for r in &batch {
            if let Ok(l) = serde_json::to_string(r) {
                lines.push_str(&l);
                lines.push('\n');
            }
        }
        if let Err(e) = audit
            .write_all(lines.as_bytes())
            .and_then(|()| audit.sync_data())
        {
            tracing::error!(error = %e, "audit write failed");
        }
        // Rotate between batches, so a line never straddles two files.
        if audit
            .metadata()
            .is_ok_and(|m| m.len() >= rotation.max_bytes)
        {
            match rotate(audit_path, rotation.keep) {
                Ok(f) => audit = f,
                Err(e) => tracing::error!(error = %e, "audit rotation failed; still appending"),
            }
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = db.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR IGNORE INTO requests (request_id, time_ms, agent, vm_id, model, upstream, api, stream,
                       status, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens,
                       latency_ms, error, kind, server_tool_requests, charged_tokens)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                )?;
                for r in &batch {
                    st.execute(params![
                        r.request_id,
                        r.time_ms,
                        r.agent,
                        r.vm_id,
                        r.model,
                        r.upstream,
                        r.api,
                        r.stream,
                        r.status,
                        r.usage.input_tokens,
                        r.usage.output_tokens,
                        r.usage.cache_creation_input_tokens,
                        r.usage.cache_read_input_tokens,
                        r.latency_ms,
                        r.error,
                        r.kind,
                        r.usage.server_tool_requests,
                        r.charged_tokens
                    ])?;
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, records = batch.len(), "ledger write failed");
        }
        batch.clear();
    }
}

/// Usage totals per agent and model since `since_ms` (for `GET /v1/usage`).
/// `requests` counts model calls; `count_tokens` calls are counted apart.
pub fn usage_rows(
    db_path: &Path,
    since_ms: u64,
    agent: Option<&str>,
) -> Result<Vec<UsageRow>, LedgerError> {
    let db = Connection::open(db_path).map_err(|e| LedgerError(e.to_string()))?;
    let mut st = db
        .prepare(
            "SELECT agent, model, SUM(kind != 'count_tokens'), SUM(input_tokens), SUM(output_tokens),
                    SUM(cache_creation_input_tokens), SUM(cache_read_input_tokens),
                    SUM(server_tool_requests), SUM(kind = 'count_tokens')
             FROM requests WHERE time_ms >= ?1 AND (?2 IS NULL OR agent = ?2)
             GROUP BY agent, model ORDER BY agent, model",
        )
        .map_err(|e| LedgerError(e.to_string()))?;
    let rows = st
        .query_map(params![since_ms, agent], |r| {
            Ok(UsageRow {
                agent: r.get(0)?,
                model: r.get(1)?,
                requests: r.get(2)?,
                input_tokens: r.get(3)?,
                output_tokens: r.get(4)?,
                cache_creation_input_tokens: r.get(5)?,
                cache_read_input_tokens: r.get(6)?,
                server_tool_requests: r.get(7)?,
                count_tokens_requests: r.get(8)?,
            })
        })
        .map_err(|e| LedgerError(e.to_string()))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| LedgerError(e.to_string()))
}

/// [`usage_rows`] as the JSON `GET /v1/usage` serves, for tools and tests that read
/// the ledger as JSON.
pub fn usage_since(
    db_path: &Path,
    since_ms: u64,
    agent: Option<&str>,
) -> Result<Vec<serde_json::Value>, LedgerError> {
    usage_rows(db_path, since_ms, agent)?
        .iter()
        .map(|r| serde_json::to_value(r).map_err(|e| LedgerError(e.to_string())))
        .collect()
}

/// Tokens charged per agent since `since_ms` (seeds the budgets at start-up).
pub fn tokens_since(
    db_path: &Path,
    since_ms: u64,
) -> Result<std::collections::HashMap<String, u64>, LedgerError> {
    let db = open_db(db_path)?;
    let mut st = db
        .prepare(
            "SELECT agent, SUM(COALESCE(charged_tokens,
                 input_tokens + output_tokens + cache_creation_input_tokens + cache_read_input_tokens))
             FROM requests WHERE time_ms >= ?1 GROUP BY agent",
        )
        .map_err(|e| LedgerError(e.to_string()))?;
    let rows = st
        .query_map([since_ms], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
        })
        .map_err(|e| LedgerError(e.to_string()))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| LedgerError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> Record {
        Record {
            request_id: format!("r{i}"),
            time_ms: now_ms(),
            agent: "a".into(),
            vm_id: "v".into(),
            model: "m".into(),
            upstream: "u".into(),
            api: "anthropic",
            kind: if i % 100 == 99 {
                "count_tokens"
            } else {
                "messages"
            },
            stream: false,
            status: 200,
            usage: Usage {
                input_tokens: 2,
                output_tokens: 3,
                ..Usage::default()
            },
            charged_tokens: 5,
            latency_ms: 1,
            error: None,
        }
    }

    #[test]
    fn audit_rotates_by_size_and_loses_no_line() {
        let d = tempfile::tempdir().expect("tmp");
        let (db, audit) = (d.path().join("l.db"), d.path().join("a.jsonl"));
        let l = Ledger::open_with(
            &db,
            &audit,
            AuditRotation {
                max_bytes: 4096,
                keep: 3,
            },
        )
        .expect("open");
        for i in 0..200 {
            l.record(rec(i));
            if i % 20 == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        drop(l);
        let mut total = 0;
        let mut files = 0;
        for name in ["a.jsonl", "a.jsonl.1", "a.jsonl.2", "a.jsonl.3"] {
            if let Ok(t) = std::fs::read_to_string(d.path().join(name)) {
                files += 1;
                total += t.lines().count();
                assert!(
                    t.lines()
                        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
                    "{name}: a cut line"
                );
            }
        }
        assert_eq!(files, 4, "rotated, keeping 3 old files");
        assert!(!d.path().join("a.jsonl.4").exists());
        // The oldest rotated files were dropped, the ledger keeps everything.
        assert!(total < 200);
        let u = usage_since(&db, 0, None).expect("usage");
        assert_eq!(
            (
                u[0]["requests"].clone(),
                u[0]["count_tokens_requests"].clone()
            ),
            (serde_json::json!(198), serde_json::json!(2))
        );
        // Rotated files are as private as the live one.
        for name in ["a.jsonl", "a.jsonl.1", "a.jsonl.2", "a.jsonl.3", "l.db"] {
            let mode = std::fs::metadata(d.path().join(name))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn every_record_is_one_audit_line_and_one_row_after_drop() {
        let d = tempfile::tempdir().expect("tmp");
        let (db, audit) = (d.path().join("l.db"), d.path().join("a.jsonl"));
        let l = Ledger::open(&db, &audit).expect("open");
        for i in 0..1500 {
            l.record(rec(i));
        }
        drop(l);
        let lines = std::fs::read_to_string(&audit).expect("audit");
        assert_eq!(lines.lines().count(), 1500);
        let u = usage_since(&db, 0, Some("a")).expect("usage");
        assert_eq!(u[0]["requests"], 1485);
        assert_eq!(u[0]["count_tokens_requests"], 15);
        assert_eq!(u[0]["output_tokens"], 4500);
    }

    #[test]
    fn an_old_ledger_is_migrated_and_world_readable_files_tightened() {
        let d = tempfile::tempdir().expect("tmp");
        let (db, audit) = (d.path().join("l.db"), d.path().join("a.jsonl"));
        {
            let c = Connection::open(&db).expect("db");
            c.execute_batch(
                "CREATE TABLE requests (
                   request_id TEXT PRIMARY KEY, time_ms INTEGER NOT NULL, agent TEXT NOT NULL, vm_id TEXT NOT NULL,
                   model TEXT NOT NULL, upstream TEXT NOT NULL, api TEXT NOT NULL, stream INTEGER NOT NULL,
                   status INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
                   cache_creation_input_tokens INTEGER NOT NULL, cache_read_input_tokens INTEGER NOT NULL,
                   latency_ms INTEGER NOT NULL, error TEXT);
                 INSERT INTO requests VALUES ('old', 1, 'a', 'v', 'm', 'u', 'openai', 0, 200, 10, 5, 0, 0, 1, NULL);",
            )
            .expect("old schema");
        }
        std::fs::write(&audit, "").expect("audit");
        std::fs::write(d.path().join("a.jsonl.4"), "").expect("rotated");
        for f in [&db, &audit, &d.path().join("a.jsonl.4")] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let l = Ledger::open(&db, &audit).expect("open");
        l.record(rec(0));
        drop(l);
        for f in ["l.db", "a.jsonl", "a.jsonl.4"] {
            let mode = std::fs::metadata(d.path().join(f))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert_eq!(tokens_since(&db, 0).expect("tokens")["a"], 15 + 5);
        let c = Connection::open(&db).expect("db");
        let kind: String = c
            .query_row(
                "SELECT kind FROM requests WHERE request_id = 'old'",
                [],
                |r| r.get(0),
            )
            .expect("kind");
        assert_eq!(kind, "chat_completions");
    }
}
