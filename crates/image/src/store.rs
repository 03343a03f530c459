//! The launcher's image store: `<state>/images/<name>/`, one verified bundle per name.
//!
//! `clawos image add NAME DIR` verifies a bundle and copies it here (directories 0700,
//! files 0644, owned by the store's owner, i.e. the launcher's user); the launcher boots
//! images by name only, so no API caller can make it open a path of their choosing. The
//! store directory itself must belong to root or the launcher's user and be writable by
//! nobody else, so its entries cannot be swapped.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bundle::{BundleSource, Trust, verify_bundle};
use crate::manifest::{ImageError, Manifest, VerifyPolicy, files};

/// The image a VM boots when none is named.
pub const DEFAULT_IMAGE: &str = "default";

/// The store directory of a state directory.
pub fn images_dir(state: &Path) -> PathBuf {
    state.join("images")
}

/// An image name follows a VM name's rules — `[a-z0-9-]`, 1–63 characters, not
/// starting or ending with `-` — so it names a directory in the store and is never a
/// path. The error says which rule it breaks.
pub fn check_name(name: &str) -> Result<(), String> {
    match clawos_api::label_problem(name) {
        None => Ok(()),
        Some(why) => Err(format!(
            "invalid image name {:?}: {why} (images are chosen by name — `clawos image add NAME DIR` registers one — never by path)",
            name.chars().take(80).collect::<String>()
        )),
    }
}

fn werr(path: &Path, source: io::Error) -> ImageError {
    ImageError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Opens the store directory, creating it (0700) when `create`. Refuses one owned by an
/// untrusted uid or writable by group or others.
pub fn open_store(dir: &Path, create: bool) -> Result<File, ImageError> {
    if create {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| werr(dir, e))?;
    }
    let bundle = crate::bundle::BundleDir::open(dir, &Trust::launcher())?;
    Ok(bundle.dir)
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Writes `bytes` to a new file `name` in `dir`.
fn write_new(
    dir: &File,
    dir_path: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<(), ImageError> {
    let path = dir_path.join(name);
    let c = c_name(name).map_err(|e| werr(&path, e))?;
    // SAFETY: `c` is NUL-terminated and `dir` an open directory.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(werr(&path, io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes)
        .and_then(|()| f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode)))
        .map_err(|e| werr(&path, e))
}

/// Verifies the bundle `src` exactly as the launcher does before a boot (signature when
/// `policy` has a key, hashes, rootfs size, pinned root hash; no symlinks or special
/// files) and copies it into the store as `name`: built in a hidden staging directory
/// from the verified descriptors (kernel, initramfs and vmlinux hashed again as they
/// are copied), synced, then renamed into place — atomically replacing an existing
/// image of that name when `replace`. VMs already booted from the old image keep
/// running: they hold their own descriptors and copies.
pub fn add(
    store_path: &Path,
    name: &str,
    src: &BundleSource,
    policy: &VerifyPolicy,
    replace: bool,
) -> Result<Manifest, ImageError> {
    check_name(name).map_err(|m| {
        werr(
            &store_path.join(name),
            io::Error::new(io::ErrorKind::InvalidInput, m),
        )
    })?;
    let store = open_store(store_path, true)?;
    let owner = store.metadata().map_err(|e| werr(store_path, e))?;
    let verified = verify_bundle(src, policy)?;
    let final_path = store_path.join(name);
    if !replace && std::fs::symlink_metadata(&final_path).is_ok() {
        return Err(werr(
            &final_path,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("an image named {name} exists (--force replaces it)"),
            ),
        ));
    }
    let staging = format!(".{name}.adding.{}", std::process::id());
    let staging_path = store_path.join(&staging);
    let _ = std::fs::remove_dir_all(&staging_path);
    let built = (|| {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging_path)
            .map_err(|e| werr(&staging_path, e))?;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&staging_path)
            .map_err(|e| werr(&staging_path, e))?;
        let deadline = Instant::now() + src.dir.trust.read_timeout;
        let m = &verified.manifest;
        write_new(
            &dir,
            &staging_path,
            files::MANIFEST,
            &verified.manifest_bytes,
            0o644,
        )?;
        if let Some(sig) = &verified.signature {
            write_new(&dir, &staging_path, files::SIGNATURE, sig, 0o644)?;
        }
        let copies = [
            (
                &verified.kernel,
                files::KERNEL,
                Some(m.kernel_sha256.as_str()),
            ),
            (
                &verified.initramfs,
                files::INITRAMFS,
                Some(m.initramfs_sha256.as_str()),
            ),
            (&verified.rootfs, files::ROOTFS, None),
        ];
        for (f, file, expected) in copies {
            f.copy_into(&dir, &staging_path, file, 0o644, expected, deadline)?;
        }
        if let (Some(v), Some(h)) = (&verified.vmlinux, &m.vmlinux_sha256) {
            v.copy_into(
                &dir,
                &staging_path,
                files::VMLINUX,
                0o644,
                Some(h),
                deadline,
            )?;
        }
        // Owned by the store's owner (the launcher's user) when root adds for it.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 && owner.uid() != 0 {
            let mut names: Vec<&str> = vec![
                files::MANIFEST,
                files::KERNEL,
                files::INITRAMFS,
                files::ROOTFS,
            ];
            if verified.signature.is_some() {
                names.push(files::SIGNATURE);
            }
            if verified.vmlinux.is_some() {
                names.push(files::VMLINUX);
            }
            for n in names {
                let p = staging_path.join(n);
                std::os::unix::fs::lchown(&p, Some(owner.uid()), Some(owner.gid()))
                    .map_err(|e| werr(&p, e))?;
            }
            std::os::unix::fs::fchown(&dir, Some(owner.uid()), Some(owner.gid()))
                .map_err(|e| werr(&staging_path, e))?;
        }
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(werr(&staging_path, io::Error::last_os_error()));
        }
        Ok(())
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&staging_path);
        return Err(e);
    }
    let (cs, cf) = (
        c_name(&staging).map_err(|e| werr(&staging_path, e))?,
        c_name(name).map_err(|e| werr(&final_path, e))?,
    );
    let fd = store.as_raw_fd();
    // SAFETY: both names are NUL-terminated; `fd` is the open store directory.
    let exchanged =
        unsafe { libc::renameat2(fd, cs.as_ptr(), fd, cf.as_ptr(), libc::RENAME_EXCHANGE) } == 0;
    let placed = if exchanged {
        // The old image now has the staging name.
        let _ = std::fs::remove_dir_all(&staging_path);
        Ok(())
    } else {
        // SAFETY: as above; a plain rename when there was nothing to exchange with.
        match unsafe { libc::renameat(fd, cs.as_ptr(), fd, cf.as_ptr()) } {
            0 => Ok(()),
            _ => Err(werr(&final_path, io::Error::last_os_error())),
        }
    };
    if let Err(e) = placed {
        let _ = std::fs::remove_dir_all(&staging_path);
        return Err(e);
    }
    // SAFETY: fsync on the open store directory, so the rename is durable.
    unsafe { libc::fsync(fd) };
    Ok(verified.manifest)
}

/// Removes leftovers of interrupted adds (`.<name>.adding.<pid>` whose process is gone).
pub fn clean_leftovers(store_path: &Path) {
    let Ok(entries) = std::fs::read_dir(store_path) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n
            .strip_prefix('.')
            .and_then(|r| r.rsplit_once(".adding."))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::BundleDir;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// A small signed bundle (nothing boots it); returns its public key.
    fn bundle(dir: &Path) -> crate::manifest::VerifyingKey {
        let key_path = dir.parent().expect("parent").join("k");
        crate::fixture::small_signed_bundle(dir, &key_path)
            .expect("fixture bundle")
            .verifying_key()
    }

    fn source(dir: &Path) -> BundleSource {
        BundleSource::dir(BundleDir::open(dir, &Trust::operator()).expect("open"))
    }

    #[test]
    fn add_copies_a_verified_bundle_into_a_private_store() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        let key = bundle(&src);
        let policy = VerifyPolicy {
            public_key: Some(key),
            pinned_root_hash: None,
        };
        let store = images_dir(&t.path().join("state"));
        add(&store, "agent", &source(&src), &policy, false).expect("add");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&store), 0o700);
        assert_eq!(mode(&store.join("agent")), 0o700);
        for f in [
            files::KERNEL,
            files::INITRAMFS,
            files::ROOTFS,
            files::MANIFEST,
            files::SIGNATURE,
        ] {
            assert_eq!(mode(&store.join("agent").join(f)), 0o644, "{f}");
            assert_eq!(
                std::fs::read(store.join("agent").join(f)).expect("read"),
                std::fs::read(src.join(f)).expect("read"),
                "{f}"
            );
        }
        // The store copy verifies on its own, with the launcher's trust.
        let stored = BundleDir::open(&store.join("agent"), &Trust::launcher()).expect("dir");
        crate::bundle::verify_bundle(&BundleSource::dir(stored), &policy).expect("verify");
        let e = add(&store, "agent", &source(&src), &policy, false).expect_err("exists");
        assert!(e.to_string().contains("--force"), "{e}");
        std::fs::write(src.join(files::KERNEL), b"other kernel").expect("tamper");
        let e = add(&store, "agent", &source(&src), &policy, true).expect_err("tampered");
        assert!(
            matches!(e, ImageError::HashMismatch { what: "kernel", .. }),
            "{e}"
        );
        assert_eq!(
            std::fs::read(store.join("agent").join(files::KERNEL)).expect("read"),
            b"fixture kernel",
            "the refused copy left the stored bundle as it was"
        );
        let left: Vec<_> = std::fs::read_dir(&store)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["agent"], "a refused add leaves nothing behind");
        let e = add(&store, "../x", &source(&src), &policy, false).expect_err("name");
        assert!(e.to_string().contains("invalid image name"), "{e}");
    }

    #[test]
    fn hostile_bundles_are_refused_quickly_without_staging_anything() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        let key = bundle(&src);
        let policy = VerifyPolicy {
            public_key: Some(key),
            pinned_root_hash: None,
        };
        let store = images_dir(&t.path().join("state"));
        let initramfs = src.join(files::INITRAMFS);
        let cases: [(&str, &dyn Fn()); 3] = [
            ("fifo", &|| {
                let c = CString::new(initramfs.as_os_str().as_encoded_bytes()).expect("c");
                // SAFETY: a valid NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            }),
            ("dev-zero", &|| {
                std::os::unix::fs::symlink("/dev/zero", &initramfs).expect("ln")
            }),
            ("shadow", &|| {
                std::os::unix::fs::symlink("/etc/shadow", &initramfs).expect("ln")
            }),
        ];
        for (what, make) in cases {
            let _ = std::fs::remove_file(&initramfs);
            make();
            let started = Instant::now();
            let e = add(&store, what, &source(&src), &policy, false).expect_err(what);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{what}: slow refusal"
            );
            assert!(
                matches!(
                    e,
                    ImageError::Read {
                        what: "initramfs",
                        ..
                    }
                ),
                "{what}: {e}"
            );
            let public = e.public_message();
            assert!(
                public == "initramfs is a symbolic link"
                    || public == "initramfs is not a regular file",
                "{what}: {public}"
            );
            assert!(!store.join(what).exists());
        }
    }

    #[test]
    fn names_are_labels_never_paths() {
        for good in ["default", "a", "agent-img-2", &"a".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc",
            "../x",
            "x/y",
            "A",
            "a.b",
            "-a",
            "a-",
            &"a".repeat(64),
            "/tmp/evil",
        ] {
            let e = check_name(bad).expect_err(bad);
            assert!(e.contains("invalid image name"), "{e}");
        }
        assert!(
            check_name("/tmp/x")
                .expect_err("path")
                .contains("never by path")
        );
    }
}
