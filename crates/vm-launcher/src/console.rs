//! Reading the guest console: readiness and the reason a guest failed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use clawos_guest_protocol::marker::{FATAL, POWEROFF, READY};

/// Incremental reader of a console log that spots the ready marker.
#[derive(Debug, Default)]
pub struct ReadyWatch {
    offset: u64,
    partial: String,
}

impl ReadyWatch {
    /// Starts reading at byte `offset` (0 for a fresh boot).
    pub fn new(offset: u64) -> Self {
        Self {
            offset,
            partial: String::new(),
        }
    }

    /// Reads what was appended since the last call; true once a ready line appeared.
    pub fn poll(&mut self, path: &Path) -> bool {
        let Ok(mut f) = File::open(path) else {
            return false;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = Vec::new();
        let Ok(n) = f.take(1 << 20).read_to_end(&mut buf) else {
            return false;
        };
        self.offset += n as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let found = self.partial.lines().any(|l| l.starts_with(READY));
        // Keep only the unfinished last line for the next round.
        let keep = self.partial.rfind('\n').map_or(0, |i| i + 1);
        self.partial.drain(..keep);
        found
    }
}

/// The last `max` bytes of a file, lossily decoded.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Why a guest failed, from its console: dm-verity corruption first (the kernel
/// panics right after it), then a `clawos-init` fatal error, then any kernel panic.
pub fn failure_reason(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().map(str::trim).collect();
    if let Some(l) = lines
        .iter()
        .find(|l| l.contains("verity") && l.contains("corrupted"))
    {
        let detail = l.split_once("] ").map_or(*l, |(_, d)| d);
        return Some(format!(
            "dm-verity: rootfs corruption detected by the guest ({detail})"
        ));
    }
    if let Some(l) = lines
        .iter()
        .find_map(|l| l.split_once(FATAL).map(|(_, r)| r.trim()))
    {
        return Some(format!("guest init failed: {l}"));
    }
    lines.iter().find(|l| l.contains("Kernel panic")).map(|l| {
        format!(
            "guest kernel panic: {}",
            l.split_once("] ").map_or(*l, |(_, d)| d)
        )
    })
}

/// Whether the guest finished a clean power-off.
pub fn powered_off(console: &str) -> bool {
    console.lines().any(|l| l.trim() == POWEROFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verity_corruption_wins_over_the_panic_it_causes() {
        let log = "[ 1.0] device-mapper: verity: 254:0: data block 12 is corrupted\n\
                   [ 1.1] Kernel panic - not syncing: dm-verity device corrupted\n";
        let r = failure_reason(log).expect("reason");
        assert!(r.starts_with("dm-verity"), "{r}");
        assert!(r.contains("data block 12"), "{r}");
    }

    #[test]
    fn init_fatal_and_clean_poweroff() {
        let r = failure_reason("x\nCLAWOS_FATAL: no disk with serial 'rootfs'\n").expect("reason");
        assert_eq!(r, "guest init failed: no disk with serial 'rootfs'");
        assert!(failure_reason("CLAWOS_READY agent=a\nCLAWOS_POWEROFF\n").is_none());
        assert!(powered_off("CLAWOS_POWEROFF\n[ 3.0] reboot: Power down\n"));
        assert!(!powered_off("CLAWOS_READY\n"));
    }

    #[test]
    fn ready_is_found_across_partial_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("console.log");
        std::fs::write(&p, "boot...\nCLAWOS_RE").expect("write");
        let mut w = ReadyWatch::new(0);
        assert!(!w.poll(&p));
        std::fs::write(&p, "boot...\nCLAWOS_READY agent=x\n").expect("write");
        assert!(w.poll(&p));
    }
}
