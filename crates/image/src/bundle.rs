//! Reading an image bundle without trusting its paths.
//!
//! A path can change between the moment it is checked and the moment it is used, and
//! a bundle can hold a symlink, a FIFO or a device where a file should be. So every file
//! is opened exactly once, relative to its directory's descriptor, with `O_NOFOLLOW`
//! (a symlink is refused) and `O_NONBLOCK` (opening a FIFO cannot block), then checked
//! on the open descriptor: a regular file, owned by a trusted uid, not writable by group
//! or others, no larger than its kind allows. Hashes are computed from that descriptor,
//! reading at most the size seen by `fstat` and within a deadline, and whoever boots the
//! image gets that descriptor, or a copy made from it while hashing: the bytes checked
//! are the bytes booted.
//!
//! Errors keep two texts apart: [`ImageError`]'s `Display` is for the operator (the
//! launcher's log, the CLI) and may name paths, owners, sizes and hashes;
//! [`ImageError::public_message`] is what an API caller is told — which part failed and
//! why in general terms, never a file's size, hash or content.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, Verifier};

use crate::manifest::{ImageError, Manifest, VerifyPolicy, files, parse_manifest};

mod read;

/// One file of a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Manifest,
    Signature,
    Kernel,
    Vmlinux,
    Initramfs,
    Rootfs,
}

impl Part {
    /// The name errors use for it.
    pub const fn what(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::Signature => "signature",
            Self::Kernel => "kernel",
            Self::Vmlinux => "vmlinux",
            Self::Initramfs => "initramfs",
            Self::Rootfs => "rootfs",
        }
    }

    /// Its file name in a bundle directory.
    pub const fn file_name(self) -> &'static str {
        match self {
            Self::Manifest => files::MANIFEST,
            Self::Signature => files::SIGNATURE,
            Self::Kernel => files::KERNEL,
            Self::Vmlinux => files::VMLINUX,
            Self::Initramfs => files::INITRAMFS,
            Self::Rootfs => files::ROOTFS,
        }
    }

    /// The largest file of this kind the launcher reads: a bundle cannot make it read
    /// (or copy) without end.
    pub const fn max_size(self) -> u64 {
        match self {
            Self::Manifest => 64 << 10,
            Self::Signature => 1 << 10,
            Self::Kernel => 256 << 20,
            Self::Vmlinux => 1 << 30,
            Self::Initramfs => 2 << 30,
            Self::Rootfs => 64 << 30,
        }
    }
}

/// Why a file was refused before or while its content was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsafeKind {
    /// A symbolic link where a file (or the bundle directory) should be.
    Symlink,
    /// A FIFO, device, socket or directory where a file should be.
    NotRegular,
    /// Owned by a uid the reader does not trust.
    Owner,
    /// Writable by group or others: someone else could change it.
    Writable,
    /// Larger than files of its kind may be.
    TooLarge,
    /// Shorter than `fstat` said when read, or its hash changed between two reads.
    Changed,
    /// Reading it took longer than the deadline.
    TimedOut,
}

impl UnsafeKind {
    /// What an API caller may be told.
    pub const fn public(self) -> &'static str {
        match self {
            Self::Symlink => "is a symbolic link",
            Self::NotRegular => "is not a regular file",
            Self::Owner => "is not owned by root or the launcher's user",
            Self::Writable => "is writable by group or others",
            Self::TooLarge => "is larger than files of its kind may be",
            Self::Changed => "changed while it was read",
            Self::TimedOut => "took too long to read",
        }
    }
}

/// The source of an [`ImageError::Read`] that a check refused. `Display` (for the
/// operator) says exactly what was found; [`UnsafeKind::public`] says it in general.
#[derive(Debug)]
pub struct UnsafeFile {
    pub kind: UnsafeKind,
    pub detail: String,
}

impl std::fmt::Display for UnsafeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for UnsafeFile {}

fn unsafe_file(kind: UnsafeKind, detail: String) -> io::Error {
    let io_kind = match kind {
        UnsafeKind::TimedOut => io::ErrorKind::TimedOut,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(io_kind, UnsafeFile { kind, detail })
}

/// The check that refused a file, if an [`ImageError::Read`]'s source is one.
pub fn unsafe_kind(e: &io::Error) -> Option<UnsafeKind> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<UnsafeFile>())
        .map(|u| u.kind)
}

/// Who may own a bundle's files, and how long reading one may take.
#[derive(Debug, Clone)]
pub struct Trust {
    /// uids allowed to own the bundle directory and its files; `None`: any owner.
    pub owners: Option<Vec<u32>>,
    /// Longest that reading and hashing one bundle may take.
    pub read_timeout: Duration,
}

impl Trust {
    /// What the launcher accepts: files owned by root or by its own user, read within
    /// 60 s.
    pub fn launcher() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let mut owners = vec![0];
        if me != 0 {
            owners.push(me);
        }
        Self {
            owners: Some(owners),
            read_timeout: Duration::from_secs(60),
        }
    }

    /// A bundle the operator names on the command line (`clawos image add|verify`),
    /// read with the operator's own rights: any owner, but still no symlinks, no special
    /// files and nothing group- or world-writable.
    pub fn operator() -> Self {
        Self {
            owners: None,
            read_timeout: Duration::from_secs(600),
        }
    }

    fn check_owner(&self, uid: u32, what: &str) -> io::Result<()> {
        match &self.owners {
            Some(ok) if !ok.contains(&uid) => Err(unsafe_file(
                UnsafeKind::Owner,
                format!("{what} is owned by uid {uid}; only uids {ok:?} are trusted"),
            )),
            _ => Ok(()),
        }
    }
}

fn file_type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFSOCK => "a socket",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        _ => "not a regular file",
    }
}

/// Checks what `fstat` says about an open file or directory.
fn check_stat(meta: &std::fs::Metadata, dir: bool, what: &str, trust: &Trust) -> io::Result<()> {
    let mode = meta.mode();
    let want = if dir { libc::S_IFDIR } else { libc::S_IFREG };
    if mode & libc::S_IFMT != want {
        let kind = if mode & libc::S_IFMT == libc::S_IFLNK {
            UnsafeKind::Symlink
        } else {
            UnsafeKind::NotRegular
        };
        return Err(unsafe_file(
            kind,
            format!("{what} is {}", file_type_name(mode)),
        ));
    }
    trust.check_owner(meta.uid(), what)?;
    if mode & 0o022 != 0 {
        return Err(unsafe_file(
            UnsafeKind::Writable,
            format!(
                "{what} has mode {:o}: writable by group or others",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

fn c_name(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `open(2)`/`openat(2)` without following a final symlink: ELOOP becomes "is a
/// symbolic link". `O_NONBLOCK` keeps a FIFO from blocking the open; `O_NOCTTY` keeps a
/// terminal from becoming ours. The descriptor is close-on-exec.
fn open_raw(dir: Option<&File>, path: &Path, flags: libc::c_int) -> io::Result<File> {
    let name = match dir {
        Some(_) => c_name(path.file_name().unwrap_or_default())?,
        None => c_name(path.as_os_str())?,
    };
    let flags = flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the
    // directory descriptor (if any) is open for as long as `dir` is borrowed.
    let fd = unsafe {
        match dir {
            Some(d) => libc::openat(d.as_raw_fd(), name.as_ptr(), flags),
            None => libc::open(name.as_ptr(), flags),
        }
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) => unsafe_file(
                UnsafeKind::Symlink,
                format!("{} is a symbolic link", path.display()),
            ),
            // Opening a Unix socket.
            Some(libc::ENXIO) => unsafe_file(
                UnsafeKind::NotRegular,
                format!("{} is not a regular file", path.display()),
            ),
            _ => e,
        });
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// What `lstat` says about `path` (in `dir`), before anything is opened: a device node
/// is refused without opening it, since opening some devices does something.
fn pre_check(dir: Option<&File>, path: &Path, what: &str) -> io::Result<()> {
    let meta = match dir {
        None => std::fs::symlink_metadata(path)?,
        Some(d) => {
            let name = c_name(path.file_name().unwrap_or_default())?;
            // SAFETY: an all-zero `stat` is a valid value for the kernel to overwrite.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `name` is NUL-terminated and `st` is a valid, writable `stat`.
            let r = unsafe {
                libc::fstatat(
                    d.as_raw_fd(),
                    name.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            let t = st.st_mode & libc::S_IFMT;
            return match t {
                libc::S_IFREG | libc::S_IFDIR => Ok(()),
                libc::S_IFLNK => Err(unsafe_file(
                    UnsafeKind::Symlink,
                    format!("{what} is a symbolic link"),
                )),
                _ => Err(unsafe_file(
                    UnsafeKind::NotRegular,
                    format!("{what} is {}", file_type_name(st.st_mode)),
                )),
            };
        }
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(unsafe_file(
            UnsafeKind::Symlink,
            format!("{what} is a symbolic link"),
        ));
    }
    if !(ft.is_file() || ft.is_dir()) {
        return Err(unsafe_file(
            UnsafeKind::NotRegular,
            format!("{what} is {}", file_type_name(meta.mode())),
        ));
    }
    Ok(())
}

fn clear_nonblock(f: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with plain integer arguments.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An image file, open and checked: what the launcher hashes, copies and hands to the
/// hypervisor. Nothing opens its path again.
#[derive(Debug)]
pub struct OpenFile {
    pub part: Part,
    pub file: File,
    /// Its size when it was checked; reads stop there.
    pub size: u64,
    /// Where it was opened (for the operator's messages).
    pub path: PathBuf,
}

/// Opens one bundle file: `path`'s last component in `dir` when given (the rest of
/// `path` is only for messages), else `path` itself (an operator's override). Never
/// follows a symlink in the last component; refuses anything but a regular file owned
/// by a trusted uid, not writable by group or others, within `part`'s size limit.
pub fn open_file(
    dir: Option<&File>,
    path: &Path,
    part: Part,
    trust: &Trust,
) -> Result<OpenFile, ImageError> {
    let err = |source| ImageError::Read {
        what: part.what(),
        path: path.to_owned(),
        source,
    };
    let what = path.display().to_string();
    pre_check(dir, path, &what).map_err(err)?;
    let file = open_raw(dir, path, libc::O_RDONLY).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    check_stat(&meta, false, &what, trust).map_err(err)?;
    let size = meta.len();
    if size > part.max_size() {
        return Err(err(unsafe_file(
            UnsafeKind::TooLarge,
            format!(
                "{what} is {size} bytes; a {} may be at most {} bytes",
                part.what(),
                part.max_size()
            ),
        )));
    }
    clear_nonblock(&file).map_err(err)?;
    Ok(OpenFile {
        part,
        file,
        size,
        path: path.to_owned(),
    })
}

/// A bundle directory, open: its files are opened relative to this descriptor, so
/// renaming or replacing the directory's path afterwards changes nothing.
#[derive(Debug)]
pub struct BundleDir {
    pub dir: File,
    pub path: PathBuf,
    pub trust: Trust,
}

fn dir_err(path: &Path, source: io::Error) -> ImageError {
    ImageError::Read {
        what: "image directory",
        path: path.to_owned(),
        source,
    }
}

impl BundleDir {
    /// Opens a directory the operator named (a configured path or a command-line
    /// argument: symlinks on the way are followed, as the operator chose them) and
    /// checks the directory itself: owner trusted, not writable by group or others, so
    /// nobody else can swap its entries.
    pub fn open(path: &Path, trust: &Trust) -> Result<Self, ImageError> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| dir_err(path, e))?;
        Self::checked(dir, path, trust)
    }

    /// Opens the entry `name` of an open directory (the launcher's image store),
    /// refusing a symlink.
    pub fn open_entry(
        parent: &File,
        parent_path: &Path,
        name: &str,
        trust: &Trust,
    ) -> Result<Self, ImageError> {
        let path = parent_path.join(name);
        let what = path.display().to_string();
        pre_check(Some(parent), &path, &what).map_err(|e| dir_err(&path, e))?;
        let dir = open_raw(Some(parent), &path, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| dir_err(&path, e))?;
        Self::checked(dir, &path, trust)
    }

    fn checked(dir: File, path: &Path, trust: &Trust) -> Result<Self, ImageError> {
        let meta = dir.metadata().map_err(|e| dir_err(path, e))?;
        check_stat(&meta, true, &path.display().to_string(), trust)
            .map_err(|e| dir_err(path, e))?;
        Ok(Self {
            dir,
            path: path.to_owned(),
            trust: trust.clone(),
        })
    }

    /// Opens and checks one of its files.
    pub fn open_part(&self, part: Part) -> Result<OpenFile, ImageError> {
        open_file(
            Some(&self.dir),
            &self.path.join(part.file_name()),
            part,
            &self.trust,
        )
    }
}

/// Where a bundle's files come from: a directory, with the kernel and the rootfs
/// optionally elsewhere (the operator's `CLAWOS_AGENT_KERNEL` / `CLAWOS_AGENT_ROOTFS`).
#[derive(Debug)]
pub struct BundleSource {
    pub dir: BundleDir,
    pub kernel: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
}

impl BundleSource {
    /// A plain bundle directory.
    pub fn dir(dir: BundleDir) -> Self {
        Self {
            dir,
            kernel: None,
            rootfs: None,
        }
    }

    fn open(&self, part: Part) -> Result<OpenFile, ImageError> {
        let elsewhere = match part {
            Part::Kernel => self.kernel.as_deref(),
            Part::Rootfs => self.rootfs.as_deref(),
            _ => None,
        };
        match elsewhere {
            Some(p) => open_file(None, p, part, &self.dir.trust),
            None => self.dir.open_part(part),
        }
    }
}

/// A bundle that passed verification, with each file still open: the kernel, the
/// initramfs and the vmlinux were hashed through these descriptors, the rootfs's size
/// checked on its own. Whatever boots the image must use these, not the paths.
#[derive(Debug)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    /// `manifest.sig` as read, when the bundle has one.
    pub signature: Option<Vec<u8>>,
    pub kernel: OpenFile,
    pub initramfs: OpenFile,
    pub vmlinux: Option<OpenFile>,
    pub rootfs: OpenFile,
}

fn is_not_found(e: &ImageError) -> Option<PathBuf> {
    match e {
        ImageError::Read { source, path, .. } if source.kind() == io::ErrorKind::NotFound => {
            Some(path.clone())
        }
        _ => None,
    }
}

/// Verifies a bundle as the launcher does before every boot: the signature over the raw
/// manifest bytes (when a key is configured) before they are parsed, the sha256 of the
/// kernel, initramfs and (if the manifest lists one) vmlinux, the rootfs's size, and the
/// pinned root hash. Every file is opened once and checked ([`open_file`]); everything is
/// read within `trust.read_timeout`.
pub fn verify_bundle(
    src: &BundleSource,
    policy: &VerifyPolicy,
) -> Result<VerifiedBundle, ImageError> {
    verify_with(&|p| src.open(p), policy, src.dir.trust.read_timeout)
}

pub(crate) fn verify_with(
    open: &dyn Fn(Part) -> Result<OpenFile, ImageError>,
    policy: &VerifyPolicy,
    read_timeout: Duration,
) -> Result<VerifiedBundle, ImageError> {
    let deadline = Instant::now() + read_timeout;
    let manifest_file = open(Part::Manifest)?;
    let manifest_bytes = manifest_file.read_all(deadline)?;
    let (signature, sig_path) = match open(Part::Signature) {
        Ok(f) => (Some(f.read_all(deadline)?), f.path),
        Err(e) => match is_not_found(&e) {
            Some(p) => (None, p),
            None => return Err(e),
        },
    };
    // The signature covers the raw bytes and is checked before they are parsed:
    // nothing unsigned is interpreted.
    if let Some(key) = &policy.public_key {
        let Some(sig) = &signature else {
            return Err(ImageError::Unsigned { path: sig_path });
        };
        let sig: [u8; 64] = std::str::from_utf8(sig)
            .ok()
            .and_then(|t| hex::decode(t.trim()).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ImageError::SignatureSyntax {
                path: sig_path.clone(),
            })?;
        key.verify(&manifest_bytes, &Signature::from_bytes(&sig))
            .map_err(|_| ImageError::SignatureMismatch {
                pubkey: hex::encode(key.as_bytes()),
            })?;
    }
    let manifest = parse_manifest(&manifest_file.path, &manifest_bytes)?;
    let kernel = open(Part::Kernel)?;
    kernel.check_sha256(&manifest.kernel_sha256, deadline)?;
    let initramfs = open(Part::Initramfs)?;
    initramfs.check_sha256(&manifest.initramfs_sha256, deadline)?;
    let vmlinux = match &manifest.vmlinux_sha256 {
        Some(h) => {
            let v = open(Part::Vmlinux)?;
            v.check_sha256(h, deadline)?;
            Some(v)
        }
        None => None,
    };
    let rootfs = open(Part::Rootfs)?;
    if rootfs.size != manifest.rootfs_size {
        return Err(ImageError::RootfsSize {
            path: rootfs.path.clone(),
            expected: manifest.rootfs_size,
            actual: rootfs.size,
        });
    }
    if let Some(pin) = &policy.pinned_root_hash
        && !pin.eq_ignore_ascii_case(&manifest.verity.root_hash)
    {
        return Err(ImageError::RootHashPin {
            expected: pin.clone(),
            actual: manifest.verity.root_hash.clone(),
        });
    }
    Ok(VerifiedBundle {
        manifest,
        manifest_bytes,
        signature,
        kernel,
        initramfs,
        vmlinux,
        rootfs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(super) fn trust() -> Trust {
        Trust {
            read_timeout: Duration::from_secs(5),
            ..Trust::launcher()
        }
    }

    pub(super) fn kind(e: &ImageError) -> Option<UnsafeKind> {
        match e {
            ImageError::Read { source, .. } => unsafe_kind(source),
            _ => None,
        }
    }

    #[test]
    fn symlinks_fifos_and_devices_are_refused_at_once() {
        let t = tempfile::tempdir().expect("tmp");
        let d = BundleDir::open(t.path(), &trust()).expect("dir");
        std::os::unix::fs::symlink("/dev/zero", t.path().join(files::INITRAMFS)).expect("ln");
        let started = Instant::now();
        let e = d.open_part(Part::Initramfs).expect_err("symlink");
        assert_eq!(kind(&e), Some(UnsafeKind::Symlink), "{e}");
        let fifo = CString::new(t.path().join(files::KERNEL).as_os_str().as_bytes()).expect("c");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let e = d.open_part(Part::Kernel).expect_err("fifo");
        assert_eq!(kind(&e), Some(UnsafeKind::NotRegular), "{e}");
        assert!(e.to_string().contains("FIFO"), "{e}");
        // Without a directory descriptor (an override path) too.
        let e = open_file(None, &t.path().join(files::KERNEL), Part::Kernel, &trust())
            .expect_err("fifo");
        assert_eq!(kind(&e), Some(UnsafeKind::NotRegular), "{e}");
        let e = open_file(None, Path::new("/dev/zero"), Part::Kernel, &trust()).expect_err("dev");
        assert_eq!(kind(&e), Some(UnsafeKind::NotRegular), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // A symlinked bundle directory inside a store is refused too.
        std::os::unix::fs::symlink("/etc", t.path().join("evil")).expect("ln");
        let e = BundleDir::open_entry(&d.dir, t.path(), "evil", &trust()).expect_err("link");
        assert_eq!(kind(&e), Some(UnsafeKind::Symlink), "{e}");
    }

    #[test]
    fn owner_mode_and_size_are_checked_on_the_open_file() {
        let t = tempfile::tempdir().expect("tmp");
        let d = BundleDir::open(t.path(), &trust()).expect("dir");
        let p = t.path().join(files::MANIFEST);
        std::fs::write(&p, b"{}").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = d.open_part(Part::Manifest).expect_err("writable");
        assert_eq!(kind(&e), Some(UnsafeKind::Writable), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let f = d.open_part(Part::Manifest).expect("ok");
        assert_eq!(
            f.read_all(Instant::now() + Duration::from_secs(1))
                .expect("read"),
            b"{}"
        );
        let strict = Trust {
            owners: Some(vec![u32::MAX - 7]),
            ..trust()
        };
        let e = open_file(None, &p, Part::Manifest, &strict).expect_err("owner");
        assert_eq!(kind(&e), Some(UnsafeKind::Owner), "{e}");
        let big = std::fs::File::create(t.path().join(files::SIGNATURE)).expect("create");
        big.set_len(Part::Signature.max_size() + 1).expect("size");
        let e = d.open_part(Part::Signature).expect_err("too large");
        assert_eq!(kind(&e), Some(UnsafeKind::TooLarge), "{e}");
        // A world-writable directory lets others swap entries: refused.
        let w = t.path().join("w");
        std::fs::create_dir(&w).expect("mkdir");
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = BundleDir::open(&w, &trust()).expect_err("writable dir");
        assert_eq!(kind(&e), Some(UnsafeKind::Writable), "{e}");
    }
}
