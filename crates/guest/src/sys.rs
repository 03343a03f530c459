//! Thin, checked wrappers over the syscalls PID 1 needs.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (s, t) = (cstr(source)?, cstr(target)?);
    let f = fstype.map(cstr).transpose()?;
    let d = data.map(cstr).transpose()?;
    // SAFETY: all pointers are valid NUL-terminated strings (or null) that outlive the
    // call.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            d.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>()),
        )
    };
    check(rc, &format!("mount {source} on {target}"))
}

/// `umount2(2)`.
pub fn umount(target: &str, flags: libc::c_int) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is a valid NUL-terminated string.
    check(
        unsafe { libc::umount2(t.as_ptr(), flags) },
        &format!("umount {target}"),
    )
}

/// Loads a kernel module from a file (`finit_module(2)`).
pub fn load_module(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    let params = c"";
    // SAFETY: the fd is open for the duration of the call and params is a valid empty
    // C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(io::Error::new(
            e.kind(),
            format!("load module {}: {e}", path.display()),
        ));
    }
    Ok(())
}

/// Creates a block device node.
pub fn mknod_block(path: &str, major: u32, minor: u32) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated path; makedev has no preconditions.
    let rc = unsafe {
        libc::mknod(
            p.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    check(rc, &format!("mknod {path}"))
}

/// `chroot(2)`.
pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated path.
    check(unsafe { libc::chroot(p.as_ptr()) }, "chroot")
}

/// Sets the hostname.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        "sethostname",
    )
}

/// `reboot(2)` with one of the `LINUX_REBOOT_CMD_*` commands.
pub fn reboot(cmd: libc::c_int) -> io::Result<()> {
    // SAFETY: reboot takes a plain integer command.
    check(unsafe { libc::reboot(cmd) }, "reboot")
}

/// Flushes all filesystems.
pub fn sync() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// The host's vsock context id.
pub const VMADDR_CID_HOST: u32 = 2;
const VMADDR_CID_ANY: u32 = u32::MAX;

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "vsock socket")?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Listens on a guest vsock port.
pub fn vsock_listen(port: u32) -> io::Result<std::os::fd::OwnedFd> {
    let fd = vsock_socket()?;
    let addr = sockaddr_vm(VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    check(rc, &format!("vsock bind port {port}"))?;
    // SAFETY: listen on a bound socket we own.
    check(unsafe { libc::listen(fd.as_raw_fd(), 64) }, "vsock listen")?;
    Ok(fd)
}

/// Accepts one connection on a vsock listener.
pub fn vsock_accept(listener: &std::os::fd::OwnedFd) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 on a listening socket we own; the peer address is not needed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    check(fd, "vsock accept")?;
    // SAFETY: a new descriptor from accept4, owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Connects to a host vsock port (reaches the host listener `<uds>_<port>`).
pub fn vsock_connect(cid: u32, port: u32) -> io::Result<File> {
    let fd = vsock_socket()?;
    let addr = sockaddr_vm(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    check(rc, &format!("vsock connect {cid}:{port}"))?;
    Ok(File::from(fd))
}

/// Shuts down the write half of a socket.
pub fn shutdown_write(fd: &impl AsRawFd) {
    // SAFETY: shutdown(2) on a descriptor we hold.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

/// Brings the loopback interface up (the guest has no other network by default).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: an AF_INET datagram socket used only for the interface ioctls below; ifreq
    // is plain data and the name fits.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(s, "socket")?;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let rc = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            let rc = libc::ioctl(s, libc::SIOCSIFFLAGS, &req);
            libc::close(s);
            return check(rc, "bring lo up");
        }
        libc::close(s);
        check(rc, "lo flags")
    }
}
