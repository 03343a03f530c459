//! Facts about the host: process identity, memory, CPUs, virtualization, TSC.

use std::fs;

/// A process identified by pid *and* start time, so a recycled pid is never mistaken
/// for the hypervisor the launcher started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessId {
    /// The identity of a live process, `None` if it does not exist (or is a zombie).
    pub fn of(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        // rest starts at field 3 (state).
        if fields.first() == Some(&"Z") {
            return None;
        }
        let start_time = fields.get(19)?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    /// Whether this exact process still runs.
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|p| p == *self)
    }

    /// Sends a signal, only if this exact process still runs.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        if !self.is_alive() {
            return false;
        }
        // SAFETY: kill takes plain integers; the pid was checked to be our process just
        // before (the remaining race is the usual one of any kill(2)).
        unsafe { libc::kill(self.pid as libc::pid_t, sig) == 0 }
    }
}

impl ProcessId {
    /// Resolves when this exact process has ended (at once if it already has). Woken
    /// by the kernel through a pidfd, not by polling; the start time is checked after
    /// the pidfd is open, so a recycled pid is never waited on.
    pub async fn exited(&self) {
        let Some(fd) = pidfd_open(self.pid) else {
            return;
        };
        if !self.is_alive() {
            return;
        }
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and is the
        // same descriptor until the AsyncFd is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        match registered {
            // A pidfd becomes readable when its process exits.
            Ok(afd) => drop(afd.readable().await),
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "cannot watch the process through its pidfd; polling it");
                while self.is_alive() {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A pidfd for `pid`, or `None` if there is no such process.
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) })
}

/// Total host memory in MiB.
pub fn mem_total_mib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// Online CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Hardware virtualization usable: `/dev/kvm` and a CPU flag for it. (A nested "PVM"
/// KVM without vmx/svm hangs stock guests; treat it as absent.)
pub fn has_hardware_kvm() -> bool {
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_flag = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_ascii_whitespace().any(|f| f == "vmx" || f == "svm"));
    cpu_flag && fs::metadata("/dev/kvm").is_ok()
}

/// Host TSC frequency in kHz, which a microvm guest under software emulation needs on
/// its command line (`tsc_early_khz`) or it never gets a timer tick.
pub fn tsc_khz() -> Option<u64> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))?
        .trim_start_matches([' ', '\t', ':'])
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_identity_is_stable_and_specific() {
        let me = ProcessId::of(std::process::id()).expect("self");
        assert!(me.is_alive());
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !other.is_alive(),
            "same pid, other start time is another process"
        );
        assert!(ProcessId::of(u32::MAX - 1).is_none());
    }

    #[test]
    fn host_facts_are_plausible() {
        assert!(mem_total_mib() > 64);
        assert!(cpus() >= 1);
    }
}
