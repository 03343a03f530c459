//! `clawos-agent`: the guest agent started by `clawos-init`.
//!
//! For now it is the placeholder the boot issue allows: it records the boot in
//! `/workspace/.clawos/boots` (so persistence of the workspace disk is observable),
//! announces readiness on the console and waits to be stopped. The vsock control
//! channel (exec, files, relays) replaces the console marker as readiness signal.

use std::fs;
use std::io::Write;
use std::path::Path;

use clawos_guest::marker;

fn main() {
    let dir = Path::new("/workspace/.clawos");
    let boots = dir.join("boots");
    let count = fs::create_dir_all(dir)
        .and_then(|()| {
            let n = fs::read_to_string(&boots)
                .map(|s| s.lines().count())
                .unwrap_or(0)
                + 1;
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&boots)?;
            writeln!(f, "boot {n}")?;
            f.sync_all()?;
            Ok(n)
        })
        .unwrap_or_else(|e| {
            println!(
                "clawos-agent: cannot record boot in {}: {e}",
                boots.display()
            );
            0
        });
    let name = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    println!("{} agent={} boot={count}", marker::READY, name.trim());
    let _ = std::io::stdout().flush();
    // Wait until init sends SIGTERM (default action: exit).
    loop {
        std::thread::park();
    }
}
