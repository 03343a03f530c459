//! The image manifest, its Ed25519 signature, and the checks the launcher runs before
//! every boot.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::verity::VerityGeometry;

/// File names inside an image bundle directory.
pub mod files {
    /// The guest kernel.
    pub const KERNEL: &str = "vmlinuz";
    /// The uncompressed ELF kernel (Firecracker), present when built with `--vmlinux`.
    pub const VMLINUX: &str = "vmlinux";
    /// The initramfs (cpio newc, gzip).
    pub const INITRAMFS: &str = "initramfs.cpio.gz";
    /// The erofs rootfs with its dm-verity superblock and tree appended.
    pub const ROOTFS: &str = "rootfs.img";
    /// The manifest.
    pub const MANIFEST: &str = "manifest.json";
    /// The Ed25519 signature over the manifest bytes, hex.
    pub const SIGNATURE: &str = "manifest.sig";
}

/// Current manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// What a signed image promises: hashes of what the host loads, the command line, and
/// the verity geometry the guest opens its rootfs with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version.
    pub manifest_version: u32,
    /// Image version, free text (defaults to the kernel release).
    pub version: String,
    /// RFC 3339 creation time (from `SOURCE_DATE_EPOCH` when set, for reproducibility).
    pub created: String,
    /// Kernel release the image was built from.
    pub kernel_release: String,
    /// sha256 of the kernel, hex.
    pub kernel_sha256: String,
    /// sha256 of the initramfs, hex.
    pub initramfs_sha256: String,
    /// sha256 of the ELF `vmlinux`, when the image carries one (Firecracker boots it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmlinux_sha256: Option<String>,
    /// Kernel command line the image must boot with (the launcher only appends
    /// host-specific timer and console settings).
    pub cmdline: String,
    /// Size of the rootfs file in bytes (data + superblock + tree).
    pub rootfs_size: u64,
    /// dm-verity parameters and root hash of the rootfs.
    pub verity: VerityGeometry,
    /// The agent runtime the image starts, when it is not the built-in one (signed with
    /// the rest: the launcher refuses a VM too small for it before booting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_runtime: Option<AgentRuntime>,
}

/// What the launcher must know of an image's agent runtime before it boots one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRuntime {
    /// `openclaw`, ... (as the guest reports it).
    pub name: String,
    /// Its pinned version.
    pub version: String,
    /// The least guest memory it runs in; a smaller VM is refused.
    pub min_mem_mib: u32,
    /// How long the guest may take from boot to the runtime answering: the launcher
    /// waits this long (or its own boot timeout, if longer) before failing the boot.
    pub ready_timeout_secs: u64,
}

/// Which part of an image failed a check. Each names the file, so an operator knows what
/// was tampered with.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A bundle file is missing or unreadable.
    #[error("image: cannot read {what} at {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("image: manifest {path} is malformed: {source}")]
    ManifestSyntax {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The manifest has a format this launcher does not know.
    #[error("image: manifest {path} has version {found}, this build reads {MANIFEST_VERSION}")]
    ManifestVersion { path: PathBuf, found: u32 },
    /// No signature while one is required.
    #[error("image: unsigned: {path} is missing and a signing public key is configured")]
    Unsigned { path: PathBuf },
    /// The signature file is not 64 hex-encoded bytes.
    #[error("image: signature {path} is malformed (expected 128 hex characters)")]
    SignatureSyntax { path: PathBuf },
    /// The signature does not verify over the manifest with the configured key.
    #[error(
        "image: signature mismatch: manifest.sig does not verify manifest.json with public key {pubkey} (manifest or signature was changed, or signed by another key)"
    )]
    SignatureMismatch { pubkey: String },
    /// A file's hash differs from the one the manifest records.
    #[error("image: {what} hash mismatch: {path} has sha256 {actual}, manifest says {expected}")]
    HashMismatch {
        what: &'static str,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// The rootfs is smaller than its verity geometry needs.
    #[error("image: rootfs {path} is {actual} bytes, manifest says {expected}")]
    RootfsSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// The root hash differs from the one pinned by the operator.
    #[error(
        "image: root hash mismatch: manifest has {actual}, CLAWOS_AGENT_ROOTHASH pins {expected}"
    )]
    RootHashPin { expected: String, actual: String },
    /// A public or private key is malformed.
    #[error("image: bad key: {reason}")]
    Key { reason: String },
    /// Writing a signature failed.
    #[error("image: cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// sha256 of a file, hex, streaming.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Parses a hex Ed25519 public key (64 hex characters).
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, ImageError> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ImageError::Key {
            reason: format!(
                "public key must be 64 hex characters (32 bytes), got {:?}",
                hex_key.trim()
            ),
        })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| ImageError::Key {
        reason: format!("not an Ed25519 public key: {e}"),
    })
}

/// Paths of one image's files. A bundle directory gives all of them; the operator may
/// point kernel and rootfs elsewhere (`CLAWOS_AGENT_KERNEL`, `CLAWOS_AGENT_ROOTFS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePaths {
    pub kernel: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    pub manifest: PathBuf,
    pub signature: PathBuf,
}

impl ImagePaths {
    /// The files of a bundle directory.
    pub fn bundle(dir: &Path) -> Self {
        Self {
            kernel: dir.join(files::KERNEL),
            vmlinux: dir.join(files::VMLINUX),
            initramfs: dir.join(files::INITRAMFS),
            rootfs: dir.join(files::ROOTFS),
            manifest: dir.join(files::MANIFEST),
            signature: dir.join(files::SIGNATURE),
        }
    }
}

fn read_manifest_bytes(path: &Path) -> Result<Vec<u8>, ImageError> {
    fs::read(path).map_err(|source| ImageError::Read {
        what: "manifest",
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, ImageError> {
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|source| ImageError::ManifestSyntax {
            path: path.to_owned(),
            source,
        })?;
    if manifest.manifest_version != MANIFEST_VERSION {
        return Err(ImageError::ManifestVersion {
            path: path.to_owned(),
            found: manifest.manifest_version,
        });
    }
    Ok(manifest)
}

/// Reads and parses a manifest (no signature check: for signing and inspection).
pub fn read_manifest(path: &Path) -> Result<(Manifest, Vec<u8>), ImageError> {
    let bytes = read_manifest_bytes(path)?;
    Ok((parse_manifest(path, &bytes)?, bytes))
}

/// Signs the manifest of a bundle, writing `manifest.sig`.
pub fn sign_bundle(dir: &Path, key: &SigningKey) -> Result<PathBuf, ImageError> {
    let paths = ImagePaths::bundle(dir);
    let (_, bytes) = read_manifest(&paths.manifest)?;
    let sig = key.sign(&bytes);
    let text = format!("{}\n", hex::encode(sig.to_bytes()));
    // Not writable by group or others whatever the umask (the launcher refuses that).
    fs::write(&paths.signature, text)
        .and_then(|()| {
            fs::set_permissions(
                &paths.signature,
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )
        })
        .map_err(|source| ImageError::Write {
            path: paths.signature.clone(),
            source,
        })?;
    Ok(paths.signature)
}

/// What to enforce when verifying.
#[derive(Debug, Clone, Default)]
pub struct VerifyPolicy {
    /// The trusted signing key. When set, the image must carry a valid signature.
    pub public_key: Option<VerifyingKey>,
    /// A root hash the operator pinned (`CLAWOS_AGENT_ROOTHASH`).
    pub pinned_root_hash: Option<String>,
}

/// Checks an image before boot: signature over the manifest (when a key is configured),
/// sha256 of kernel and initramfs, rootfs size, pinned root hash. Returns the manifest on
/// success; on failure the error names the part that did not match. Each file is opened
/// once without following symlinks and must be a regular file that group and others
/// cannot write ([`crate::bundle`]); any owner is accepted (this is the operator's own
/// check, `clawos image verify`; the launcher uses [`crate::bundle::verify_bundle`]).
pub fn verify(paths: &ImagePaths, policy: &VerifyPolicy) -> Result<Manifest, ImageError> {
    use crate::bundle::{Part, Trust, open_file, verify_with};
    let trust = Trust::operator();
    let open = |part: Part| {
        let path = match part {
            Part::Manifest => &paths.manifest,
            Part::Signature => &paths.signature,
            Part::Kernel => &paths.kernel,
            Part::Vmlinux => &paths.vmlinux,
            Part::Initramfs => &paths.initramfs,
            Part::Rootfs => &paths.rootfs,
        };
        open_file(None, path, part, &trust)
    };
    verify_with(&open, policy, trust.read_timeout).map(|v| v.manifest)
}

impl ImageError {
    /// What a caller of the launcher's API is told: which part failed and how, in
    /// general terms (e.g. `initramfs hash mismatch: …`, `kernel is a symbolic link`). Never a path, a size, a hash or anything read from a file, so a
    /// refusal says nothing about a file the caller could not read itself. (`Display`
    /// has the details, for the launcher's log and the operator's terminal.)
    pub fn public_message(&self) -> String {
        match self {
            Self::Read { what, source, .. } => {
                let how = match crate::bundle::unsafe_kind(source) {
                    Some(k) => k.public(),
                    None => match source.kind() {
                        io::ErrorKind::NotFound => "is missing",
                        io::ErrorKind::TimedOut => "took too long to read",
                        _ => "cannot be read",
                    },
                };
                format!("{what} {how}")
            }
            Self::ManifestSyntax { .. } => "manifest is malformed".into(),
            Self::ManifestVersion { found, .. } => format!(
                "manifest has format version {found}, this launcher reads {MANIFEST_VERSION}"
            ),
            Self::Unsigned { .. } => {
                "unsigned: manifest.sig is missing and a signing public key is configured"
                    .into()
            }
            Self::SignatureSyntax { .. } => {
                "signature manifest.sig is malformed (expected 128 hex characters)".into()
            }
            Self::SignatureMismatch { .. } => "signature mismatch: manifest.sig does not verify manifest.json with the launcher's public key (manifest or signature was changed, or signed by another key)".into(),
            Self::HashMismatch { what, .. } => {
                format!("{what} hash mismatch: it differs from the signed manifest")
            }
            Self::RootfsSize { .. } => {
                "rootfs size mismatch: it differs from the signed manifest".into()
            }
            Self::RootHashPin { .. } => "root hash mismatch: the image is not the one CLAWOS_AGENT_ROOTHASH pins".into(),
            Self::Key { .. } => "bad key".into(),
            Self::Write { .. } => "a file could not be written".into(),
        }
    }
}
