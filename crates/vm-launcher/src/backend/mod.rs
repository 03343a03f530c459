//! Hypervisor backends behind one trait: QEMU `microvm` (boots here, KVM or TCG),
//! Firecracker (production hosts with hardware KVM), and a fake for the launcher's
//! state-machine tests.

pub mod confine;
pub mod fake;
pub mod firecracker;
pub mod qemu;
mod qemu_snapshot;
mod qemu_vsock;
mod qmp;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::process::Child;

use crate::store::VmDir;

/// A boxed future, so the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a backend needs to boot one VM from a verified image.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub name: String,
    pub dir: VmDir,
    pub mem_mib: u32,
    pub vcpus: u32,
    /// The compressed kernel (QEMU boots it): the launcher's verified copy in the VM
    /// directory, made from the descriptor it hashed.
    pub kernel: PathBuf,
    /// The verified ELF kernel, when the image has one (Firecracker boots it); a
    /// verified copy too.
    pub vmlinux: Option<PathBuf>,
    /// The initramfs: a verified copy in the VM directory.
    pub initramfs: PathBuf,
    /// Where the rootfs was opened (for messages, and a backend that can only take a
    /// path when `rootfs_fd` is absent).
    pub rootfs: PathBuf,
    /// The rootfs as the launcher opened and checked it (regular file, trusted owner,
    /// the signed size). A backend boots this descriptor — QEMU through `-add-fd`,
    /// Firecracker through a hard link to its inode — never `rootfs`, whose path may
    /// name something else by now.
    pub rootfs_fd: Option<std::sync::Arc<std::fs::File>>,
    /// The image's signed command line; the backend prepends its console/timer
    /// settings.
    pub image_cmdline: String,
    /// Boot a snapshot-capable machine (QEMU: `pc` with hot-pluggable devices).
    pub snapshots: bool,
}

/// Errors of a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The hypervisor process could not be started.
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The hypervisor's control channel failed.
    #[error("{backend} control channel: {detail}")]
    Control {
        backend: &'static str,
        detail: String,
    },
    /// The image lacks what this backend needs.
    #[error("{0}")]
    Unsupported(String),
}

/// Host side of the VM's hybrid vsock: the Unix socket `CONNECT <port>` goes to, and
/// whose `_<port>` siblings the guest's connections to the host arrive on.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Context id every guest gets (each VM has its own vsock device, so they never clash).
pub const GUEST_CID: u32 = 3;

/// A started VM: the hypervisor and any helper processes that live and die with it.
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    /// Helper processes (e.g. the vhost-user vsock device) to end with the VM.
    pub helpers: Vec<crate::host::ProcessId>,
    /// Whether the VM has a vsock device (the control channel).
    pub vsock: bool,
    /// Where the VM's sockets (vsock, API) live when not in its directory (a jailed
    /// Firecracker's chroot).
    pub socket_dir: Option<std::path::PathBuf>,
}

/// One hypervisor implementation.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// `qemu` or `firecracker`.
    fn name(&self) -> &'static str;
    /// Starts the VM; returns the hypervisor process (in its own process group, with
    /// output in files, so it outlives a launcher restart).
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Launched, BackendError>>;
    /// Asks the guest to power off cleanly.
    fn request_stop<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>>;
    /// Freezes the guest's vCPUs (memory stays).
    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>>;
    /// Lets a paused guest run again.
    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>>;
    /// Removes what the backend set up outside the VM directory, once the VM ended.
    fn cleanup(&self, _dir: &VmDir) {}

    /// Why a VM started with `snapshots` cannot be snapshotted, if it cannot.
    fn snapshot_unsupported(&self, snapshots: bool) -> Option<String>;
    /// Freezes the guest and writes its memory and device state into `snap` (a path
    /// relative to the VM directory). The VM stays frozen, so the launcher can copy its
    /// disks consistently. Returns the bytes written.
    fn save<'a>(
        &'a self,
        dir: &'a VmDir,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<u64, BackendError>>;
    /// Undoes what [`Hypervisor::save`] detached and, when `resume`, lets the guest run
    /// again. Returns the VM's helper processes from now on (they may be new).
    fn after_save<'a>(
        &'a self,
        dir: &'a VmDir,
        helpers: &'a [crate::host::ProcessId],
        resume: bool,
    ) -> BoxFuture<'a, Result<Vec<crate::host::ProcessId>, BackendError>>;
    /// Starts the VM from the state saved in `snap` (relative to the VM directory; the
    /// launcher has put the snapshot's disks back). The guest runs when it returns.
    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<Launched, BackendError>>;
}

/// A path naming exactly the rootfs the launcher checked, for a backend that only takes
/// paths (Firecracker): a hard link to the checked descriptor's inode in the VM's boot
/// directory (`linkat` through `/proc/self/fd`), or a copy made from the descriptor
/// when the image store is on another filesystem. Without a descriptor, `spec.rootfs`.
pub fn rootfs_path(spec: &LaunchSpec) -> Result<PathBuf, BackendError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let Some(f) = &spec.rootfs_fd else {
        return Ok(spec.rootfs.clone());
    };
    let dest = spec.dir.boot().join(clawos_image::files::ROOTFS);
    let err = |source| BackendError::Spawn {
        bin: dest.clone(),
        source,
    };
    let _ = std::fs::remove_file(&dest);
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
    let to = std::ffi::CString::new(dest.as_os_str().as_bytes())
        .map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked == 0 {
        return Ok(dest);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EXDEV) {
        return Err(err(e));
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&dest)
        .map_err(err)?;
    let mut src = f.as_ref();
    std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(0)).map_err(err)?;
    std::io::copy(&mut src, &mut out).map_err(err)?;
    Ok(dest)
}

/// Opens the file the hypervisor writes its own diagnostics to.
fn log_file(path: &Path) -> Result<std::fs::File, BackendError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| BackendError::Spawn {
            bin: path.to_owned(),
            source,
        })
}

/// Waits up to `limit` for a socket file to appear. The file exists from `bind()`, a
/// moment before the process listens; fit for a socket whose first client comes later
/// than that moment (see the vsock device's start), not for one connected to at once.
pub(crate) async fn wait_for_socket(path: &Path, limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

/// Waits up to `limit` until the Unix socket `socket` in `dir`, served by `server`,
/// accepts a connection (which is closed at once): for a server that takes any number
/// of clients, such as an HTTP API, whose first request follows. Its file appears at
/// `bind()`, before it listens, and a connection in between is refused. Ends at once
/// when the server exits; the error says which it was.
pub(crate) async fn wait_until_accepting(
    dir: &Path,
    socket: &str,
    server: &mut Child,
    limit: std::time::Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if connect_in_dir(dir, socket).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = server.try_wait() {
            return Err(format!(
                "it exited ({status}) before its socket {socket} accepted a connection"
            ));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "its socket {socket} did not accept a connection within {limit:?}"
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Connects to a Unix socket in a VM directory. Paths can exceed the 108-byte
/// `sun_path` limit, so connect through the directory's `/proc/self/fd` entry.
pub async fn connect_in_dir(dir: &Path, socket: &str) -> io::Result<tokio::net::UnixStream> {
    let full = dir.join(socket);
    if full.as_os_str().len() < 100 {
        return tokio::net::UnixStream::connect(full).await;
    }
    let d = std::fs::File::open(dir)?;
    use std::os::fd::AsRawFd;
    let short = format!("/proc/self/fd/{}/{socket}", d.as_raw_fd());
    let stream = tokio::net::UnixStream::connect(short).await;
    drop(d);
    stream
}

/// Binds a Unix listener in a VM directory (through `/proc/self/fd` when the full path
/// would exceed `sun_path`), usable by the directory's owner only: a socket in the
/// per-VM vsock directory (owned by the VM's unprivileged uid) belongs to that uid, so
/// the VM's vsock device can connect to it, and nobody else can.
pub fn bind_in_dir(dir: &Path, socket: &str) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let full = dir.join(socket);
    let _ = std::fs::remove_file(&full);
    let listener = if full.as_os_str().len() < 100 {
        std::os::unix::net::UnixListener::bind(&full)?
    } else {
        use std::os::fd::AsRawFd;
        let d = std::fs::File::open(dir)?;
        std::os::unix::net::UnixListener::bind(format!("/proc/self/fd/{}/{socket}", d.as_raw_fd()))?
    };
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(dir)?;
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        if owner.uid() != unsafe { libc::geteuid() } {
            std::os::unix::fs::lchown(&full, Some(owner.uid()), Some(owner.gid()))?;
        }
    }
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    /// A socket bound but not (yet) listening: its file exists and a connection to it is
    /// refused, as for a server between its `bind()` and its `listen()`.
    fn bound_not_listening(path: &Path) -> OwnedFd {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: socket() takes no pointers; the descriptor is owned right below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len(), "temp path too long");
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: addr is a valid sockaddr_un of the size passed and outlives the call.
        let bound = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(bound, 0, "bind: {}", io::Error::last_os_error());
        sock
    }

    #[tokio::test]
    async fn a_server_is_waited_for_until_it_accepts_not_until_its_file_appears() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = bound_not_listening(&dir.path().join("api.sock"));
        let limit = Duration::from_millis(300);
        let mut server = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .expect("a stand-in server process");
        assert!(
            wait_for_socket(&dir.path().join("api.sock"), limit).await,
            "the file is there"
        );
        let not_yet = wait_until_accepting(dir.path(), "api.sock", &mut server, limit).await;
        assert_eq!(
            not_yet.expect_err("bound, not listening: not accepting"),
            "its socket api.sock did not accept a connection within 300ms"
        );
        // It listens a moment into the wait: the wait ends then.
        let raw = sock.as_raw_fd();
        let listen = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // SAFETY: listen() on a descriptor the test holds open; no pointers.
            unsafe { libc::listen(raw, 1) }
        });
        wait_until_accepting(dir.path(), "api.sock", &mut server, Duration::from_secs(5))
            .await
            .expect("accepting once it listens");
        assert_eq!(listen.await.expect("listen task"), 0);
        // Its file left behind by a server that is gone: not accepting.
        drop(sock);
        assert!(dir.path().join("api.sock").exists());
        assert!(
            wait_until_accepting(dir.path(), "api.sock", &mut server, limit)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_server_that_exits_ends_the_wait_at_once_and_says_so() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut server = tokio::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("sh");
        let t = std::time::Instant::now();
        let why =
            wait_until_accepting(dir.path(), "api.sock", &mut server, Duration::from_secs(30))
                .await
                .expect_err("nothing accepts");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "waited {:?}",
            t.elapsed()
        );
        assert!(
            why.starts_with("it exited (exit status: 3) before its socket api.sock"),
            "{why}"
        );
    }
}
