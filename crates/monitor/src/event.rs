//! Audit events: the raw record the eBPF program writes, and the JSONL form.

pub use clawos_syscall_probe::{PATH_LEN, RawEvent, c_str};

/// The syscall's name on x86_64, or `syscall_<nr>` for numbers this table lacks.
pub fn syscall_name(nr: i32) -> String {
    usize::try_from(nr)
        .ok()
        .and_then(syscalls::x86_64::Sysno::new)
        .map_or_else(|| format!("syscall_{nr}"), |s| s.name().to_owned())
}

pub use clawos_monitor_api::{AuditEvent, Kind};

/// Converts the kernel's boot-time stamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Realtime minus boottime, nanoseconds.
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(id, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    pub fn new() -> Self {
        Self {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME),
        }
    }

    /// The clock of another machine (a VM's guest), from its realtime − boottime.
    pub fn with_offset(offset_ns: i64) -> Self {
        Self {
            offset_ns: i128::from(offset_ns),
        }
    }

    /// RFC 3339 (UTC, nanoseconds) of a boot-time stamp.
    pub fn format(&self, boot_ns: u64) -> String {
        format_unix_ns(self.offset_ns + i128::from(boot_ns))
    }

    /// RFC 3339 of now.
    pub fn now() -> String {
        format_unix_ns(clock_ns(libc::CLOCK_REALTIME))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

fn format_unix_ns(ns: i128) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_known_and_unknown_syscalls() {
        assert_eq!(syscall_name(110), "getppid");
        assert_eq!(syscall_name(257), "openat");
        assert_eq!(syscall_name(101), "ptrace");
        assert_eq!(syscall_name(-1), "syscall_-1");
        assert_eq!(syscall_name(100_000), "syscall_100000");
    }
}
