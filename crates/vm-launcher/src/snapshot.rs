//! Snapshots on disk: `<vm>/snapshots/<tag>/` holds `snapshot.json` (the
//! [`Snapshot`] record), the hypervisor's saved memory and device state, and sparse
//! copies of the VM's writable disks plus its config disk and control secret — what
//! the saved memory was using, so a restore never pairs old memory with newer disks.
//!
//! A snapshot is built in `.<tag>.saving` and renamed into place once complete, so a
//! failed or interrupted save leaves no directory that looks like a snapshot.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clawos_vm_launcher_api::Snapshot;

use crate::LauncherError;
use crate::names::SnapshotTag;
use crate::store::VmDir;

/// The record of a snapshot inside its directory.
pub const RECORD: &str = "snapshot.json";
/// QEMU's migration stream (memory, CPU and device state).
pub const QEMU_STATE: &str = "state.bin";
/// Firecracker's device and CPU state.
pub const FC_VMSTATE: &str = "vmstate";
/// Firecracker's guest memory.
pub const FC_MEMORY: &str = "memory";

/// The VM directory's files a snapshot carries: the writable disks the saved memory has
/// cached blocks of, the config disk, and the secret the restored guest agent still
/// holds in memory.
pub fn carried_files(dir: &VmDir) -> [PathBuf; 4] {
    [
        dir.runtime_disk(),
        dir.workspace_disk(),
        dir.config_disk(),
        dir.secret(),
    ]
}

/// One snapshot directory.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    pub root: PathBuf,
    /// The same, relative to the VM directory (the hypervisor's working directory).
    pub relative: String,
}

impl SnapshotDir {
    /// The final directory of `tag`.
    pub fn new(vm: &VmDir, tag: &SnapshotTag) -> Self {
        Self {
            root: vm.snapshots().join(tag),
            relative: format!("snapshots/{tag}"),
        }
    }

    /// The directory a snapshot of `tag` is built in.
    pub fn staging(vm: &VmDir, tag: &SnapshotTag) -> Self {
        Self {
            root: vm.snapshots().join(format!(".{tag}.saving")),
            relative: format!("snapshots/.{tag}.saving"),
        }
    }

    pub fn record(&self) -> PathBuf {
        self.root.join(RECORD)
    }

    pub fn load(&self) -> io::Result<Snapshot> {
        let bytes = fs::read(self.record())?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Creates the staging directory for `tag` (0700), replacing leftovers of an earlier
/// failed attempt.
pub fn begin(vm: &VmDir, tag: &SnapshotTag) -> Result<SnapshotDir, LauncherError> {
    let parent = vm.snapshots();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .map_err(|e| LauncherError::io(&parent, e))?;
    let staging = SnapshotDir::staging(vm, tag);
    let _ = fs::remove_dir_all(&staging.root);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging.root)
        .map_err(|e| LauncherError::io(&staging.root, e))?;
    Ok(staging)
}

/// Copies the VM's carried files into the staging directory; returns the data bytes.
pub fn copy_disks_in(vm: &VmDir, staging: &SnapshotDir) -> Result<u64, LauncherError> {
    let mut total = 0;
    for src in carried_files(vm) {
        let name = src.file_name().unwrap_or_default();
        let dst = staging.root.join(name);
        total += copy_sparse(&src, &dst).map_err(|e| LauncherError::io(&src, e))?;
    }
    Ok(total)
}

/// Writes the record, seals the directory with `key`, and renames it to its final name.
pub fn commit(
    vm: &VmDir,
    staging: &SnapshotDir,
    record: &Snapshot,
    key: &[u8],
) -> Result<SnapshotDir, LauncherError> {
    let json = serde_json::to_vec_pretty(record)
        .map_err(|e| LauncherError::Internal(format!("snapshot record: {e}")))?;
    clawos_service::atomic_write(&staging.record(), &json, 0o600)
        .map_err(|e| LauncherError::io(&staging.record(), e))?;
    seal(&staging.root, key).map_err(|e| LauncherError::io(&staging.root, e))?;
    let tag = SnapshotTag::parse(&record.tag)?;
    let done = SnapshotDir::new(vm, &tag);
    fs::rename(&staging.root, &done.root).map_err(|e| LauncherError::io(&done.root, e))?;
    sync_dir(&vm.snapshots());
    Ok(done)
}

/// Puts a snapshot's copies of the carried files back into the VM directory. All files
/// are copied first and renamed over the VM's only when every copy succeeded, so a
/// failure leaves the VM's disks as they were.
pub fn copy_disks_out(vm: &VmDir, snap: &SnapshotDir) -> Result<(), LauncherError> {
    let files = carried_files(vm);
    let mut staged = Vec::new();
    let result = (|| {
        for dst in &files {
            let name = dst.file_name().unwrap_or_default();
            let src = snap.root.join(name);
            let tmp = dst.with_extension("restoring");
            let _ = fs::remove_file(&tmp);
            staged.push(tmp.clone());
            copy_sparse(&src, &tmp).map_err(|e| LauncherError::io(&src, e))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for t in staged {
            let _ = fs::remove_file(t);
        }
        return Err(e);
    }
    for (tmp, dst) in staged.iter().zip(files.iter()) {
        fs::rename(tmp, dst).map_err(|e| LauncherError::io(dst, e))?;
    }
    sync_dir(&vm.root);
    Ok(())
}

/// A VM's complete snapshots, oldest first.
pub fn list(vm: &VmDir) -> Vec<Snapshot> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(vm.snapshots()) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Snapshots being built or deleted start with a dot, which no tag does.
        let Ok(tag) = SnapshotTag::parse(&name) else {
            continue;
        };
        match SnapshotDir::new(vm, &tag).load() {
            Ok(s) => out.push(s),
            Err(err) => {
                tracing::warn!(snapshot = %name, error = %err, "unreadable snapshot record")
            }
        }
    }
    out.sort_by(|a, b| (a.created_at, &a.tag).cmp(&(b.created_at, &b.tag)));
    out
}

/// Deletes a snapshot (renamed away first, so a crash mid-delete never leaves a
/// half-deleted snapshot that looks complete).
pub fn remove(vm: &VmDir, tag: &SnapshotTag) -> Result<(), LauncherError> {
    let dir = SnapshotDir::new(vm, tag).root;
    let doomed = vm.snapshots().join(format!(".{tag}.deleting"));
    fs::rename(&dir, &doomed).map_err(|e| LauncherError::io(&dir, e))?;
    fs::remove_dir_all(&doomed).map_err(|e| LauncherError::io(&doomed, e))
}

/// Removes staging and deleting leftovers of an interrupted save or delete.
pub fn clean_leftovers(vm: &VmDir) {
    let Ok(entries) = fs::read_dir(vm.snapshots()) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') && (n.ends_with(".saving") || n.ends_with(".deleting")) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Reads a file's data ranges only (the file system's `SEEK_DATA`/`SEEK_HOLE`; holes
/// read as zeros and are skipped), handing each chunk with its offset to `f`. Returns
/// the data bytes read.
fn read_data_ranges(
    from: &mut File,
    mut f: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let len = from.metadata()?.len();
    let fd = from.as_raw_fd();
    let mut pos: i64 = 0;
    let mut read = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        // SAFETY: lseek takes no pointers; `fd` is open for as long as `from` lives.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data after `pos`, the rest is a hole.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        from.seek(SeekFrom::Start(data as u64))?;
        let mut at = data as u64;
        let end = hole as u64;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            from.read_exact(&mut buf[..n])?;
            f(at, &buf[..n])?;
            at += n as u64;
        }
        read += end - data as u64;
        pos = hole;
    }
    Ok(read)
}

/// Copies `src` to a new file `dst` (0600) keeping holes: only the data ranges the file
/// system reports are read and written, so a mostly empty 1 GiB disk image copies in a
/// fraction of its size. Returns the data bytes copied.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let mut from = File::open(src)?;
    let len = from.metadata()?.len();
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    let result = (|| {
        to.set_len(len)?;
        let copied = read_data_ranges(&mut from, |at, chunk| {
            to.seek(SeekFrom::Start(at))?;
            to.write_all(chunk)
        })?;
        to.sync_all()?;
        Ok(copied)
    })();
    if result.is_err() {
        let _ = fs::remove_file(dst);
    }
    result
}

/// The file holding a snapshot's seal.
pub const SEAL: &str = "snapshot.mac";

/// HMAC-SHA256, under the launcher's own key, over every file of a snapshot directory
/// (name, length, and each data range with its offset), in name order. A snapshot's
/// files are written by the launcher and the hypervisor only; anything that changes
/// one afterwards (another process, a restored backup, a swapped disk) breaks the seal.
fn seal_of(dir: &Path, key: &[u8]) -> io::Result<[u8; 32]> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut names: Vec<String> = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == SEAL {
            continue;
        }
        if !e.file_type()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} in a snapshot is not a regular file"),
            ));
        }
        names.push(name);
    }
    names.sort();
    for name in names {
        let mut f = File::open(dir.join(&name))?;
        mac.update(&(name.len() as u64).to_le_bytes());
        mac.update(name.as_bytes());
        mac.update(&f.metadata()?.len().to_le_bytes());
        read_data_ranges(&mut f, |at, chunk| {
            mac.update(&at.to_le_bytes());
            mac.update(&(chunk.len() as u64).to_le_bytes());
            mac.update(chunk);
            Ok(())
        })?;
    }
    Ok(mac.finalize().into_bytes().into())
}

/// Seals a complete snapshot directory (before it is renamed into place).
pub fn seal(dir: &Path, key: &[u8]) -> io::Result<()> {
    let tag = seal_of(dir, key)?;
    clawos_service::atomic_write(&dir.join(SEAL), hex::encode(tag).as_bytes(), 0o600)
}

/// Whether a snapshot's files are exactly those it was sealed with.
pub fn check_seal(dir: &Path, key: &[u8]) -> io::Result<bool> {
    let stored = match fs::read_to_string(dir.join(SEAL)) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Ok(stored) = hex::decode(stored.trim()) else {
        return Ok(false);
    };
    let now = seal_of(dir, key)?;
    // Constant time: the comparison says nothing about how close a forgery came.
    Ok(stored.len() == now.len()
        && stored
            .iter()
            .zip(now)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().expect("test file operation");
        let src = dir.path().join("src.img");
        let mut f = File::create(&src).expect("test file operation");
        f.set_len(64 << 20).expect("test file operation");
        f.seek(SeekFrom::Start(5 << 20))
            .expect("test file operation");
        f.write_all(&[0xab; 10_000]).expect("test file operation");
        f.seek(SeekFrom::Start((64 << 20) - 3))
            .expect("test file operation");
        f.write_all(b"end").expect("test file operation");
        drop(f);
        let dst = dir.path().join("dst.img");
        let copied = copy_sparse(&src, &dst).expect("test file operation");
        assert_eq!(
            fs::read(&src).expect("test file operation"),
            fs::read(&dst).expect("test file operation")
        );
        assert!(
            copied < 1 << 20,
            "copied {copied} bytes of a 64 MiB sparse file"
        );
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&dst).expect("test file operation");
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "holes lost: {} blocks",
            m.blocks()
        );
        // An existing destination is never overwritten.
        assert_eq!(
            copy_sparse(&src, &dst).expect_err("must fail").kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn staging_is_invisible_until_committed_and_restores_are_all_or_nothing() {
        let tmp = tempfile::tempdir().expect("test file operation");
        let vm = VmDir {
            root: tmp.path().join("a1"),
        };
        fs::create_dir(&vm.root).expect("test file operation");
        for (i, f) in carried_files(&vm).iter().enumerate() {
            fs::write(f, format!("v1-{i}")).expect("test file operation");
        }
        let t1 = SnapshotTag::parse("t1").expect("tag");
        let staging = begin(&vm, &t1).expect("test file operation");
        copy_disks_in(&vm, &staging).expect("test file operation");
        assert!(
            list(&vm).is_empty(),
            "a staging directory is not a snapshot"
        );
        let rec = Snapshot {
            tag: "t1".into(),
            vm: "a1".into(),
            created_at: 1,
            backend: "qemu".into(),
            mem_mib: 256,
            vcpus: 1,
            root_hash: "ab".into(),
            state_bytes: 0,
            disk_bytes: 0,
            save_ms: 0,
        };
        let done = commit(&vm, &staging, &rec, b"test seal key").expect("test file operation");
        assert_eq!(list(&vm), vec![rec]);
        for f in carried_files(&vm) {
            fs::write(&f, "v2").expect("test file operation");
        }
        // A snapshot missing one file: nothing in the VM directory changes.
        fs::remove_file(done.root.join("config.img")).expect("test file operation");
        assert!(copy_disks_out(&vm, &done).is_err());
        for f in carried_files(&vm) {
            assert_eq!(fs::read_to_string(&f).expect("test file operation"), "v2");
            assert!(!f.with_extension("restoring").exists());
        }
        fs::write(done.root.join("config.img"), "v1-2").expect("test file operation");
        copy_disks_out(&vm, &done).expect("test file operation");
        for (i, f) in carried_files(&vm).iter().enumerate() {
            assert_eq!(
                fs::read_to_string(f).expect("test file operation"),
                format!("v1-{i}")
            );
        }
        remove(&vm, &t1).expect("test file operation");
        assert!(list(&vm).is_empty());
    }
}
