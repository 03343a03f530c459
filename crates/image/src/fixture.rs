//! A minimal signed bundle of small files, for the tests of everything that verifies
//! and selects images without booting them (the image store, the launcher's state
//! machine on its fake hypervisor). Verification of it is real; nothing boots it.

use std::path::Path;

use ed25519_dalek::SigningKey;

use crate::manifest::{AgentRuntime, MANIFEST_VERSION, Manifest, files, sha256_file, sign_bundle};
use crate::verity::VerityGeometry;
use crate::{ImageError, keys};

/// Size of the fixture's rootfs.
pub const ROOTFS_BYTES: u64 = 8192;

/// Writes a small bundle into `dir` (created if needed) and signs it with a new key
/// kept at `key_path` (replacing one there); returns that key.
pub fn small_signed_bundle(dir: &Path, key_path: &Path) -> Result<SigningKey, ImageError> {
    small_signed_bundle_with(dir, key_path, None)
}

/// [`small_signed_bundle`] whose manifest names an agent runtime (its minimum memory,
/// its readiness timeout).
pub fn small_signed_bundle_with(
    dir: &Path,
    key_path: &Path,
    agent_runtime: Option<AgentRuntime>,
) -> Result<SigningKey, ImageError> {
    let write = |name: &str, data: &[u8]| {
        std::fs::write(dir.join(name), data).map_err(|source| ImageError::Write {
            path: dir.join(name),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(|source| ImageError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write(files::KERNEL, b"fixture kernel")?;
    write(files::INITRAMFS, b"fixture initramfs")?;
    write(files::ROOTFS, &vec![0u8; ROOTFS_BYTES as usize])?;
    let sha = |name: &'static str| {
        sha256_file(&dir.join(name)).map_err(|source| ImageError::Read {
            what: name,
            path: dir.join(name),
            source,
        })
    };
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        version: "fixture".into(),
        created: "2026-01-01T00:00:00Z".into(),
        kernel_release: "fixture".into(),
        kernel_sha256: sha(files::KERNEL)?,
        initramfs_sha256: sha(files::INITRAMFS)?,
        vmlinux_sha256: None,
        cmdline: "console=ttyS0".into(),
        rootfs_size: ROOTFS_BYTES,
        verity: VerityGeometry {
            algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 1,
            hash_start_block: 1,
            salt: "00".into(),
            root_hash: "ab".repeat(32),
        },
        agent_runtime,
    };
    let json = serde_json::to_vec(&manifest).map_err(|e| ImageError::Key {
        reason: format!("fixture manifest: {e}"),
    })?;
    write(files::MANIFEST, &json)?;
    let _ = std::fs::remove_file(key_path);
    let key = keys::generate(key_path)?;
    sign_bundle(dir, &key)?;
    Ok(key)
}
