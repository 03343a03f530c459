//! Reading an open bundle file: through its descriptor only, at most the size `fstat`
//! gave and within a deadline, hashed as it is read — into memory, into nothing (a
//! hash), or into a new file whose copy is kept only if its hash is the expected one.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::{OpenFile, UnsafeKind, c_name, unsafe_file};
use crate::manifest::ImageError;

impl OpenFile {
    fn err(&self, source: io::Error) -> ImageError {
        ImageError::Read {
            what: self.part.what(),
            path: self.path.clone(),
            source,
        }
    }

    /// Feeds the file's first `size` bytes to `sink`, read through the descriptor (never
    /// the path), and returns their sha256. A file that ends early or a read that
    /// passes `deadline` is an error.
    fn read_through(
        &self,
        deadline: Instant,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<String, ImageError> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < self.size {
            if Instant::now() > deadline {
                return Err(self.err(unsafe_file(
                    UnsafeKind::TimedOut,
                    format!(
                        "{}: reading it passed the deadline at byte {at}",
                        self.path.display()
                    ),
                )));
            }
            let want = usize::try_from((self.size - at).min(buf.len() as u64)).unwrap_or(0);
            let n = match self.file.read_at(&mut buf[..want], at) {
                Ok(0) => {
                    return Err(self.err(unsafe_file(
                        UnsafeKind::Changed,
                        format!(
                            "{} ended at byte {at}, but was {} bytes when opened",
                            self.path.display(),
                            self.size
                        ),
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(e)),
            };
            h.update(&buf[..n]);
            sink(&buf[..n]).map_err(|e| self.err(e))?;
            at += n as u64;
        }
        Ok(hex::encode(h.finalize()))
    }

    /// The whole content (for the small files: manifest, signature).
    pub fn read_all(&self, deadline: Instant) -> Result<Vec<u8>, ImageError> {
        let mut out = Vec::with_capacity(usize::try_from(self.size).unwrap_or(0));
        self.read_through(deadline, |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// sha256 of the content, hex.
    pub fn sha256(&self, deadline: Instant) -> Result<String, ImageError> {
        self.read_through(deadline, |_| Ok(()))
    }

    /// Fails unless the content's sha256 is `expected` (from the signed manifest).
    pub fn check_sha256(&self, expected: &str, deadline: Instant) -> Result<(), ImageError> {
        let actual = self.sha256(deadline)?;
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(ImageError::HashMismatch {
                what: self.part.what(),
                path: self.path.clone(),
                expected: expected.to_owned(),
                actual,
            });
        }
        Ok(())
    }

    /// Copies the content into a new file `name` (mode `mode`) in the directory `dest`,
    /// hashing it as it is copied; when `expected` is given and the copy's hash differs,
    /// the copy is removed and this fails. So a copy that exists holds exactly the bytes
    /// that were verified. Returns the bytes copied.
    pub fn copy_into(
        &self,
        dest: &File,
        dest_path: &Path,
        name: &str,
        mode: u32,
        expected: Option<&str>,
        deadline: Instant,
    ) -> Result<u64, ImageError> {
        let target = dest_path.join(name);
        let werr = |source| ImageError::Write {
            path: target.clone(),
            source,
        };
        let cname = c_name(std::ffi::OsStr::new(name)).map_err(werr)?;
        // SAFETY: `cname` is NUL-terminated; `dest` is an open directory.
        let fd = unsafe {
            libc::openat(
                dest.as_raw_fd(),
                cname.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(werr(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let mut out = unsafe { File::from_raw_fd(fd) };
        let remove = || {
            // SAFETY: `cname` is NUL-terminated; `dest` is an open directory.
            unsafe { libc::unlinkat(dest.as_raw_fd(), cname.as_ptr(), 0) };
        };
        let copied = self.read_through(deadline, |b| out.write_all(b));
        let actual = match copied {
            Ok(h) => h,
            Err(e) => {
                remove();
                return Err(e);
            }
        };
        if let Some(expected) = expected
            && !actual.eq_ignore_ascii_case(expected)
        {
            remove();
            return Err(ImageError::HashMismatch {
                what: self.part.what(),
                path: self.path.clone(),
                expected: expected.to_owned(),
                actual,
            });
        }
        // The mode given to openat is filtered by the umask; set it exactly.
        // SAFETY: fchmod on a descriptor we own.
        if unsafe { libc::fchmod(out.as_raw_fd(), mode as libc::mode_t) } != 0 {
            let e = io::Error::last_os_error();
            remove();
            return Err(werr(e));
        }
        Ok(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Part;
    use crate::bundle::open_file;
    use crate::bundle::tests::{kind, trust};
    use crate::manifest::files;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    #[test]
    fn reads_stop_at_the_checked_size_and_the_deadline() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join(files::KERNEL);
        std::fs::write(&p, vec![7u8; 3 << 20]).expect("write");
        let f = open_file(None, &p, Part::Kernel, &trust()).expect("open");
        // Growing the file after the check changes nothing that is read.
        let mut g = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        g.write_all(b"appended").expect("append");
        let want = hex::encode(Sha256::digest(vec![7u8; 3 << 20]));
        assert_eq!(
            f.sha256(Instant::now() + Duration::from_secs(5))
                .expect("hash"),
            want
        );
        // Shrinking it is noticed.
        g.set_len(10).expect("truncate");
        let e = f
            .sha256(Instant::now() + Duration::from_secs(5))
            .expect_err("short");
        assert_eq!(kind(&e), Some(UnsafeKind::Changed), "{e}");
        std::fs::write(&p, vec![7u8; 3 << 20]).expect("write");
        let f = open_file(None, &p, Part::Kernel, &trust()).expect("open");
        let e = f
            .sha256(Instant::now() - Duration::from_secs(1))
            .expect_err("late");
        assert_eq!(kind(&e), Some(UnsafeKind::TimedOut), "{e}");
    }

    #[test]
    fn a_copy_holds_exactly_the_verified_bytes_or_does_not_exist() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join(files::INITRAMFS);
        std::fs::write(&p, b"the verified initramfs").expect("write");
        let f = open_file(None, &p, Part::Initramfs, &trust()).expect("open");
        let want = hex::encode(Sha256::digest(b"the verified initramfs"));
        // The path now names other bytes; the open file still has the checked ones.
        std::fs::rename(&p, t.path().join("old")).expect("mv");
        std::fs::write(&p, b"swapped in after the check").expect("swap");
        let out = t.path().join("out");
        std::fs::create_dir(&out).expect("mkdir");
        let od = File::open(&out).expect("dir");
        let deadline = Instant::now() + Duration::from_secs(5);
        f.copy_into(&od, &out, "initrd", 0o600, Some(&want), deadline)
            .expect("copy");
        assert_eq!(
            std::fs::read(out.join("initrd")).expect("read"),
            b"the verified initramfs"
        );
        let mode = std::fs::metadata(out.join("initrd")).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = f
            .copy_into(&od, &out, "other", 0o600, Some(&"0".repeat(64)), deadline)
            .expect_err("mismatch");
        assert!(matches!(e, ImageError::HashMismatch { .. }), "{e}");
        assert!(!out.join("other").exists(), "a refused copy is removed");
    }
}
