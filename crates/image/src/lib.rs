//! ClawOS agent images.
//!
//! An image bundle is a directory holding the guest kernel, an initramfs with
//! `clawos-init` and the modules it loads, an erofs rootfs with a dm-verity tree that
//! this crate computes, `manifest.json` recording hashes, command line and verity
//! geometry, and `manifest.sig`, an Ed25519 signature over the manifest. The launcher
//! checks the signature and hashes before every boot; the guest checks every rootfs
//! block it reads against the signed root hash.

pub mod build;
pub mod bundle;
pub mod cpio;
pub mod fixture;
pub mod kernel;
pub mod keys;
pub mod manifest;
pub mod openclaw;
pub mod store;
pub mod verity;

use std::io;
use std::path::{Path, PathBuf};

pub use build::{AgentChoice, BuildOptions, KernelSource, build};
pub use bundle::{BundleDir, BundleSource, Part, Trust, VerifiedBundle, verify_bundle};
pub use manifest::{AgentRuntime, ImageError, ImagePaths, Manifest, VerifyPolicy, files, verify};

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading or writing a file failed.
    #[error("image build: {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An external tool failed (apt-get, dpkg, mkfs.erofs).
    #[error("image build: `{command}` failed: {detail}")]
    Tool { command: String, detail: String },
    /// The kernel or its modules are not usable.
    #[error("image build: kernel: {reason}")]
    Kernel { reason: String },
    /// A guest binary is missing or not static.
    #[error("image build: guest binary {path}: {reason}")]
    GuestBinary { path: PathBuf, reason: String },
    /// Building the verity tree failed.
    #[error(transparent)]
    Verity(#[from] verity::VerityError),
    /// The agent runtime could not be put into the image (OpenClaw: a download, an
    /// integrity or version check).
    #[error("image build: agent runtime: {reason}")]
    Runtime { reason: String },
    /// The output directory is not usable.
    #[error("image build: output {path}: {reason}")]
    Output { path: PathBuf, reason: String },
}

impl BuildError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Runs a build tool (apt-get, dpkg, npm, tar, ...) and returns its stdout; a failure
/// names the command and ends with the last lines of its stderr (where npm and apt put
/// their reason).
pub(crate) fn run_tool(cmd: &mut std::process::Command) -> Result<String, BuildError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| BuildError::Tool {
        command: shown.clone(),
        detail: source.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(BuildError::Tool {
            command: shown,
            detail: format!("{}: {}", out.status, tail.trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
