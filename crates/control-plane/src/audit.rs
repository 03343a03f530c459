//! The operator audit trail: one JSON line per request to the control plane, refused
//! or not — who, with which role, did what to which target, with what result, under
//! which request id — in `<state>/control-plane/audit.jsonl` (0600, append-only).
//!
//! A record is written (handed to the kernel) before its answer leaves, so a client
//! that saw an answer can find its record; the file is not fsynced per request (a
//! power cut may lose the last records, a crash of the daemon does not).
//!
//! The trail is bounded: once the file passes [`Rotation::max_bytes`] it becomes
//! `audit.jsonl.1` (the one before `.2`, …) and a new file starts; [`Rotation::keep`]
//! old files are kept, the oldest beyond them removed — a record leaves the disk only
//! that way, never by being cut. Ship the trail elsewhere (a SIEM) for longer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One request as the trail records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    pub request_id: String,
    /// The operator's name; `-` when the caller did not authenticate.
    pub operator: String,
    /// Their role, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `token`, or `-`.
    pub via: String,
    /// What was asked, e.g. `vm.stop` (the route's action name).
    pub action: String,
    /// What it was asked of (a VM name, a token id), when the route names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `ok` (2xx/3xx), `refused` (401, 403: not let through), `failed` (other 4xx/5xx),
    /// `aborted` (499: the client went away before the answer; the action may have
    /// happened).
    pub result: String,
    pub status: u16,
    /// The peer's address.
    pub remote: String,
    /// The `x-request-id` the client sent, when it sent one: kept beside the server's
    /// own id (`request_id`), which a client cannot choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
}

impl AuditRecord {
    /// The result word for an HTTP status.
    pub fn result_of(status: u16) -> &'static str {
        match status {
            401 | 403 => "refused",
            s if s < 400 => "ok",
            _ => "failed",
        }
    }
}

/// When the trail moves to a new file, and how many old ones stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// A file past this size is rotated (checked after each record).
    pub max_bytes: u64,
    /// Old files kept (`audit.jsonl.1` … `.keep`).
    pub keep: u32,
}

impl Default for Rotation {
    /// 64 MiB a file, 8 old files: about 200,000 records a file.
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            keep: 8,
        }
    }
}

struct Current {
    file: std::fs::File,
    len: u64,
    /// After a failed rotation, the size at which to try again (not at every record).
    retry_at: u64,
}

/// Appends records to the trail.
pub struct AuditTrail {
    path: PathBuf,
    rotation: Rotation,
    current: Mutex<Current>,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("path", &self.path)
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

fn open_append(path: &Path) -> std::io::Result<Current> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let len = file.metadata()?.len();
    Ok(Current {
        file,
        len,
        retry_at: 0,
    })
}

impl AuditTrail {
    /// Opens `path` for appending (creating it 0600), rotated by the default
    /// [`Rotation`].
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::with_rotation(path, Rotation::default())
    }

    /// Opens `path` for appending, rotated by `rotation`.
    pub fn with_rotation(path: &Path, rotation: Rotation) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            rotation,
            current: Mutex::new(open_append(path)?),
        })
    }

    /// `audit.jsonl.{n}`.
    fn old(&self, n: u32) -> PathBuf {
        self.with_suffix(&format!(".{n}"))
    }

    /// Moves the full file to `.1` (older ones up by one, the oldest past `keep`
    /// removed) and starts a new one. Called with the file's lock held, so no record
    /// is written meanwhile. No step overwrites a file: the full file is moved aside
    /// (to `.rotating`) only when nothing is there, a new file is opened before any
    /// old one is touched (if it cannot be, the full file goes back), old files move
    /// up only into free names (the first that cannot stops the shift), and the full
    /// file becomes `.1` only when that name is free — else it stays `.rotating`,
    /// logged, and no rotation happens until an operator has looked.
    fn rotate(&self, cur: &mut Current) -> std::io::Result<()> {
        let keep = self.rotation.keep.max(1);
        let staging = self.with_suffix(".rotating");
        if staging.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} is left from a rotation that did not finish: move it beside the old files (as the next free .N) and rotation resumes",
                    staging.display()
                ),
            ));
        }
        std::fs::rename(&self.path, &staging)?;
        let fresh = match open_append(&self.path) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::rename(&staging, &self.path);
                return Err(e);
            }
        };
        *cur = fresh;
        match std::fs::remove_file(self.old(keep)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(error = %e, path = %self.old(keep).display(), "cannot remove the oldest audit file")
            }
        }
        for n in (1..keep).rev() {
            match move_into_free(&self.old(n), &self.old(n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(error = %e, from = %self.old(n).display(), "cannot move an old audit file up; the older ones stay as they are");
                    break;
                }
            }
        }
        if let Err(e) = move_into_free(&staging, &self.old(1)) {
            return Err(std::io::Error::new(
                e.kind(),
                format!("the full audit file stays at {}: {e}", staging.display()),
            ));
        }
        tracing::info!(path = %self.path.display(), kept = keep, "operator audit trail rotated");
        Ok(())
    }

    /// The trail's path with `suffix` appended.
    fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `rec` as one line (one `write`, so concurrent writers never interleave).
    pub fn record(&self, rec: &AuditRecord) {
        let mut line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        line.push(b'\n');
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = cur.file.write_all(&line) {
            // Not silently: the diagnostic log says a record is missing and which.
            tracing::error!(error = %e, path = %self.path.display(), request_id = rec.request_id, action = rec.action, "cannot write an audit record");
            return;
        }
        cur.len += line.len() as u64;
        if cur.len >= self.rotation.max_bytes
            && cur.len >= cur.retry_at
            && let Err(e) = self.rotate(&mut cur)
        {
            // The current file keeps growing rather than losing a record; the next
            // attempt comes after another eighth of a file, not at every record.
            cur.retry_at = cur.len + (self.rotation.max_bytes / 8).max(1);
            tracing::error!(error = %e, path = %self.path.display(), "cannot rotate the operator audit trail; still appending to it");
        }
    }
}

impl AuditTrail {
    /// The newest `n` records, oldest first, from the current file and, when it holds
    /// fewer, the one rotated before it. Reads each file from its end, so the cost does
    /// not grow with the trail; a line that does not parse (one cut by a crash) is
    /// skipped.
    pub fn tail(&self, n: usize) -> std::io::Result<Vec<AuditRecord>> {
        let mut newest = tail_of(&self.path, n)?;
        if newest.len() < n {
            match tail_of(&self.old(1), n - newest.len()) {
                Ok(mut older) => {
                    older.append(&mut newest);
                    newest = older;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(newest)
    }
}

/// Renames `from` to `to` only if `to` does not exist (a hard link, which refuses to
/// replace, then the old name removed): a rotation never overwrites a file.
fn move_into_free(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

/// The last `n` records of one file.
fn tail_of(path: &Path, n: usize) -> std::io::Result<Vec<AuditRecord>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    // Records are a few hundred bytes; read back until n lines are in or the start.
    let mut want = (n as u64 + 1) * 512;
    loop {
        let start = len.saturating_sub(want);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        Read::by_ref(&mut f)
            .take(len - start)
            .read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0); // maybe cut in the middle
        }
        if lines.len() >= n || start == 0 {
            let from = lines.len().saturating_sub(n);
            return Ok(lines[from..]
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect());
        }
        want *= 4;
    }
}

/// Now as RFC 3339 UTC with milliseconds.
pub fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&fmt).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_append_as_json_lines_in_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let t = AuditTrail::open(&path).expect("open");
        for (i, status) in [200u16, 403, 502].into_iter().enumerate() {
            t.record(&AuditRecord {
                ts: timestamp(),
                request_id: format!("r{i}"),
                operator: "alice".into(),
                role: Some("viewer".into()),
                via: "token".into(),
                action: "vm.stop".into(),
                target: Some("a".into()),
                result: AuditRecord::result_of(status).into(),
                status,
                remote: "127.0.0.1:1".into(),
                client_request_id: None,
            });
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let recs: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        let results: Vec<&str> = recs.iter().map(|r| r.result.as_str()).collect();
        assert_eq!(results, ["ok", "refused", "failed"]);
        assert!(
            recs[0].ts.ends_with('Z') && recs[0].ts.len() == 24,
            "{}",
            recs[0].ts
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("meta").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let last: Vec<String> = t
            .tail(2)
            .expect("tail")
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(last, ["r1", "r2"]);
        assert_eq!(t.tail(10).expect("tail").len(), 3);
    }

    /// The request ids in file `p`, in order (each line a whole record).
    fn ids(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<AuditRecord>(l)
                    .expect("a whole record")
                    .request_id
            })
            .collect()
    }

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            ts: timestamp(),
            request_id: format!("r{i:04}"),
            operator: "alice".into(),
            role: Some("admin".into()),
            via: "token".into(),
            action: "vm.list".into(),
            target: None,
            result: "ok".into(),
            status: 200,
            remote: "127.0.0.1:1".into(),
            client_request_id: None,
        }
    }

    #[test]
    fn a_full_trail_rotates_and_keeps_every_record_until_the_oldest_file_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 2000,
            keep: 3,
        };
        let t = AuditTrail::with_rotation(&path, rotation).expect("open");
        // Enough for two rotations: every record is in exactly one file, in order.
        let mut written = 0;
        while !t.old(2).exists() {
            t.record(&record(written));
            written += 1;
            assert!(written < 1000, "never rotated twice");
        }
        let mut all = ids(&t.old(2));
        all.extend(ids(&t.old(1)));
        all.extend(ids(&path));
        let want: Vec<String> = (0..written).map(|i| format!("r{i:04}")).collect();
        assert_eq!(all, want, "no record lost or repeated across rotation");
        assert!(std::fs::metadata(t.old(1)).expect(".1").len() >= rotation.max_bytes);
        for p in [t.old(1), t.old(2), path.clone()] {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&p).expect("meta").permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        // The tail reaches back into the file before the current one.
        let in_current = ids(&path).len();
        let tail = t.tail(in_current + 3).expect("tail");
        assert_eq!(tail.len(), in_current + 3);
        assert_eq!(
            tail.last().map(|r| r.request_id.clone()),
            want.last().cloned()
        );
        // Past `keep`, the oldest file goes, and only it.
        while !t.old(3).exists() {
            t.record(&record(written));
            written += 1;
        }
        let first_kept = ids(&t.old(3));
        while ids(&t.old(3)) == first_kept {
            t.record(&record(written));
            written += 1;
            assert!(written < 5000, "never rotated past keep");
        }
        assert!(
            !t.old(4).exists(),
            "only {} old files are kept",
            rotation.keep
        );
        let mut kept = ids(&t.old(3));
        kept.extend(ids(&t.old(2)));
        kept.extend(ids(&t.old(1)));
        kept.extend(ids(&path));
        let from = written - kept.len();
        let want: Vec<String> = (from..written).map(|i| format!("r{i:04}")).collect();
        assert_eq!(
            kept, want,
            "the kept files hold the newest records, contiguous"
        );
    }

    /// Rotations that cannot finish lose and overwrite nothing: one whose full file
    /// cannot be moved aside touches no old file; one whose old files cannot move up
    /// (a directory where `.2` would go) leaves `.1` as it was and the full file under
    /// `.rotating`, and rotates no more until that is cleared, records still coming
    /// into the live file.
    #[test]
    fn rotations_that_cannot_finish_lose_and_overwrite_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 1500,
            keep: 3,
        };
        let t = AuditTrail::with_rotation(&path, rotation).expect("open");
        let mut written = 0;
        while !t.old(1).exists() {
            t.record(&record(written));
            written += 1;
        }
        let first = std::fs::read(t.old(1)).expect(".1");
        // `.2` taken by a directory: the shift stops, `.1` cannot be freed.
        std::fs::create_dir(t.old(2)).expect("block .2");
        std::fs::write(t.old(2).join("x"), b"x").expect("non-empty");
        let staging = t.with_suffix(".rotating");
        while !staging.exists() {
            t.record(&record(written));
            written += 1;
            assert!(written < 1000, "never tried to rotate");
        }
        assert_eq!(std::fs::read(t.old(1)).expect(".1"), first, ".1 untouched");
        // Further records go on into the live file; no rotation overwrites .rotating.
        let parked = std::fs::read(&staging).expect("staging");
        for _ in 0..60 {
            t.record(&record(written));
            written += 1;
        }
        assert_eq!(
            std::fs::read(&staging).expect("staging"),
            parked,
            ".rotating untouched"
        );
        let mut all = ids(&t.old(1));
        all.extend(ids(&staging));
        all.extend(ids(&path));
        let want: Vec<String> = (0..written).map(|i| format!("r{i:04}")).collect();
        assert_eq!(all, want, "every record in exactly one file, in order");
    }
}
