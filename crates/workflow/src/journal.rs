//! The journal: every run's events, in SQLite.
//!
//! Durability is the point. The database is in WAL mode with `synchronous = FULL`, so
//! a committed transaction has been fsynced to the WAL: an event the engine has acted
//! on (or acknowledged to a caller) survives `kill -9` and power loss. The engine
//! commits each batch of events — everything one input led to — in one transaction,
//! before any of it takes effect.
//!
//! One engine per journal: a lock file (`<journal>.lock`, `flock`) refuses a second
//! opener, since two engines driving the same runs would start every step twice.
//! The files are 0600: runs hold prompts, outputs and inputs.
//!
//! Schema (version 1):
//!
//! ```sql
//! CREATE TABLE meta   (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- schema_version
//! CREATE TABLE runs   (run_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL,
//!                      spec_sha256 TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
//!                      created_ms INTEGER NOT NULL, finished_ms INTEGER);
//! CREATE TABLE events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ms INTEGER NOT NULL,
//!                      kind TEXT NOT NULL, data TEXT NOT NULL,   -- data: the Event as JSON
//!                      PRIMARY KEY (run_id, seq)) WITHOUT ROWID;
//! ```
//!
//! `runs.state` mirrors the run's `run_finished` event (written in the same
//! transaction) so that recovery finds unfinished runs without reading every event.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::event::{Event, JournalEvent, RunId, RunState};
use crate::status::RunSummary;

/// The schema this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Where the journal lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalConfig {
    /// A SQLite file (created 0600), with `-wal`/`-shm` beside it and a `.lock` file.
    File(PathBuf),
    /// In memory: nothing survives the process. For tests and as the benchmark's
    /// baseline (the same engine without the disk).
    Memory,
}

/// A journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite refused.
    #[error("journal {path}: {op}")]
    Sqlite {
        path: String,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A filesystem operation on the journal's files failed.
    #[error("journal {path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Another engine holds the journal.
    #[error("journal {path} is in use by another engine (it holds {lock})")]
    Locked { path: String, lock: String },
    /// A journaled event is not valid JSON for [`Event`].
    #[error("journal {path}: event {run}/{seq} is unreadable")]
    Corrupt {
        path: String,
        run: String,
        seq: u64,
        #[source]
        source: serde_json::Error,
    },
    /// Written by a newer engine.
    #[error("journal {path}: schema version {found}, this engine reads {supported}")]
    Version {
        path: String,
        found: String,
        supported: u32,
    },
}

/// A run's row, written with its first event.
#[derive(Debug)]
pub(crate) struct NewRun<'a> {
    pub name: &'a str,
    pub spec: &'a str,
    pub spec_sha256: &'a str,
    pub created_ms: u64,
}

#[derive(Debug)]
pub(crate) struct Journal {
    conn: Mutex<Connection>,
    path: String,
    /// Held (locked) for as long as the journal is open.
    _lock: Option<File>,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

impl Journal {
    pub fn open(cfg: &JournalConfig) -> Result<Self, JournalError> {
        match cfg {
            JournalConfig::Memory => {
                let path = ":memory:".to_owned();
                let conn = Connection::open_in_memory().map_err(sql(&path, "open"))?;
                Self::init(conn, path, None)
            }
            JournalConfig::File(p) => {
                let path = p.display().to_string();
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty())
                    && !dir.exists()
                {
                    std::fs::create_dir_all(dir)
                        .and_then(|()| {
                            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                        })
                        .map_err(io_err(&path, "create its directory"))?;
                }
                let lock_path = with_suffix(p, ".lock");
                let lock =
                    private_file(&lock_path).map_err(io_err(&path, "create the lock file"))?;
                match lock.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => {
                        return Err(JournalError::Locked {
                            path,
                            lock: lock_path.display().to_string(),
                        });
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path, "lock")(e)),
                }
                // An empty file is a valid new database; SQLite gives `-wal` and
                // `-shm` the database file's mode.
                private_file(p).map_err(io_err(&path, "create"))?;
                let conn = Connection::open(p).map_err(sql(&path, "open"))?;
                conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
                    .map_err(sql(&path, "set WAL mode"))?;
                let j = Self::init(conn, path.clone(), Some(lock))?;
                for suffix in ["-wal", "-shm"] {
                    let f = with_suffix(p, suffix);
                    if f.exists() {
                        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                            .map_err(io_err(&path, "chmod"))?;
                    }
                }
                Ok(j)
            }
        }
    }

    fn init(conn: Connection, path: String, lock: Option<File>) -> Result<Self, JournalError> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS runs (
               run_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL,
               spec_sha256 TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
               created_ms INTEGER NOT NULL, finished_ms INTEGER);
             CREATE INDEX IF NOT EXISTS runs_state ON runs (state);
             CREATE TABLE IF NOT EXISTS events (
               run_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ms INTEGER NOT NULL,
               kind TEXT NOT NULL, data TEXT NOT NULL,
               PRIMARY KEY (run_id, seq)) WITHOUT ROWID;",
        )
        .map_err(sql(&path, "create the schema"))?;
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(&path, "read the schema version"))?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(sql(&path, "write the schema version"))?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(found) => {
                return Err(JournalError::Version {
                    path,
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path,
            _lock: lock,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `events` (and the run's row, for its first batch) in one transaction:
    /// when this returns `Ok`, they are on disk.
    pub fn append(
        &self,
        run: &RunId,
        events: &[JournalEvent],
        new_run: Option<NewRun<'_>>,
    ) -> Result<(), JournalError> {
        let path = &self.path;
        let rows: Vec<(u64, u64, &'static str, String)> = events
            .iter()
            .map(|e| {
                // Serializing these types cannot fail (string keys, no floats), but a
                // failure must not panic the engine.
                let data = serde_json::to_string(&e.event).unwrap_or_else(|_| "{}".to_owned());
                (e.seq, e.time_ms, e.event.kind(), data)
            })
            .collect();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin"))?;
        if let Some(n) = new_run {
            tx.execute(
                "INSERT INTO runs (run_id, name, spec, spec_sha256, state, created_ms) VALUES (?1, ?2, ?3, ?4, 'running', ?5)",
                params![run.as_str(), n.name, n.spec, n.spec_sha256, n.created_ms],
            )
            .map_err(sql(path, "insert a run"))?;
        }
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO events (run_id, seq, time_ms, kind, data) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(sql(path, "prepare"))?;
            for (seq, time_ms, kind, data) in &rows {
                insert
                    .execute(params![run.as_str(), seq, time_ms, kind, data])
                    .map_err(sql(path, "insert an event"))?;
            }
        }
        for e in events {
            if let Event::RunFinished { state, reason } = &e.event {
                tx.execute(
                    "UPDATE runs SET state = ?1, reason = ?2, finished_ms = ?3 WHERE run_id = ?4",
                    params![state.as_str(), reason, e.time_ms, run.as_str()],
                )
                .map_err(sql(path, "update a run"))?;
            }
        }
        tx.commit().map_err(sql(path, "commit"))
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<RunSummary>, JournalError> {
        let path = &self.path;
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT run_id, name, state, reason, created_ms, finished_ms FROM runs ORDER BY run_id")
            .map_err(sql(path, "prepare"))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, u64>(4)?,
                    r.get::<_, Option<u64>>(5)?,
                ))
            })
            .map_err(sql(path, "list runs"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, state, reason, created_ms, finished_ms) =
                row.map_err(sql(path, "list runs"))?;
            // Rows this engine did not write are skipped, not fatal.
            let (Ok(run), Some(state)) = (id.parse::<RunId>(), RunState::parse(&state)) else {
                tracing::warn!(journal = %path, run = %id, "skipping a run row this engine cannot read");
                continue;
            };
            out.push(RunSummary {
                run,
                name,
                state,
                reason,
                created_ms,
                finished_ms,
            });
        }
        Ok(out)
    }

    /// The run's highest `seq` (0 without events).
    pub fn last_seq(&self, run: &RunId) -> Result<u64, JournalError> {
        self.conn()
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?1",
                params![run.as_str()],
                |r| r.get(0),
            )
            .map_err(sql(&self.path, "read the last seq"))
    }

    /// A run's spec source.
    pub fn spec(&self, run: &RunId) -> Result<Option<String>, JournalError> {
        self.conn()
            .query_row(
                "SELECT spec FROM runs WHERE run_id = ?1",
                params![run.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(&self.path, "read a spec"))
    }

    /// A run's events with `seq > after`, at most `limit` of them, in order.
    pub fn events(
        &self,
        run: &RunId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<JournalEvent>, JournalError> {
        let path = &self.path;
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT seq, time_ms, data FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
            .map_err(sql(path, "prepare"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = st
            .query_map(params![run.as_str(), after, limit], |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(sql(path, "read events"))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, time_ms, data) = row.map_err(sql(path, "read events"))?;
            let event = serde_json::from_str(&data).map_err(|source| JournalError::Corrupt {
                path: path.clone(),
                run: run.to_string(),
                seq,
                source,
            })?;
            out.push(JournalEvent {
                run: run.clone(),
                seq,
                time_ms,
                event,
            });
        }
        Ok(out)
    }
}

fn sql<'a>(path: &'a str, op: &'static str) -> impl FnOnce(rusqlite::Error) -> JournalError + 'a {
    move |source| JournalError::Sqlite {
        path: path.to_owned(),
        op,
        source,
    }
}

fn io_err<'a>(path: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Opens `path` (creating it empty) and makes it 0600.
fn private_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ev(run: &RunId, seq: u64, event: Event) -> JournalEvent {
        JournalEvent {
            run: run.clone(),
            seq,
            time_ms: 1000 + seq,
            event,
        }
    }

    #[test]
    fn appends_reads_and_locks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/journal.db");
        let j = Journal::open(&JournalConfig::File(p.clone())).unwrap();
        for f in [p.clone(), with_suffix(&p, "-wal"), with_suffix(&p, ".lock")] {
            assert_eq!(
                std::fs::metadata(&f).unwrap().mode() & 0o777,
                0o600,
                "{}",
                f.display()
            );
        }
        assert!(matches!(
            Journal::open(&JournalConfig::File(p.clone())),
            Err(JournalError::Locked { .. })
        ));
        let run = RunId::generate(5);
        let new = NewRun {
            name: "w",
            spec: "spec",
            spec_sha256: "x",
            created_ms: 1001,
        };
        j.append(
            &run,
            &[ev(
                &run,
                1,
                Event::RunSubmitted {
                    name: "w".into(),
                    inputs: Default::default(),
                    spec_sha256: "x".into(),
                },
            )],
            Some(new),
        )
        .unwrap();
        j.append(
            &run,
            &[
                ev(
                    &run,
                    2,
                    Event::StepStarted {
                        step: "a".into(),
                        items: None,
                    },
                ),
                ev(
                    &run,
                    3,
                    Event::RunFinished {
                        state: RunState::Failed,
                        reason: Some("x".into()),
                    },
                ),
            ],
            None,
        )
        .unwrap();
        // A duplicate seq is refused and the whole batch rolls back.
        assert!(
            j.append(
                &run,
                &[
                    ev(&run, 4, Event::StepSucceeded { step: "a".into() }),
                    ev(&run, 3, Event::StepSucceeded { step: "a".into() })
                ],
                None
            )
            .is_err()
        );
        assert_eq!(j.events(&run, 0, 100).unwrap().len(), 3);
        assert_eq!(j.events(&run, 1, 1).unwrap()[0].seq, 2);
        let runs = j.runs().unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].state, RunState::Failed);
        assert_eq!(runs[0].finished_ms, Some(1003));
        assert_eq!(j.spec(&run).unwrap().as_deref(), Some("spec"));
        drop(j);
        // Reopens once released.
        let j = Journal::open(&JournalConfig::File(p)).unwrap();
        assert_eq!(j.events(&run, 0, 100).unwrap().len(), 3);
    }
}
