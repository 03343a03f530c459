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
        if f.metadata().is_ok_and(|m| m.len() < self.offset) {
            // The log was capped (cut to nothing) since the last read: start over.
            self.offset = 0;
            self.partial.clear();
        }
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

/// Keeps a live console log under `max` bytes: once it is larger, its content
/// becomes `console.log.1` (replacing the older one) and the live file is cut to
/// nothing. The hypervisor writes with `O_APPEND`, so it goes on at the new end.
/// Returns whether it cut.
pub fn cap(path: &Path, max: u64) -> std::io::Result<bool> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    if f.metadata()?.len() <= max {
        return Ok(false);
    }
    let older = path.with_extension("log.1");
    std::fs::copy(path, &older)?;
    f.set_len(0)?;
    Ok(true)
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

/// The text of a kernel message line (`[    1.234567] text`), or `None` for a line
/// the kernel did not print that way.
fn kernel_message(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('[')?;
    let (stamp, text) = rest.split_once("] ")?;
    let stamp = stamp.trim_start();
    (!stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'.')).then_some(text)
}

/// Why a guest failed, from its console: dm-verity corruption first (the kernel
/// panics right after it), then a `clawos-init` fatal error, then any kernel panic.
///
/// Each is taken only from a line its author prints: the kernel's (a timestamp, then
/// `device-mapper: verity…corrupted` or `Kernel panic - not syncing`) or init's
/// (`CLAWOS_FATAL:` at the start). The agent runtime's output reaches the console too,
/// but every line of it starts with the runtime's name, so it cannot pose as either; a
/// process name (at most 15 characters, which the kernel may print in its own lines)
/// is too short to hold those texts.
pub fn failure_reason(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().map(str::trim).collect();
    let kernel: Vec<&str> = lines.iter().filter_map(|l| kernel_message(l)).collect();
    if let Some(detail) = kernel
        .iter()
        .find(|m| m.starts_with("device-mapper: verity") && m.contains("corrupted"))
    {
        return Some(format!(
            "dm-verity: rootfs corruption detected by the guest ({detail})"
        ));
    }
    if let Some(l) = lines
        .iter()
        .find_map(|l| l.strip_prefix(FATAL).map(str::trim))
    {
        return Some(format!("guest init failed: {l}"));
    }
    kernel
        .iter()
        .find(|m| m.starts_with("Kernel panic - not syncing"))
        .map(|m| format!("guest kernel panic: {m}"))
}

/// Whether the guest finished a clean power-off.
pub fn powered_off(console: &str) -> bool {
    console.lines().any(|l| l.trim() == POWEROFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_log_is_capped_and_the_writer_goes_on_at_the_new_end() {
        use std::io::Write;
        let d = tempfile::tempdir().expect("tmp");
        let path = d.path().join("console.log");
        // The hypervisor's handle: opened once, appending.
        let mut hv = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        let mut ready = ReadyWatch::new(0);
        hv.write_all(&vec![b'x'; 5000]).expect("write");
        assert!(!ready.poll(&path));
        assert!(!cap(&path, 8192).expect("cap"), "under the cap: untouched");
        hv.write_all(&vec![b'y'; 5000]).expect("write");
        assert!(cap(&path, 8192).expect("cap"));
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        assert_eq!(
            std::fs::metadata(path.with_extension("log.1"))
                .expect("older")
                .len(),
            10_000
        );
        hv.write_all(b"CLAWOS_READY agent=a\n").expect("write");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "CLAWOS_READY agent=a\n",
            "no hole where the old content was"
        );
        assert!(ready.poll(&path), "readiness is still seen after a cut");
    }

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
        for forged in [
            "openclaw: CLAWOS_FATAL: forged by the runtime\n",
            "openclaw: [ 1.0] Kernel panic - not syncing: forged\n",
            "openclaw: [ 1.0] device-mapper: verity: 254:0: data block 1 is corrupted\n",
            // A process named like the start of a panic, in the kernel's segfault line.
            "[ 2.0] Kernel panic -[99]: segfault at 0 ip 0 sp 0 error 4\n",
        ] {
            assert!(
                failure_reason(forged).is_none(),
                "a runtime's line is neither init's nor the kernel's: {forged}"
            );
        }
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
