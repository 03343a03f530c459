//! `clawos-init`: PID 1 of every ClawOS agent VM, run from the initramfs.
//!
//! Loads the modules the image packed, finds the disks by their virtio serial, opens
//! the rootfs through dm-verity with the root hash from the signed command line, reads
//! it through once (so a tampered block fails the boot, not some later read), mounts it
//! read-only with the per-VM disks at `/var` and `/workspace`, switches root, and
//! supervises the guest agent. It powers off cleanly on Ctrl-Alt-Del (Firecracker's
//! `SendCtrlAltDel`), the ACPI power button (QEMU `system_powerdown`) or SIGTERM.
//! Any fatal error is printed with the `CLAWOS_FATAL:` marker and ends in a kernel
//! panic, which the host sees as a failed VM.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clawos_guest::{cmdline, devmapper, disk, marker, sys};

const AGENT: &str = "/sbin/clawos-agent";
const VERITY_NAME: &str = "clawos-root";
const VERITY_NODE: &str = "/dev/clawos-root";

fn log(msg: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "clawos-init: {msg}");
    let _ = out.flush();
}

/// Reports a fatal error and panics the kernel (PID 1 exiting does that), which the
/// host's pvpanic device turns into a failed VM.
fn fatal(msg: &str) -> ! {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{} {msg}", marker::FATAL);
    let _ = out.flush();
    sys::sync();
    std::process::exit(1);
}

trait OrFatal<T> {
    fn or_fatal(self, what: &str) -> T;
}
impl<T, E: std::fmt::Display> OrFatal<T> for Result<T, E> {
    fn or_fatal(self, what: &str) -> T {
        self.unwrap_or_else(|e| fatal(&format!("{what}: {e}")))
    }
}

fn load_modules() {
    let order = fs::read_to_string("/lib/modules/load-order").or_fatal("read module list");
    for name in order.lines().filter(|l| !l.is_empty()) {
        sys::load_module(&Path::new("/lib/modules").join(name)).or_fatal("modules");
    }
}

/// Finds `/dev/vdX` for each virtio serial, waiting for the disks to appear.
fn find_disk(serial: &str, timeout: Duration) -> Option<(String, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let s = fs::read_to_string(e.path().join("serial")).unwrap_or_default();
                if s.trim() == serial {
                    let dev = fs::read_to_string(e.path().join("dev")).unwrap_or_default();
                    return Some((format!("/dev/{name}"), dev.trim().to_owned()));
                }
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the whole verity device once: every data block is checked against the tree,
/// and a corrupted one panics the kernel (`panic_on_corruption`) before the agent runs.
fn verify_all(node: &str) {
    let mut f = fs::File::open(node).or_fatal("open verity device");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => fatal(&format!(
                "dm-verity: rootfs read failed (corrupted block?): {e}"
            )),
        }
    }
}

fn mount_root() -> String {
    let params = fs::read_to_string("/proc/cmdline").or_fatal("read /proc/cmdline");
    let params = cmdline::parse(&params).or_fatal("kernel command line");
    let verity = cmdline::verity(&params).or_fatal("kernel command line");

    let (_, rootdev) = find_disk(disk::ROOTFS, Duration::from_secs(10))
        .unwrap_or_else(|| fatal("no disk with serial 'rootfs'"));
    let (major, minor) =
        devmapper::create_verity(VERITY_NAME, &rootdev, &verity).or_fatal("dm-verity");
    sys::mknod_block(VERITY_NODE, major, minor).or_fatal("dm-verity");
    verify_all(VERITY_NODE);
    sys::mount(
        VERITY_NODE,
        "/newroot",
        Some("erofs"),
        // No set-id program of the image can raise a process of the agent's.
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .or_fatal("mount rootfs");
    log(&format!(
        "rootfs verified (root hash {})",
        &verity.root_hash[..16]
    ));

    for (serial, target) in [
        (disk::RUNTIME, "/newroot/var"),
        (disk::WORKSPACE, "/newroot/workspace"),
    ] {
        let (node, _) = find_disk(serial, Duration::from_secs(2))
            .unwrap_or_else(|| fatal(&format!("no disk with serial '{serial}'")));
        sys::mount(
            &node,
            target,
            Some("ext4"),
            libc::MS_NODEV | libc::MS_NOSUID,
            None,
        )
        .or_fatal("mount per-VM disk");
    }
    for t in ["/newroot/tmp", "/newroot/run"] {
        sys::mount(
            "tmpfs",
            t,
            Some("tmpfs"),
            libc::MS_NODEV | libc::MS_NOSUID,
            Some("mode=1777"),
        )
        .or_fatal("mount tmpfs");
    }
    // The launcher's environment file for the agent (proxy URL, model, name; never a
    // key) arrives on a small raw disk; it lands in /workspace/.env.
    let mut agent_name = String::from("agent");
    if let Some((node, _)) = find_disk(disk::CONFIG, Duration::from_millis(200)) {
        let mut raw = Vec::new();
        fs::File::open(&node)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .or_fatal("read config disk");
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let text = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut env = String::new();
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("CLAWOS_AGENT_NAME=") {
                agent_name = n.trim().to_owned();
            }
            // The control secret is for the guest agent only: tmpfs, 0600, never in
            // the workspace the agent's code can read and ship elsewhere.
            if let Some(secret) = line.strip_prefix(SECRET_KEY) {
                fs::create_dir_all("/newroot/run/clawos").or_fatal("mkdir /run/clawos");
                write_private("/newroot/run/clawos/control.secret", secret.trim())
                    .or_fatal("write secret");
            } else {
                env.push_str(line);
                env.push('\n');
            }
        }
        write_private("/newroot/workspace/.env", &env).or_fatal("write /workspace/.env");
    }
    agent_name
}

/// The config disk line carrying the control secret.
const SECRET_KEY: &str = "CLAWOS_CONTROL_SECRET=";

fn write_private(path: &str, data: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()
}

fn switch_root() {
    for d in ["/dev", "/proc", "/sys"] {
        sys::mount(d, &format!("/newroot{d}"), None, libc::MS_MOVE, None).or_fatal("move mount");
    }
    std::env::set_current_dir("/newroot").or_fatal("chdir /newroot");
    sys::mount(".", "/", None, libc::MS_MOVE, None).or_fatal("move root");
    sys::chroot(".").or_fatal("chroot");
    std::env::set_current_dir("/").or_fatal("chdir /");
}

/// The agent user owns `/workspace`, where root also works (boot record, runtime
/// directories, uploads): with these on, it can neither link a file it does not own
/// (to have root change it through the link) nor have root follow its symlinks in a
/// sticky directory. A kernel without them is logged, not fatal: root's own work in the
/// workspace is confined by other means (`Workspace`).
fn harden_links() {
    for knob in ["protected_hardlinks", "protected_symlinks"] {
        let path = format!("/proc/sys/fs/{knob}");
        if let Err(e) = fs::write(&path, "1") {
            log(&format!("cannot set {path}: {e}"));
        }
    }
}

/// Signals init handles synchronously through a signalfd.
fn signal_fd() -> OwnedFd {
    // SAFETY: sigset_t is plain data; the libc calls only write into it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGCHLD,
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGPWR,
            libc::SIGUSR2,
        ] {
            libc::sigaddset(&mut set, s);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            fatal("sigprocmask failed");
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            fatal(&format!("signalfd: {}", io::Error::last_os_error()));
        }
        OwnedFd::from_raw_fd(fd)
    }
}

/// Event nodes that may deliver KEY_POWER (the ACPI power button).
fn power_buttons() -> Vec<fs::File> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/class/input") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("event") {
                continue;
            }
            let dev = fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
            if dev.contains("Power Button")
                && let Ok(f) = fs::File::open(format!("/dev/input/{name}"))
            {
                out.push(f);
            }
        }
    }
    out
}

/// Mounts cgroup v2 and creates the cgroup the guest agent starts every command in
/// (what `clawos-audit` watches). Without it the guest runs unaudited, which the
/// agent reports.
fn mount_cgroups() {
    let root = "/sys/fs/cgroup";
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Err(e) = sys::mount("cgroup2", root, Some("cgroup2"), flags, None) {
        return log(&format!("{e}"));
    }
    if let Err(e) = fs::create_dir(clawos_guest::AGENT_CGROUP) {
        log(&format!("create {}: {e}", clawos_guest::AGENT_CGROUP));
    }
}

fn spawn_agent() -> Option<u32> {
    match Command::new(AGENT).current_dir("/workspace").spawn() {
        Ok(c) => Some(c.id()),
        Err(e) => {
            log(&format!("cannot start {AGENT}: {e}"));
            None
        }
    }
}

/// Reaps every exited child; returns whether `agent` was among them.
fn reap(agent: Option<u32>) -> bool {
    let mut agent_exited = false;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only into `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return agent_exited;
        }
        if Some(pid as u32) == agent {
            log(&format!("agent exited (status {status:#x})"));
            agent_exited = true;
        }
    }
}

fn shutdown(agent: Option<u32>) -> ! {
    log("shutdown requested");
    if let Some(pid) = agent {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !reap(Some(pid)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // SAFETY: kill(-1) signals every process but init itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap(None);
    sys::sync();
    for t in ["/workspace", "/var"] {
        if let Err(e) = sys::umount(t, 0) {
            log(&format!("{e}; remounting read-only"));
            let _ = sys::mount("none", t, None, libc::MS_REMOUNT | libc::MS_RDONLY, None);
        }
    }
    sys::sync();
    println!("{}", marker::POWEROFF);
    let _ = io::stdout().flush();
    let _ = sys::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    fatal("power off failed");
}

fn supervise(sfd: OwnedFd) -> ! {
    let buttons = power_buttons();
    let mut agent = spawn_agent();
    let mut restarts: Vec<Instant> = Vec::new();
    let mut fds: Vec<libc::pollfd> = std::iter::once(sfd.as_raw_fd())
        .chain(buttons.iter().map(|b| b.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of pollfd for its whole length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut info = [0u8; 128]; // sizeof(struct signalfd_siginfo)
            // SAFETY: reading into a buffer of the size the kernel writes.
            let r = unsafe { libc::read(fds[0].fd, info.as_mut_ptr().cast(), info.len()) };
            if r == 128 {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
                if signo == libc::SIGCHLD {
                    if reap(agent) {
                        let now = Instant::now();
                        restarts.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
                        if restarts.len() >= 5 {
                            fatal("guest agent keeps exiting (5 restarts in a minute)");
                        }
                        restarts.push(now);
                        agent = spawn_agent();
                    }
                } else {
                    shutdown(agent);
                }
            }
        }
        for (i, b) in buttons.iter().enumerate() {
            if fds[i + 1].revents & libc::POLLIN != 0 {
                // struct input_event: 16-byte timeval, u16 type, u16 code, i32 value.
                let mut ev = [0u8; 24];
                if (&*b).read_exact(&mut ev).is_ok() {
                    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
                    let code = u16::from_ne_bytes([ev[18], ev[19]]);
                    const EV_KEY: u16 = 1;
                    const KEY_POWER: u16 = 116;
                    if ty == EV_KEY && code == KEY_POWER {
                        shutdown(agent);
                    }
                }
            }
        }
    }
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("clawos-init must run as PID 1 inside a ClawOS VM");
        std::process::exit(2);
    }
    let started = Instant::now();
    let _ = fs::create_dir_all("/dev");
    sys::mount("devtmpfs", "/dev", Some("devtmpfs"), libc::MS_NOSUID, None).or_fatal("mount /dev");
    sys::mount("proc", "/proc", Some("proc"), 0, None).or_fatal("mount /proc");
    sys::mount("sysfs", "/sys", Some("sysfs"), 0, None).or_fatal("mount /sys");
    let sfd = signal_fd();
    // Ctrl-Alt-Del becomes SIGINT to init instead of an immediate reboot.
    let _ = sys::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF);

    load_modules();
    let name = mount_root();
    switch_root();
    let _ = sys::sethostname(&name);
    mount_cgroups();
    harden_links();
    if let Err(e) = sys::loopback_up() {
        log(&format!("{e}"));
    }
    log(&format!(
        "root switched in {} ms; starting agent",
        started.elapsed().as_millis()
    ));
    supervise(sfd);
}
