//! Watches: which processes and cgroups the kernel program follows, the tag (index)
//! each one's events carry and the agent/VM label behind it, and the list kept in
//! `<state>/monitor/watches.json` so a restarted daemon re-applies the watches whose
//! process is still the same one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clawos_monitor_api::WatchRequest;
use serde::{Deserialize, Serialize};

use crate::probe::{Maps, ProbeError};

/// Agent and VM label of each tag (index = tag), shared with the recorder thread.
pub(crate) type Labels = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Why a watch was not added.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The request names no valid target (malformed, no such process, not a cgroup).
    #[error("{0}")]
    Invalid(String),
    /// The kernel's watch maps refused the entry (e.g. a full table).
    #[error(transparent)]
    Maps(#[from] ProbeError),
}

/// A watch and the tag its events carry.
#[derive(Debug, Clone)]
struct Watched {
    req: WatchRequest,
    cgroup_id: Option<u64>,
    /// The process's start time (clock ticks after boot), so a restarted daemon does not
    /// re-watch a reused pid.
    start_time: Option<u64>,
    active: bool,
}

/// A watch as persisted in `watches.json`, re-applied when the daemon restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedWatch {
    req: WatchRequest,
    start_time: Option<u64>,
}

/// Field 22 of `/proc/<pid>/stat`.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    stat[stat.rfind(')')? + 2..]
        .split_ascii_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The watch table. Tags are never reused while the daemon runs: an ended watch keeps
/// its slot, so a late event of it is still labelled.
#[derive(Debug)]
pub struct Watches {
    maps: Maps,
    /// Index = tag in the kernel maps.
    tags: Mutex<Vec<Watched>>,
    labels: Labels,
    /// Active watches, re-applied after a restart.
    file: PathBuf,
}

impl Watches {
    pub(crate) fn new(maps: Maps, labels: Labels, file: PathBuf) -> Self {
        Self {
            maps,
            tags: Mutex::new(Vec::new()),
            labels,
            file,
        }
    }

    /// The kernel maps (for the drop count).
    pub(crate) fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Adds a watch; returns its tag. Watching the same thing again returns the same tag.
    pub fn add(&self, req: WatchRequest) -> Result<u32, WatchError> {
        req.check().map_err(WatchError::Invalid)?;
        let cgroup_id = match &req.cgroup {
            Some(c) => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(c)
                    .map_err(|e| WatchError::Invalid(format!("{}: {e}", c.display())))?;
                if !m.is_dir() {
                    return Err(WatchError::Invalid(format!(
                        "{} is not a cgroup directory",
                        c.display()
                    )));
                }
                Some(m.ino())
            }
            None => None,
        };
        if let Some(pid) = req.pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            return Err(WatchError::Invalid(format!("no process with pid {pid}")));
        }
        let start_time = req.pid.and_then(process_start_time);
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = tags.iter().position(|w| w.active && w.req == req) {
            return Ok(i as u32);
        }
        let tag = tags.len() as u32;
        // The label goes in before the kernel can emit events with the tag; labels are
        // only pushed under the `tags` lock, so a failure can take it back out.
        let mut labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        labels.push((req.agent.clone(), req.vm.clone()));
        drop(labels);
        let result = match (req.pid, cgroup_id) {
            (Some(pid), _) => self.maps.watch_pid(pid, tag),
            (None, Some(id)) => self.maps.watch_cgroup(id, tag),
            (None, None) => Ok(()),
        };
        if let Err(e) = result {
            self.labels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .truncate(tag as usize);
            return Err(e.into());
        }
        tracing::info!(agent = %req.agent, vm = ?req.vm, pid = ?req.pid, cgroup = ?req.cgroup, tag, "watching");
        tags.push(Watched {
            req,
            cgroup_id,
            start_time,
            active: true,
        });
        self.save(&tags);
        Ok(tag)
    }

    /// Removes the watches of a pid or cgroup; whether there was one.
    pub fn remove(&self, pid: Option<u32>, cgroup: Option<&Path>) -> bool {
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = false;
        for w in tags.iter_mut().filter(|w| w.active) {
            if pid.is_some() && w.req.pid == pid {
                self.maps.unwatch_pid(pid.unwrap_or_default());
                w.active = false;
                found = true;
            }
            if let (Some(c), Some(id)) = (cgroup, w.cgroup_id)
                && w.req.cgroup.as_deref() == Some(c)
            {
                self.maps.unwatch_cgroup(id);
                w.active = false;
                found = true;
            }
        }
        if found {
            self.save(&tags);
        }
        found
    }

    /// The active watches.
    pub fn list(&self) -> Vec<WatchRequest> {
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|w| w.active)
            .map(|w| w.req.clone())
            .collect()
    }

    /// Persists the active watches (a failure is logged: watching goes on).
    fn save(&self, tags: &[Watched]) {
        let saved: Vec<SavedWatch> = tags
            .iter()
            .filter(|w| w.active)
            .map(|w| SavedWatch {
                req: w.req.clone(),
                start_time: w.start_time,
            })
            .collect();
        let result = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|json| clawos_service::atomic_write(&self.file, &json, 0o600));
        if let Err(e) = result {
            tracing::error!(error = %e, path = %self.file.display(), "cannot save the watch list");
        }
    }

    /// Re-applies the watches of an earlier run whose process is still the same one.
    pub(crate) fn restore(&self) {
        let Ok(text) = std::fs::read(&self.file) else {
            return;
        };
        let saved: Vec<SavedWatch> = serde_json::from_slice(&text).unwrap_or_default();
        for w in saved {
            let same = match w.req.pid {
                Some(pid) => {
                    process_start_time(pid).is_some() && process_start_time(pid) == w.start_time
                }
                None => w.req.cgroup.as_ref().is_some_and(|c| c.is_dir()),
            };
            if !same {
                tracing::info!(agent = %w.req.agent, pid = ?w.req.pid, "not re-watching: the process is gone");
                continue;
            }
            if let Err(e) = self.add(w.req) {
                tracing::warn!(error = %e, "cannot re-apply a saved watch");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_specs_parse_and_validate() {
        let w: WatchRequest = "pid=12,agent=a1,vm=v1".parse().expect("pid");
        assert_eq!(
            (w.pid, w.agent.as_str(), w.vm.as_deref()),
            (Some(12), "a1", Some("v1"))
        );
        for bad in [
            "agent=a",
            "pid=1,cgroup=/sys/fs/cgroup/x,agent=a",
            "pid=x,agent=a",
            "pid=1,agent=a b",
            "cgroup=/etc,agent=a",
            "pid=1,agent=a,color=red",
        ] {
            assert!(bad.parse::<WatchRequest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_process_start_time_is_read_past_its_command_name() {
        let me = process_start_time(std::process::id()).expect("this process");
        assert!(me > 0);
        assert_eq!(process_start_time(std::process::id()), Some(me));
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
