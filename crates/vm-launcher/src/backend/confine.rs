//! Confining a VM's host processes (the hypervisor and its helpers): an unprivileged
//! uid of its own, and a cgroup of its own with CPU, memory, pids and IO limits.
//!
//! **uids.** Each running VM gets a uid (and a gid of the same number) from a dedicated
//! range, [`UID_BASE`] + k: one that no passwd entry names and no running process uses,
//! so two VMs never share one (the same uid could ptrace the other's hypervisor). QEMU
//! drops to it with `-runas uid:gid` (QEMU 7.2 takes numbers, no passwd entry needed);
//! the vsock device process drops before exec. Neither keeps a capability: a setuid
//! from root to another uid clears them all.
//!
//! **cgroups.** cgroup v2 when its memory, pids and cpu controllers are available to
//! the launcher's own cgroup; otherwise the v1 hierarchies that are mounted (memory, cpu,
//! pids, blkio — a "hybrid" host such as this one has only hugetlb on v2). A VM's cgroup
//! is a child of the launcher's own cgroup in each hierarchy, named after the VM and
//! its directory, so two launchers with VMs of the same name never share one. Processes
//! join it before they exec: the parent opens each `cgroup.procs` and the child writes
//! `0` (itself) to it between fork and exec — one `write(2)`, async-signal-safe.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// First per-VM uid. The range is outside what distributions hand out to users and
/// system accounts and outside systemd's dynamic and container ranges.
pub const UID_BASE: u32 = 0x7100_0000;
/// How many per-VM uids there are.
pub const UID_RANGE: u32 = 0x1_0000;

/// Period of the CPU limit, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Tasks (processes and threads) a VM's host processes may have: QEMU's main loop, RCU,
/// vCPU and I/O worker threads (its thread pool alone may grow to 64), and the vsock
/// device's threads, with room to spare; a fork or thread bomb stops here.
pub const PIDS_MAX: u64 = 512;
/// Per-VM disk bandwidth and operations, each direction.
pub const IO_BPS: u64 = 256 << 20;
pub const IO_IOPS: u64 = 16_384;

/// What one VM's cgroup allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Memory of the VM's processes together: guest RAM + the hypervisor's overhead.
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
    pub pids: u64,
    /// Bandwidth and operations on the block device that holds the VM's disks, when it
    /// is a real block device.
    pub io: Option<IoLimit>,
}

/// An IO limit on one block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoLimit {
    pub major: u32,
    pub minor: u32,
    pub bps: u64,
    pub iops: u64,
}

/// Memory a hypervisor needs beyond guest RAM: QEMU's own heap, its device state and
/// I/O buffers; under TCG also the translated-code cache, which QEMU is told to keep
/// within [`TCG_TB_MIB`].
pub fn overhead_mib(kvm: bool) -> u64 {
    if kvm { 256 } else { 256 + TCG_TB_MIB }
}

/// The TCG translation cache QEMU is given (`-accel tcg,tb-size=`): without it QEMU
/// sizes it from host memory (up to 1 GiB), which no memory limit could then bound.
pub const TCG_TB_MIB: u64 = 256;

impl Limits {
    /// The limits of a VM with `mem_mib` of RAM and `vcpus` vCPUs whose disks are in
    /// `dir`: memory = RAM + [`overhead_mib`]; CPU = one CPU per vCPU plus one for the
    /// main loop and I/O; [`PIDS_MAX`] tasks; [`IO_BPS`] and [`IO_IOPS`] on the disks'
    /// device.
    pub fn for_vm(mem_mib: u32, vcpus: u32, kvm: bool, dir: &Path) -> Self {
        Self {
            memory_bytes: (u64::from(mem_mib) + overhead_mib(kvm)) << 20,
            cpu_quota_us: (u64::from(vcpus) + 1) * CPU_PERIOD_US,
            pids: PIDS_MAX,
            io: block_device_of(dir).map(|(major, minor)| IoLimit {
                major,
                minor,
                bps: IO_BPS,
                iops: IO_IOPS,
            }),
        }
    }
}

/// The whole-disk block device holding `path`, if it is on one.
fn block_device_of(path: &Path) -> Option<(u32, u32)> {
    let dev = fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return None;
    }
    // Limits apply to whole disks; a partition's parent is the disk.
    if sys.join("partition").exists() {
        let parent = fs::read_to_string(sys.join("../dev")).ok()?;
        let (a, b) = parent.trim().split_once(':')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    Some((major, minor))
}

/// Where VM cgroups are made on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v2: VMs are children of `base`, the launcher's own cgroup.
    V2 { base: PathBuf, io: bool },
    /// cgroup v1: the launcher's own cgroup in each mounted hierarchy.
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
        blkio: Option<PathBuf>,
    },
    /// Neither is usable: VMs run without a cgroup of their own (said once, loudly).
    Unavailable(String),
}

#[derive(Debug)]
struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    super_opts: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(Mount {
                root: unescape(pre.get(3)?),
                point: PathBuf::from(unescape(pre.get(4)?)),
                fstype: (*post.first()?).to_owned(),
                super_opts: post.get(2)?.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// `/proc/self/cgroup`: (controllers, path) per hierarchy; v2's line has none.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            Some((ctrls, path.to_owned()))
        })
        .collect()
}

/// The directory of cgroup `path` under a mount whose root is `root`.
fn under(m: &Mount, path: &str) -> Option<PathBuf> {
    let rel = path.strip_prefix(m.root.trim_end_matches('/'))?;
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        m.point.clone()
    } else {
        m.point.join(rel)
    })
}

impl Cgroups {
    /// What this host has, from `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub fn detect() -> Self {
        match (
            fs::read_to_string("/proc/self/mountinfo"),
            fs::read_to_string("/proc/self/cgroup"),
        ) {
            (Ok(m), Ok(c)) => Self::from_proc(&m, &c, &|p| fs::read_to_string(p).ok()),
            _ => Self::Unavailable("cannot read /proc/self/mountinfo or /proc/self/cgroup".into()),
        }
    }

    /// Decides from the two `/proc` files; `read` reads a cgroup file (tests give a
    /// fake tree).
    pub fn from_proc(
        mountinfo: &str,
        cgroup: &str,
        read: &dyn Fn(&Path) -> Option<String>,
    ) -> Self {
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_proc_cgroup(cgroup);
        if let (Some(m), Some((_, path))) = (
            mounts.iter().find(|m| m.fstype == "cgroup2"),
            own.iter().find(|(c, _)| c.is_empty()),
        ) && let Some(base) = under(m, path)
        {
            let available = read(&base.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| available.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") && has("cpu") {
                return Self::V2 {
                    io: has("io"),
                    base,
                };
            }
        }
        let v1 = |ctrl: &str| -> Option<PathBuf> {
            let m = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.super_opts.iter().any(|o| o == ctrl))?;
            let (_, path) = own.iter().find(|(c, _)| c.iter().any(|x| x == ctrl))?;
            under(m, path)
        };
        let (memory, cpu, pids, blkio) = (v1("memory"), v1("cpu"), v1("pids"), v1("blkio"));
        if memory.is_none() && cpu.is_none() && pids.is_none() {
            return Self::Unavailable(
                "no cgroup v2 with memory, pids and cpu controllers and no cgroup v1 memory, cpu or pids hierarchy".into(),
            );
        }
        Self::V1 {
            memory,
            cpu,
            pids,
            blkio,
        }
    }

    /// The host's, detected once.
    pub fn host() -> &'static Self {
        static HOST: OnceLock<Cgroups> = OnceLock::new();
        HOST.get_or_init(|| {
            let c = Self::detect();
            match &c {
                Self::Unavailable(why) => {
                    tracing::warn!(
                        why,
                        "VMs get no cgroup of their own (no CPU, memory, pids or IO limits)"
                    )
                }
                c => tracing::info!(cgroups = ?c, "per-VM cgroups"),
            }
            c
        })
    }

    /// The VM's cgroup directory in each hierarchy.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Self::V2 { base, .. } => vec![base.join(name)],
            Self::V1 {
                memory,
                cpu,
                pids,
                blkio,
            } => [memory, cpu, pids, blkio]
                .into_iter()
                .flatten()
                .map(|d| d.join(name))
                .collect(),
            Self::Unavailable(_) => Vec::new(),
        }
    }

    /// Creates the VM's cgroup `name` with `limits` — first removing what an earlier
    /// boot left — and opens its `cgroup.procs` files for [`join_before_exec`]. `None`
    /// when the host has no usable cgroups.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<Option<VmCgroup>> {
        self.remove(name);
        let mut dirs = Vec::new();
        let made = (|| {
            match self {
                Self::Unavailable(_) => {}
                Self::V2 { base, io } => {
                    enable_v2_controllers(base, *io)?;
                    let d = base.join(name);
                    mkdir(&d)?;
                    dirs.push(d.clone());
                    write_v2_limits(&d, limits, *io)?;
                }
                Self::V1 {
                    memory,
                    cpu,
                    pids,
                    blkio,
                } => {
                    for (ctrl, h) in [
                        ("memory", memory),
                        ("cpu", cpu),
                        ("pids", pids),
                        ("blkio", blkio),
                    ] {
                        if let Some(h) = h {
                            let d = h.join(name);
                            mkdir(&d)?;
                            dirs.push(d.clone());
                            write_v1_limits(ctrl, &d, limits)?;
                        }
                    }
                }
            }
            dirs.iter()
                .map(|d| {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(d.join("cgroup.procs"))
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))
                })
                .collect::<io::Result<Vec<_>>>()
        })();
        match made {
            Ok(_) if dirs.is_empty() => Ok(None),
            Ok(procs) => Ok(Some(VmCgroup { procs, dirs })),
            Err(e) => {
                self.remove(name);
                Err(e)
            }
        }
    }

    /// The VM's existing cgroup (to add a process to a running VM), `None` when the
    /// host has no usable cgroups or the VM has none.
    pub fn open(&self, name: &str) -> io::Result<Option<VmCgroup>> {
        let dirs: Vec<PathBuf> = self.dirs(name).into_iter().filter(|d| d.exists()).collect();
        if dirs.is_empty() {
            return Ok(None);
        }
        let procs = dirs
            .iter()
            .map(|d| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Some(VmCgroup { procs, dirs }))
    }

    /// Ends whatever still runs in the VM's cgroup and removes it (waiting up to 2 s
    /// for killed processes to go). Nothing to do when it does not exist.
    pub fn remove(&self, name: &str) {
        for d in self.dirs(name) {
            remove_dir(&d);
        }
    }
}

fn write_limit(d: &Path, file: &str, v: String) -> io::Result<()> {
    fs::write(d.join(file), &v).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{}: writing {v:?}: {e}", d.join(file).display()),
        )
    })
}

/// A v2 cgroup's limits: `memory.max` (and no swap), `pids.max`, `cpu.max`, `io.max`.
fn write_v2_limits(d: &Path, limits: &Limits, io: bool) -> io::Result<()> {
    write_limit(d, "memory.max", limits.memory_bytes.to_string())?;
    // No swap: guest memory stays within the limit.
    if d.join("memory.swap.max").exists() {
        write_limit(d, "memory.swap.max", "0".into())?;
    }
    write_limit(d, "pids.max", limits.pids.to_string())?;
    write_limit(
        d,
        "cpu.max",
        format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
    )?;
    if let (true, Some(l)) = (io, limits.io) {
        let v = format!(
            "{}:{} rbps={} wbps={} riops={} wiops={}",
            l.major, l.minor, l.bps, l.bps, l.iops, l.iops
        );
        if let Err(e) = write_limit(d, "io.max", v) {
            tracing::warn!(error = %e, "no IO limit for this VM");
        }
    }
    Ok(())
}

/// A v1 cgroup's limits in the hierarchy of `ctrl`.
fn write_v1_limits(ctrl: &str, d: &Path, limits: &Limits) -> io::Result<()> {
    match ctrl {
        "memory" => {
            write_limit(d, "memory.limit_in_bytes", limits.memory_bytes.to_string())?;
            // memory+swap no higher than memory: no swap.
            if d.join("memory.memsw.limit_in_bytes").exists() {
                write_limit(
                    d,
                    "memory.memsw.limit_in_bytes",
                    limits.memory_bytes.to_string(),
                )?;
            }
        }
        "cpu" => {
            write_limit(d, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            write_limit(d, "cpu.cfs_quota_us", limits.cpu_quota_us.to_string())?;
        }
        "pids" => write_limit(d, "pids.max", limits.pids.to_string())?,
        "blkio" => {
            if let Some(l) = limits.io {
                for (f, v) in [
                    ("blkio.throttle.read_bps_device", l.bps),
                    ("blkio.throttle.write_bps_device", l.bps),
                    ("blkio.throttle.read_iops_device", l.iops),
                    ("blkio.throttle.write_iops_device", l.iops),
                ] {
                    if let Err(e) = write_limit(d, f, format!("{}:{} {v}", l.major, l.minor)) {
                        tracing::warn!(error = %e, "no IO limit for this VM");
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn mkdir(d: &Path) -> io::Result<()> {
    match fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", d.display()))),
    }
}

fn remove_dir(d: &Path) {
    if !d.exists() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(d) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) if Instant::now() < deadline => {
                // v2 ends them all at once; otherwise each listed process.
                if fs::write(d.join("cgroup.kill"), "1").is_err() {
                    for pid in fs::read_to_string(d.join("cgroup.procs"))
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|p| p.trim().parse::<i32>().ok())
                    {
                        // SAFETY: kill takes plain integers; these are the VM's own
                        // processes, listed by its cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(cgroup = %d.display(), error = %e, "cannot remove the VM's cgroup");
                return;
            }
        }
    }
}

/// Enables the controllers VM cgroups need in `base`'s children. cgroup v2 allows that
/// only in a cgroup without processes of its own (the root excepted): when the kernel
/// says so (EBUSY), the processes in `base` move to a leaf `base/clawos-launcher` first,
/// as with a systemd service that has `Delegate=yes`.
fn enable_v2_controllers(base: &Path, io: bool) -> io::Result<()> {
    let mut want = vec!["+memory", "+pids", "+cpu"];
    if io {
        want.push("+io");
    }
    let line = want.join(" ");
    let control = base.join("cgroup.subtree_control");
    match fs::write(&control, &line) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = base.join("clawos-launcher");
            let _ = fs::create_dir(&leaf);
            tracing::warn!(base = %base.display(), leaf = %leaf.display(), "moving the launcher's cgroup's processes into a leaf, so VM cgroups can have controllers");
            for pid in fs::read_to_string(base.join("cgroup.procs"))?.lines() {
                let _ = fs::write(leaf.join("cgroup.procs"), pid.trim());
            }
            fs::write(&control, &line)
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{}: {e}", control.display()),
        )),
    }
}

/// A VM's cgroup, created: its `cgroup.procs` files open for writing.
#[derive(Debug)]
pub struct VmCgroup {
    procs: Vec<File>,
    pub dirs: Vec<PathBuf>,
}

impl VmCgroup {
    /// The descriptors a child writes `0` to before exec (see [`join_before_exec`]).
    /// They stay valid while `self` lives.
    pub fn fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// Run in a child between fork and exec: joins the cgroups whose `cgroup.procs`
/// descriptors are `fds` (writing `0` moves the writer itself). Only `write(2)`:
/// async-signal-safe, no allocation.
pub fn join_before_exec(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: a write of one byte from a static buffer to a descriptor the parent
        // opened and keeps open until the spawn returns.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Run in a child between fork and exec: becomes `uid`/`gid` with no supplementary
/// groups but `gid`. From root, `setuid` to another uid clears every capability. Only
/// raw system calls: async-signal-safe, no allocation.
pub fn drop_to_before_exec(uid: u32, gid: u32) -> io::Result<()> {
    let groups = [gid as libc::gid_t];
    // SAFETY: plain system calls with a stack array that outlives the call.
    unsafe {
        if libc::setgroups(1, groups.as_ptr()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // Dropped for good: root is out of reach.
        if libc::setuid(0) == 0 {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    Ok(())
}

/// The name of a VM's cgroup: the VM's name and a hash of its directory.
pub fn cgroup_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "clawos-{name}-{:08x}",
        fnv1a(dir.as_os_str().as_encoded_bytes()) as u32
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// uids handed out by this launcher and not yet given back, by VM directory.
fn reserved() -> &'static Mutex<BTreeMap<PathBuf, u32>> {
    static R: OnceLock<Mutex<BTreeMap<PathBuf, u32>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// uids of every running process (real, effective, saved, filesystem).
fn uids_in_use() -> HashSet<u32> {
    let mut used = HashSet::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return used;
    };
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(s) = fs::read_to_string(e.path().join("status"))
            && let Some(l) = s.lines().find_map(|l| l.strip_prefix("Uid:"))
        {
            used.extend(l.split_whitespace().filter_map(|u| u.parse::<u32>().ok()));
        }
    }
    used
}

fn in_passwd(uid: u32) -> bool {
    // SAFETY: getpwuid_r with buffers that outlive the call; only the return value and
    // `result` are read.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = [0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) == 0
            && !result.is_null()
    }
}

/// A uid for the VM in `dir` (its gid has the same number): the one it already has if
/// its processes still run, else the first free one from a start that depends on the
/// directory (so a VM tends to keep its uid across boots).
pub fn allocate_uid(dir: &Path) -> io::Result<u32> {
    let mut r = reserved().lock().unwrap_or_else(|p| p.into_inner());
    r.remove(dir);
    let used = uids_in_use();
    let taken: HashSet<u32> = r.values().copied().collect();
    let start = (fnv1a(dir.as_os_str().as_encoded_bytes()) % u64::from(UID_RANGE)) as u32;
    for k in 0..UID_RANGE {
        let uid = UID_BASE + (start + k) % UID_RANGE;
        if !used.contains(&uid) && !taken.contains(&uid) && !in_passwd(uid) {
            r.insert(dir.to_owned(), uid);
            return Ok(uid);
        }
    }
    Err(io::Error::other("no free per-VM uid left"))
}

/// Gives the VM's uid back once its processes have ended.
pub fn release_uid(dir: &Path) {
    reserved()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(dir);
}

/// Whether the launcher can give VMs their own uid (only root can).
pub fn can_drop_privileges() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests;
