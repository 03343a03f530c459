//! `clawos-audit`: started by the guest agent. Loads the eBPF syscall probe, watches
//! the agent cgroup, prints [`AUDIT_READY`] once attached, and ships every record to
//! the host's monitor-daemon over vsock (see the library docs).
//!
//! ```text
//! clawos-audit [--cgroup DIR] [--ring-bytes N] [--queue-bytes N]
//! ```

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clawos_guest::protocol::AUDIT_PORT;
use clawos_guest::sys;
use clawos_guest_audit::{AGENT_CGROUP, AUDIT_READY, Queue, ship};
use clawos_syscall_probe::probe;

fn log(msg: &str) {
    eprintln!("clawos-audit: {msg}");
}

fn fail(msg: &str) -> ! {
    log(msg);
    std::process::exit(1);
}

struct Args {
    cgroup: String,
    ring_bytes: u32,
    queue_bytes: usize,
}

fn args() -> Args {
    let mut a = Args {
        cgroup: AGENT_CGROUP.into(),
        // The guest has little memory: a 512 KiB ring and 4 MiB of queue hold ~25,000
        // records while the host is away.
        ring_bytes: 512 * 1024,
        queue_bytes: 4 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| fail(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--cgroup" => a.cgroup = value(),
            "--ring-bytes" => {
                a.ring_bytes = value()
                    .parse()
                    .unwrap_or_else(|_| fail("--ring-bytes: not a number"));
            }
            "--queue-bytes" => {
                a.queue_bytes = value()
                    .parse()
                    .unwrap_or_else(|_| fail("--queue-bytes: not a number"));
            }
            _ => fail(&format!(
                "unknown argument {flag:?} (--cgroup DIR, --ring-bytes N, --queue-bytes N)"
            )),
        }
    }
    a
}

fn main() {
    let args = args();
    let cgroup_id = std::fs::create_dir_all(&args.cgroup)
        .and_then(|()| std::fs::metadata(&args.cgroup))
        .map(|m| m.ino())
        .unwrap_or_else(|e| fail(&format!("cgroup {}: {e}", args.cgroup)));
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| fail(&format!("boot id: {e}")));
    let queue = Arc::new(Queue::new(args.queue_bytes));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (q, ring_bytes) = (Arc::clone(&queue), args.ring_bytes);
    std::thread::spawn(move || {
        static STOP: AtomicBool = AtomicBool::new(false);
        let result = probe::run(
            ring_bytes,
            ready_tx,
            |record| q.push(record),
            || q.notify(),
            &STOP,
        );
        if let Err(e) = result {
            fail(&format!("probe stopped: {e}"));
        }
    });
    let maps = match ready_rx.recv() {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => fail(&e.to_string()),
        Err(_) => fail("the probe thread ended during setup"),
    };
    if let Err(e) = maps.watch_cgroup(cgroup_id, 0) {
        fail(&e.to_string());
    }
    println!("{AUDIT_READY} cgroup={} id={cgroup_id}", args.cgroup);
    let _ = std::io::stdout().flush();
    let q = Arc::clone(&queue);
    std::thread::spawn(move || {
        ship(
            &q,
            &boot_id,
            || {
                let conn = sys::vsock_connect(sys::VMADDR_CID_HOST, AUDIT_PORT)?;
                Ok((conn.try_clone()?, conn))
            },
            log,
        )
    });
    loop {
        std::thread::sleep(Duration::from_millis(200));
        queue.set_kernel_drops(maps.drops());
    }
}
