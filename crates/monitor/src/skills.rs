//! Following skill-manager's audit trail (`<state>/skills/audit.jsonl`, one
//! [`SkillCallRecord`] a line) into the host's, so that skill calls reach the SIEM
//! with everything else.
//!
//! The recorder reads on from a place (inode, offset) after each batch. The place of
//! each record goes into its event ([`AuditEvent::source`]), written in the same line,
//! so a restarted daemon finds it in its own trail and reads on from there: every
//! record once, none lost, however the daemon stopped. skill-manager appends whole
//! lines; a line still being written is read once its newline is there.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clawos_monitor_api::{SkillCall, SkillRequest, SourcePlace};
use clawos_skill_manager_api::{CallerKind, SkillCallRecord};

use crate::event::{AuditEvent, Clock, Kind};

/// The most read per batch (so a long backlog cannot hold the recorder up), and the
/// longest line taken as a record.
const READ_MAX: usize = 1 << 20;

/// How often the file is looked at when nothing is pending.
const POLL: Duration = Duration::from_millis(100);

/// What one line of the followed file became.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Line {
    /// A record, and where it ends.
    Record(Box<SkillCallRecord>, SourcePlace),
    /// A line that is not a record (or longer than [`READ_MAX`]): why, and where it ends.
    Unreadable(String, SourcePlace),
}

/// The follower: where it is in which file.
#[derive(Debug)]
pub(crate) struct SkillTrail {
    path: PathBuf,
    /// This daemon's own live trail: never followed (its lines would come back as
    /// unreadable records, each written again, without end).
    own_trail: PathBuf,
    file: Option<(std::fs::File, u64)>,
    offset: u64,
    /// In a line longer than [`READ_MAX`], skipping to its end (which was its start).
    skipping_from: Option<u64>,
    next_look: Instant,
}

impl SkillTrail {
    /// Follows `path` from `place` (the last one the trail recorded; `None`: from the
    /// start). A place in another file than the one there now (the file was replaced
    /// while the daemon was away) means the start of the new one.
    pub(crate) fn new(path: PathBuf, place: Option<SourcePlace>, own_trail: PathBuf) -> Self {
        let mut t = Self {
            path,
            own_trail,
            file: None,
            offset: 0,
            skipping_from: None,
            next_look: Instant::now(),
        };
        if let Some(p) = place {
            t.offset = p.offset;
            let now_there = t.open_current();
            let other = now_there.is_some();
            t.file = now_there.filter(|(_, inode)| *inode == p.inode);
            if t.file.is_none() && other {
                tracing::warn!(path = %t.path.display(), "skill-manager's audit trail is not the file read before; reading the one there now from its start");
                t.offset = 0;
            }
        }
        t
    }

    fn open_current(&self) -> Option<(std::fs::File, u64)> {
        use std::os::unix::fs::OpenOptionsExt;
        // Not through a symbolic link, neither the file nor its directory: the trail is
        // a file skill-manager made in its own directory.
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
        if dir
            .is_some_and(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_symlink()))
        {
            tracing::warn!(path = %self.path.display(), "skill-manager's audit trail is under a symbolic link: not followed");
            return None;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)
            .ok()?;
        let m = f.metadata().ok()?;
        let same = |p: &std::path::Path| {
            std::fs::metadata(p).is_ok_and(|o| (o.dev(), o.ino()) == (m.dev(), m.ino()))
        };
        let own_dir = self
            .own_trail
            .parent()
            .filter(|d| !d.as_os_str().is_empty());
        let in_own_dir = match (dir, own_dir) {
            (Some(d), Some(o)) => std::fs::metadata(d)
                .ok()
                .zip(std::fs::metadata(o).ok())
                .is_some_and(|(a, b)| (a.dev(), a.ino()) == (b.dev(), b.ino())),
            _ => false,
        };
        if same(&self.own_trail) || in_own_dir {
            tracing::warn!(path = %self.path.display(), "skill-manager's audit trail is this daemon's own trail: not followed");
            return None;
        }
        m.is_file().then_some((f, m.ino()))
    }

    /// The lines completed since the last call (at most [`READ_MAX`] bytes' worth).
    pub(crate) fn poll(&mut self, now: Instant) -> Vec<Line> {
        if now < self.next_look {
            return Vec::new();
        }
        self.next_look = now + POLL;
        if self.file.is_none() {
            self.file = self.open_current();
            self.offset = 0;
        }
        let Some((file, inode)) = &self.file else {
            return Vec::new();
        };
        let inode = *inode;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            tracing::warn!(path = %self.path.display(), was = self.offset, now = len, "skill-manager's audit trail was cut short; reading it again from its start");
            self.offset = 0;
            self.skipping_from = None;
        }
        let mut lines = self.read(inode, len);
        if lines.is_empty() && self.offset >= len {
            // At the end of this file: if another is there now, go on in that one.
            let replaced = std::fs::symlink_metadata(&self.path)
                .map(|m| m.ino() != inode)
                .unwrap_or(false);
            if replaced {
                tracing::info!(path = %self.path.display(), "skill-manager's audit trail was replaced; following the new file");
                if let Some(from) = self.skipping_from.take() {
                    lines.push(Line::Unreadable(
                        format!(
                            "a line of {} bytes or more at offset {from}, never ended (the file was replaced)",
                            self.offset.saturating_sub(from)
                        ),
                        SourcePlace {
                            inode,
                            offset: self.offset,
                        },
                    ));
                }
                self.file = None;
                self.next_look = now;
            }
        } else {
            // More may be waiting: look again after the next batch.
            self.next_look = now;
        }
        lines
    }

    fn read(&mut self, inode: u64, len: u64) -> Vec<Line> {
        let Some((file, _)) = &self.file else {
            return Vec::new();
        };
        let want = usize::try_from(len - self.offset)
            .unwrap_or(READ_MAX)
            .min(READ_MAX);
        if want == 0 {
            return Vec::new();
        }
        let mut buf = vec![0u8; want];
        let got = match file.read_at(&mut buf, self.offset) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read skill-manager's audit trail");
                return Vec::new();
            }
        };
        buf.truncate(got);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + i];
            let end = self.offset + (start + i + 1) as u64;
            let place = SourcePlace { inode, offset: end };
            if let Some(from) = self.skipping_from.take() {
                out.push(Line::Unreadable(
                    format!(
                        "a line of {} bytes (longer than {READ_MAX}) at offset {from}",
                        end.saturating_sub(from + 1)
                    ),
                    place,
                ));
            } else if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(match serde_json::from_slice::<SkillCallRecord>(line) {
                    Ok(r) => Line::Record(Box::new(r), place),
                    Err(e) => Line::Unreadable(
                        format!(
                            "not a skill call record at offset {}: {e}",
                            end - i as u64 - 1
                        ),
                        place,
                    ),
                });
            }
            start += i + 1;
        }
        if start == 0 && got == READ_MAX {
            // A whole read without a line end: skip it, and report the line at its end.
            self.skipping_from.get_or_insert(self.offset);
            start = got;
        }
        self.offset += start as u64;
        out
    }
}

/// The trail's event of a followed line.
pub(crate) fn event(line: Line, seq: u64, host: &str) -> AuditEvent {
    match line {
        Line::Record(r, place) => {
            let ts = if time::OffsetDateTime::parse(
                &r.time,
                &time::format_description::well_known::Rfc3339,
            )
            .is_ok()
            {
                r.time.clone()
            } else {
                Clock::now()
            };
            let mut e = AuditEvent::new(seq, ts, host, Kind::SkillCall);
            e.source = Some(place);
            e.agent = r.agent.clone();
            e.detail = r.error.clone();
            e.skill_call = Some(SkillCall {
                outcome: r.outcome().as_str().into(),
                skill: r.skill,
                version: r.version,
                caller: match r.caller {
                    CallerKind::Agent => "agent",
                    CallerKind::Operator => "operator",
                }
                .into(),
                vm_id: r.vm_id,
                duration_ms: r.duration_ms,
                input_bytes: r.input_bytes,
                output_bytes: r.output_bytes,
                requests: r
                    .requests
                    .into_iter()
                    .map(|q| SkillRequest {
                        destination: q.destination,
                        allowed: q.allowed,
                        status: q.status,
                        bytes: q.bytes,
                    })
                    .collect(),
                refused_unrecorded_before: r.refused_unrecorded_before,
            });
            e
        }
        Line::Unreadable(why, place) => {
            let mut e = AuditEvent::new(seq, Clock::now(), host, Kind::SkillCall);
            e.source = Some(place);
            e.detail = Some(format!("unreadable skill-manager audit record: {why}"));
            e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn record(skill: &str) -> String {
        let r = SkillCallRecord {
            time: "2026-12-02T10:00:00Z".into(),
            kind: clawos_skill_manager_api::RecordKind::SkillCall,
            skill: skill.into(),
            version: "1.0.0".into(),
            caller: CallerKind::Agent,
            agent: Some("a1".into()),
            vm_id: Some("a1-1".into()),
            ok: true,
            error: None,
            refused: None,
            refused_unrecorded_before: None,
            aborted: false,
            duration_ms: 3,
            input_bytes: 2,
            output_bytes: 5,
            requests: Vec::new(),
            log: Vec::new(),
        };
        let mut s = serde_json::to_string(&r).expect("json");
        s.push('\n');
        s
    }

    fn skills(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| match l {
                Line::Record(r, _) => r.skill.clone(),
                Line::Unreadable(why, _) => format!("?{why}"),
            })
            .collect()
    }

    fn append(path: &Path, text: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("open");
        f.write_all(text).expect("write");
    }

    /// The daemon's own trail, in a directory of its own beside the followed one.
    fn own(d: &tempfile::TempDir) -> PathBuf {
        let dir = d.path().join("monitor");
        std::fs::create_dir_all(&dir).expect("monitor dir");
        dir.join("audit.jsonl")
    }

    /// Polls as the recorder does once it is time to look again.
    fn poll(t: &mut SkillTrail) -> Vec<Line> {
        let now = Instant::now();
        t.next_look = now;
        t.poll(now)
    }

    #[test]
    fn whole_lines_are_read_once_and_a_restart_reads_on_from_the_last_place() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("audit.jsonl");
        let mut t = SkillTrail::new(p.clone(), None, own(&d));
        assert!(poll(&mut t).is_empty(), "no file yet");
        append(&p, record("one").as_bytes());
        let two = record("two");
        let (head, tail) = two.split_at(20);
        append(&p, head.as_bytes());
        let got = poll(&mut t);
        assert_eq!(skills(&got), ["one"], "a line being written waits");
        append(&p, tail.as_bytes());
        append(&p, b"\n{\"not\": \"a record\"}\n");
        let got = poll(&mut t);
        assert_eq!(skills(&got)[0], "two");
        assert!(
            skills(&got)[1].starts_with("?not a skill call record at offset"),
            "{:?}",
            skills(&got)
        );
        assert_eq!(got.len(), 2, "blank lines are no records");
        let Line::Unreadable(_, last) = &got[1] else {
            panic!("unreadable")
        };
        assert_eq!(last.offset, std::fs::metadata(&p).expect("meta").len());
        assert!(poll(&mut t).is_empty(), "nothing is read twice");

        // A restart from the place of the second record reads the rest only.
        let Line::Record(_, second) = &got[0] else {
            panic!("record")
        };
        append(&p, record("three").as_bytes());
        let mut again = SkillTrail::new(p.clone(), Some(*second), own(&d));
        assert_eq!(skills(&poll(&mut again)).len(), 2);
        // A place in a file that is gone: the new file from its start.
        let old = SourcePlace {
            inode: second.inode + 1,
            offset: 5,
        };
        let mut other = SkillTrail::new(p, Some(old), own(&d));
        assert_eq!(
            skills(&poll(&mut other)).len(),
            4,
            "one, two, the non-record, three"
        );
    }

    #[test]
    fn a_replaced_or_cut_file_is_read_from_its_start_and_an_endless_line_is_skipped() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("audit.jsonl");
        append(&p, record("old").as_bytes());
        let mut t = SkillTrail::new(p.clone(), None, own(&d));
        assert_eq!(skills(&poll(&mut t)), ["old"]);
        // Written to the old file after the rename: still read, then the new file.
        std::fs::rename(&p, d.path().join("audit.jsonl.1")).expect("rename");
        append(&d.path().join("audit.jsonl.1"), record("late").as_bytes());
        append(&p, record("new").as_bytes());
        assert_eq!(skills(&poll(&mut t)), ["late"]);
        assert!(poll(&mut t).is_empty(), "the end of the old file");
        assert_eq!(skills(&poll(&mut t)), ["new"]);
        // Cut short: from the start again.
        std::fs::write(&p, record("c")).expect("write");
        assert_eq!(skills(&poll(&mut t)), ["c"]);

        // A line longer than a read: reported once, at its end; the next is read.
        let big = vec![b'x'; READ_MAX * 2 + 10];
        append(&p, &big);
        append(&p, b"\n");
        append(&p, record("after").as_bytes());
        let mut got = Vec::new();
        for _ in 0..5 {
            got.extend(skills(&poll(&mut t)));
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with(&format!("?a line of {} bytes", big.len())));
        assert_eq!(got[1], "after");
    }

    #[test]
    fn the_daemons_own_trail_is_never_followed() {
        let d = tempfile::tempdir().expect("tmp");
        let own_trail = own(&d);
        std::fs::write(&own_trail, record("own")).expect("write");
        // The same file under the skills name (a hard link), and the monitor's
        // directory in place of skill-manager's.
        std::fs::create_dir(d.path().join("skills")).expect("dir");
        let linked = d.path().join("skills/audit.jsonl");
        std::fs::hard_link(&own_trail, &linked).expect("link");
        let mut t = SkillTrail::new(linked, None, own_trail.clone());
        assert!(poll(&mut t).is_empty());
        let mut t = SkillTrail::new(
            d.path().join("monitor/other.jsonl"),
            None,
            own_trail.clone(),
        );
        std::fs::write(d.path().join("monitor/other.jsonl"), record("x")).expect("write");
        assert!(
            poll(&mut t).is_empty(),
            "nothing in the monitor's own directory"
        );
        // skill-manager's directory swapped for a link to the monitor's.
        std::fs::remove_dir_all(d.path().join("skills")).expect("rm");
        std::os::unix::fs::symlink(d.path().join("monitor"), d.path().join("skills"))
            .expect("symlink");
        let mut t = SkillTrail::new(d.path().join("skills/other.jsonl"), None, own_trail);
        assert!(poll(&mut t).is_empty(), "not through a linked directory");
    }

    #[test]
    fn a_symbolic_link_is_not_followed() {
        let d = tempfile::tempdir().expect("tmp");
        let target = d.path().join("elsewhere");
        append(&target, record("secret").as_bytes());
        let p = d.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&target, &p).expect("symlink");
        let mut t = SkillTrail::new(p, None, own(&d));
        assert!(poll(&mut t).is_empty());
    }

    #[test]
    fn a_record_becomes_a_skill_call_event() {
        let mut r: SkillCallRecord =
            serde_json::from_str(record("web-search").trim()).expect("record");
        r.refused = Some("rate limit".into());
        r.error = Some("agent a1 has made its calls".into());
        r.requests.push(clawos_skill_manager_api::RequestSummary {
            destination: "https://evil.example:443".into(),
            allowed: false,
            status: None,
            bytes: 0,
        });
        let place = SourcePlace {
            inode: 7,
            offset: 99,
        };
        let e = event(Line::Record(Box::new(r), place), 12, "h");
        assert_eq!(e.kind, Kind::SkillCall);
        assert_eq!((e.seq, e.ts.as_str()), (12, "2026-12-02T10:00:00Z"));
        assert_eq!(e.agent.as_deref(), Some("a1"));
        assert_eq!(e.source, Some(place));
        assert_eq!(e.detail.as_deref(), Some("agent a1 has made its calls"));
        let c = e.skill_call.expect("skill_call");
        assert_eq!(
            (c.skill.as_str(), c.outcome.as_str(), c.caller.as_str()),
            ("web-search", "refused", "agent")
        );
        assert!(!c.requests[0].allowed);
    }
}
