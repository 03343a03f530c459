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
    /// The identity of a live process, `None` if it does not exist (or is a zombie),
    /// or if it cannot be told (see [`ProcessId::look_up`]).
    pub fn of(pid: u32) -> Option<Self> {
        Self::look_up(pid).ok().flatten()
    }

    /// The identity of `pid`: `Ok(None)` only when the kernel says there is no such
    /// process (ENOENT/ESRCH) or it is a zombie; any other failure (out of file
    /// descriptors, say) is an error, so a caller never takes "could not look" for
    /// "gone" and fails a VM whose hypervisor still runs.
    pub fn look_up(pid: u32) -> std::io::Result<Option<Self>> {
        let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => s,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let malformed =
            || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed /proc stat");
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &stat[stat.rfind(')').ok_or_else(malformed)? + 2..];
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        // rest starts at field 3 (state).
        if fields.first() == Some(&"Z") {
            return Ok(None);
        }
        let start_time = fields
            .get(19)
            .and_then(|f| f.parse().ok())
            .ok_or_else(malformed)?;
        Ok(Some(Self { pid, start_time }))
    }

    /// Whether this exact process still runs. When that cannot be told, it is taken
    /// to run: a live VM must not be recorded as ended because a look failed.
    pub fn is_alive(&self) -> bool {
        match Self::look_up(self.pid) {
            Ok(found) => found == Some(*self),
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "cannot tell whether the process runs; taking it as running");
                true
            }
        }
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
        let fd = match pidfd_open(self.pid) {
            Ok(fd) => fd,
            Err(e) if gone(&e) => return,
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "no pidfd for the process; polling it");
                while self.is_alive() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                return;
            }
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

/// Whether an error means "no such process" (and only that).
fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
        || e.kind() == std::io::ErrorKind::NotFound
}

/// A pidfd for `pid`.
fn pidfd_open(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) })
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

    /// Run in a child process (it exhausts its own file descriptors): a live process
    /// is still taken as alive when `/proc` cannot be read.
    #[test]
    fn a_process_is_not_taken_for_gone_when_its_liveness_cannot_be_read() {
        if std::env::var_os("CLAWOS_FD_EXHAUSTION_CHILD").is_none() {
            let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args([
                    "--exact",
                    "host::tests::a_process_is_not_taken_for_gone_when_its_liveness_cannot_be_read",
                    "--test-threads=1",
                ])
                .env("CLAWOS_FD_EXHAUSTION_CHILD", "1")
                .output()
                .expect("run child");
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let me = ProcessId::of(std::process::id()).expect("self");
        let limit = libc::rlimit {
            rlim_cur: 64,
            rlim_max: 64,
        };
        // SAFETY: setrlimit reads the struct we pass; this child process is ours.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut held = Vec::new();
        let exhausted = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
            assert!(held.len() < 100, "the limit of 64 was not reached");
        };
        assert_eq!(exhausted.raw_os_error(), Some(libc::EMFILE));
        assert!(ProcessId::look_up(me.pid).is_err(), "the look fails");
        assert!(me.is_alive(), "but the process is not taken for gone");
    }

    #[test]
    fn host_facts_are_plausible() {
        assert!(mem_total_mib() > 64);
        assert!(cpus() >= 1);
    }
}
