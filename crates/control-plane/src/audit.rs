//! The operator audit trail: one JSON line per request to the control plane, refused
//! or not — who, with which role, did what to which target, with what result, under
//! which request id — in `<state>/control-plane/audit.jsonl` (0600, append-only).
//!
//! A record is written (handed to the kernel) before its answer leaves, so a client
//! that saw an answer can find its record; the file is not fsynced per request (a
//! power cut may lose the last records, a crash of the daemon does not).

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

/// Appends records to the trail.
#[derive(Debug)]
pub struct AuditTrail {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditTrail {
    /// Opens `path` for appending (creating it 0600).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
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
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&line) {
            // Not silently: the diagnostic log says a record is missing and which.
            tracing::error!(error = %e, path = %self.path.display(), request_id = rec.request_id, action = rec.action, "cannot write an audit record");
        }
    }
}

impl AuditTrail {
    /// The newest `n` records, oldest first. Reads the file from its end, so the cost
    /// does not grow with the trail; a line that does not parse (one cut by a crash) is
    /// skipped.
    pub fn tail(&self, n: usize) -> std::io::Result<Vec<AuditRecord>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.path)?;
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
}
