//! File access confined to `/workspace`: every path is resolved by the kernel with
//! `openat2(RESOLVE_BENEATH)`, so `..`, absolute paths and symlinks cannot lead out,
//! whatever the agent put in the workspace.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::protocol::Entry;

/// Where the workspace disk is mounted in the guest.
pub const WORKSPACE: &str = "/workspace";

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// A root directory that paths are confined to.
#[derive(Debug)]
pub struct Workspace {
    root: OwnedFd,
    root_path: String,
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH)`: changes what the descriptor names (an
/// `O_PATH` descriptor included), never what a path would resolve to.
fn fchown_fd(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: an open descriptor and an empty C string; AT_EMPTY_PATH makes the call act
    // on the descriptor itself.
    let rc = unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn refused(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

impl Workspace {
    /// Opens the confinement root (`/workspace` in the guest; any directory in tests).
    pub fn open(root: &Path) -> io::Result<Self> {
        let dir = File::open(root)?;
        Ok(Self {
            root: dir.into(),
            root_path: root.to_string_lossy().trim_end_matches('/').to_owned(),
        })
    }

    /// Turns a user path (`/workspace/a/b` or `a/b`) into one relative to the root.
    pub fn relative(&self, path: &str) -> io::Result<String> {
        let rel = if let Some(rest) = path.strip_prefix(&self.root_path) {
            if !(rest.is_empty() || rest.starts_with('/')) {
                return Err(refused(format!("{path:?} is outside {}", self.root_path)));
            }
            rest.trim_start_matches('/')
        } else if path.starts_with('/') {
            return Err(refused(format!("{path:?} is outside {}", self.root_path)));
        } else {
            path
        };
        if rel.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"));
        }
        Ok(if rel.is_empty() {
            ".".to_owned()
        } else {
            rel.to_owned()
        })
    }

    fn openat2(
        &self,
        dirfd: i32,
        rel: &str,
        flags: i32,
        mode: u32,
        shown: &str,
    ) -> io::Result<OwnedFd> {
        let c = CString::new(rel)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: u64::from(mode),
            resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: `c` is a valid C string and `how` a valid open_how of the size passed;
        // the kernel only reads them.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EXDEV) | Some(libc::ELOOP) => refused(format!(
                    "{shown:?} escapes {} (.. or a symlink pointing out)",
                    self.root_path
                )),
                _ => io::Error::new(e.kind(), format!("{shown}: {e}")),
            });
        }
        // SAFETY: `fd` is a new descriptor the kernel just returned to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Creates the directory `path` and any missing parents (`mkdir -p`), each level
    /// created with `mkdirat` in the confined descriptor of its parent, so `..` and
    /// symlinks cannot lead out; an existing directory is fine, anything else in the
    /// way is an error naming it.
    pub fn create_dirs(&self, path: &str, mode: u32) -> io::Result<()> {
        self.create_dirs_owned(path, mode, None)
    }

    /// [`Workspace::create_dirs`], giving each directory it makes to `owner` (uid, gid).
    pub fn create_dirs_owned(
        &self,
        path: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> io::Result<()> {
        let rel = self.relative(path)?;
        let mut dir = self.openat2(
            self.root.as_raw_fd(),
            ".",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            path,
        )?;
        for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                return Err(refused(format!("{path:?} escapes {}", self.root_path)));
            }
            let c = CString::new(part)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
            // SAFETY: a valid C string relative to an open directory descriptor.
            let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode & 0o7777) };
            let made = rc == 0;
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(io::Error::new(e.kind(), format!("{path}: {part}: {e}")));
                }
            }
            dir = self.openat2(
                dir.as_raw_fd(),
                part,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
                path,
            )?;
            if made && let Some((uid, gid)) = owner {
                fchown_fd(&dir, uid, gid)
                    .map_err(|e| io::Error::new(e.kind(), format!("{path}: chown {part}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Gives `path` (a directory or file in the workspace, or `.` for the root) to
    /// `uid`/`gid`, through a confined descriptor: never through a symlink (a symlink at
    /// `path` is refused), never outside the root.
    pub fn chown(&self, path: &str, uid: u32, gid: u32) -> io::Result<()> {
        let rel = self.relative(path)?;
        let fd = self.openat2(
            self.root.as_raw_fd(),
            &rel,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
            path,
        )?;
        if File::from(fd.try_clone()?)
            .metadata()?
            .file_type()
            .is_symlink()
        {
            return Err(refused(format!("{path:?} is a symbolic link")));
        }
        fchown_fd(&fd, uid, gid).map_err(|e| io::Error::new(e.kind(), format!("chown {path}: {e}")))
    }

    /// Opens a regular file for appending (created with `mode` if missing) and reading,
    /// confined like every other path, never through a symlink at its last component,
    /// never blocking on a FIFO: anything but a regular file is refused. For files root
    /// keeps in a workspace the agent can write to.
    pub fn open_append(&self, path: &str, mode: u32) -> io::Result<File> {
        let rel = self.relative(path)?;
        let fd = self.openat2(
            self.root.as_raw_fd(),
            &rel,
            libc::O_RDWR | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            mode & 0o7777,
            path,
        )?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path} is not a regular file"),
            ));
        }
        Ok(f)
    }

    /// Opens an existing file for reading.
    pub fn open_read(&self, path: &str) -> io::Result<File> {
        let rel = self.relative(path)?;
        let fd = self.openat2(self.root.as_raw_fd(), &rel, libc::O_RDONLY, 0, path)?;
        let f = File::from(fd);
        if f.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path} is a directory"),
            ));
        }
        Ok(f)
    }

    /// Lists a directory.
    pub fn list(&self, path: &str) -> io::Result<Vec<Entry>> {
        let rel = self.relative(path)?;
        let fd = self.openat2(
            self.root.as_raw_fd(),
            &rel,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
            path,
        )?;
        // The descriptor is confined; read it through its /proc handle.
        let mut out = Vec::new();
        for e in std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))? {
            let e = e?;
            let meta = e.path().symlink_metadata()?;
            let ft = meta.file_type();
            let kind = if ft.is_symlink() {
                "symlink"
            } else if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else {
                "other"
            };
            out.push(Entry {
                name: e.file_name().to_string_lossy().into_owned(),
                kind: kind.into(),
                size: meta.len(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates (or replaces) a file atomically: the data goes to a temporary file in the
    /// same directory, which `commit` renames into place. Never follows a symlink at the
    /// final component.
    pub fn create(&self, path: &str, mode: u32) -> io::Result<PendingFile> {
        let rel = self.relative(path)?;
        let (parent, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (if p.is_empty() { "." } else { p }, n),
            None => (".", rel.as_str()),
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path:?} does not name a file"),
            ));
        }
        let dir = self.openat2(
            self.root.as_raw_fd(),
            parent,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            path,
        )?;
        let tmp = format!(".{name}.clawos-partial-{}", std::process::id());
        let file = self.openat2(
            dir.as_raw_fd(),
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
            mode & 0o7777,
            path,
        )?;
        Ok(PendingFile {
            dir,
            tmp,
            name: name.to_owned(),
            file: File::from(file),
        })
    }
}

/// A file being written; invisible under its name until [`PendingFile::commit`].
#[derive(Debug)]
pub struct PendingFile {
    dir: OwnedFd,
    tmp: String,
    name: String,
    pub file: File,
}

impl PendingFile {
    /// Flushes the data and renames the file into place.
    pub fn commit(self) -> io::Result<()> {
        self.file.sync_all()?;
        let (a, b) = (
            CString::new(self.tmp.as_str())?,
            CString::new(self.name.as_str())?,
        );
        // SAFETY: both names are valid C strings relative to an open directory fd.
        let rc = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                a.as_ptr(),
                self.dir.as_raw_fd(),
                b.as_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the temporary file.
    pub fn abort(self) {
        if let Ok(a) = CString::new(self.tmp.as_str()) {
            // SAFETY: a valid C string relative to an open directory fd.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), a.as_ptr(), 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn ws() -> (tempfile::TempDir, Workspace) {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        std::fs::write(d.path().join("sub/f"), b"data").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("out")).expect("symlink");
        std::os::unix::fs::symlink("../..", d.path().join("sub/up")).expect("symlink");
        std::os::unix::fs::symlink("f", d.path().join("sub/in")).expect("symlink");
        let w = Workspace::open(d.path()).expect("open");
        (d, w)
    }

    #[test]
    fn escapes_are_refused() {
        let (d, w) = ws();
        let root = d.path().to_string_lossy().into_owned();
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "out",
            "sub/up/etc/passwd",
            "sub/../../x",
        ] {
            let e = w.open_read(bad).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{bad}: {e}");
        }
        assert!(w.create("../x", 0o644).is_err());
        assert!(
            w.create(&format!("{root}x/y"), 0o644).is_err(),
            "a sibling dir sharing the prefix is outside"
        );
        assert!(w.list("sub/up").is_err());
    }

    #[test]
    fn missing_directories_are_made_inside_and_never_through_a_symlink() {
        let (d, w) = ws();
        w.create_dirs("in/research/deep", 0o755).expect("mkdir -p");
        assert!(d.path().join("in/research/deep").is_dir());
        w.create_dirs("in/research", 0o755)
            .expect("an existing directory is fine");
        // Through a symlink pointing out, or with `..`, nothing is made outside.
        for bad in ["sub/up/escaped", "../escaped", "sub/../../escaped"] {
            assert!(w.create_dirs(bad, 0o755).is_err(), "{bad}");
        }
        assert!(!d.path().parent().expect("parent").join("escaped").exists());
        // A file in the way is named.
        let e = w
            .create_dirs("sub/f/x", 0o755)
            .expect_err("a file in the way");
        assert!(e.to_string().contains('f'), "{e}");
    }

    #[test]
    fn roots_own_files_are_never_reached_through_what_the_agent_left() {
        let (d, w) = ws();
        // A symlink out, a symlink inside, and a FIFO where root keeps a file: each
        // refused at once (no blocking), nothing outside touched.
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("boots-out")).expect("symlink");
        std::os::unix::fs::symlink("sub/f", d.path().join("boots-in")).expect("symlink");
        let fifo = std::ffi::CString::new(d.path().join("boots-fifo").to_string_lossy().as_bytes())
            .expect("path");
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        for bad in ["boots-out", "boots-in", "boots-fifo"] {
            assert!(w.open_append(bad, 0o644).is_err(), "{bad}");
        }
        let mut f = w.open_append("boots", 0o644).expect("a new regular file");
        writeln!(f, "boot 1").expect("append");
        assert!(w.chown("out", 0, 0).is_err(), "chown through a symlink");
        assert!(w.chown("../x", 0, 0).is_err());
        w.chown(".", 0, 0).expect("the root itself");
    }

    #[test]
    fn reads_writes_and_lists_inside() {
        let (d, w) = ws();
        let mut s = String::new();
        w.open_read("sub/f")
            .expect("read")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "data");
        w.open_read("sub/in")
            .expect("a symlink that stays inside is fine");
        let root = d.path().to_string_lossy().into_owned();
        w.open_read(&format!("{root}/sub/f"))
            .expect("absolute path inside the root");
        let mut p = w.create("sub/new", 0o600).expect("create");
        p.file.write_all(b"x").expect("write");
        assert!(
            !d.path().join("sub/new").exists(),
            "not visible before commit"
        );
        p.commit().expect("commit");
        assert_eq!(std::fs::read(d.path().join("sub/new")).expect("read"), b"x");
        let names: Vec<String> = w
            .list("sub")
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["f", "in", "new", "up"]);
        // Writing "out" replaces the symlink, never /etc/passwd.
        let before = std::fs::read("/etc/passwd").expect("passwd");
        let mut p = w.create("out", 0o600).expect("create");
        p.file.write_all(b"nope").expect("write");
        p.commit().expect("commit");
        assert_eq!(std::fs::read("/etc/passwd").expect("passwd"), before);
    }
}
