//! Which image a VM boots, and what the hypervisor is handed.
//!
//! Images are chosen by **name** only (`StartVm.image`, the rules of a VM name), never
//! by a path an API caller names: `default` is the launcher's configured image
//! directory (`--image` / `CLAWOS_IMAGE_DIR`, with the `CLAWOS_AGENT_KERNEL` and
//! `CLAWOS_AGENT_ROOTFS` overrides) when one is configured, else
//! `<state>/images/default`; any other name is `<state>/images/<name>`, registered by
//! the operator with `clawos image add NAME DIR` and entered without following a
//! symlink. Every directory and file must belong to root or the launcher's user and be
//! writable by nobody else.
//!
//! Verification opens each file once ([`clawos_image::bundle`]) and hashes that
//! descriptor; the boot then copies the kernel and initramfs from the same descriptors
//! into the VM's `boot/` directory (0700), hashing them again as they are copied, and
//! hands the rootfs descriptor itself to the backend. Nothing opens an image path twice.
//!
//! Reading runs on a thread of its own with a deadline: a file on a hung filesystem
//! can neither stall the runtime nor keep a shutdown waiting (the thread is abandoned).
//! An API caller is told which part failed and why in general terms
//! ([`clawos_image::ImageError::public_message`]); paths, sizes and hashes go to the
//! launcher's log only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_image::bundle::{BundleDir, BundleSource, OpenFile, Trust, VerifiedBundle};
use clawos_image::store::{DEFAULT_IMAGE, check_name, images_dir};
use clawos_image::{ImageError, Manifest, VerifyPolicy, files};
use clawos_vm_launcher_api::{ImageInfo, VerifiedImage};

use super::Launcher;
use crate::LauncherError;
use crate::store::VmDir;

/// Longest a verification or a boot copy may take before the request is answered
/// without it (the reads themselves stop at [`Trust::launcher`]'s deadline).
const OFF_RUNTIME_LIMIT: Duration = Duration::from_secs(90);

/// The image name a start asks for (`default` when none), checked.
pub(super) fn parse_name(image: Option<&str>) -> Result<String, LauncherError> {
    let name = image.unwrap_or(DEFAULT_IMAGE);
    check_name(name).map_err(LauncherError::Invalid)?;
    Ok(name.to_owned())
}

/// A verified image, its files still open.
#[derive(Debug)]
pub(super) struct Verified {
    pub name: String,
    pub bundle: VerifiedBundle,
}

impl Verified {
    pub fn manifest(&self) -> &Manifest {
        &self.bundle.manifest
    }
}

/// What one boot hands the backend: verified copies in the VM's `boot/` directory and
/// the rootfs's checked descriptor.
#[derive(Debug, Clone)]
pub(super) struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmlinux: Option<PathBuf>,
    pub rootfs_path: PathBuf,
    pub rootfs: Arc<std::fs::File>,
    pub manifest: Manifest,
}

/// Runs `f` on a thread of its own and waits at most `limit` for it. A shutdown does
/// not wait for that thread (unlike a blocking task of the runtime).
async fn off_runtime<T: Send + 'static>(
    what: &'static str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LauncherError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("clawos-{what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| LauncherError::Internal(format!("{what} thread: {e}")))?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(LauncherError::Internal(format!("{what} thread ended"))),
        Err(_) => Err(LauncherError::ImageRefused {
            code: clawos_api::code::IMAGE_INVALID,
            message: format!("{what} did not finish within {}s", limit.as_secs()),
        }),
    }
}

impl Launcher {
    /// Where image `name` comes from.
    fn image_source(&self, name: &str) -> Result<BundleSource, ImageError> {
        let cfg = &self.shared.cfg;
        let trust = Trust::launcher();
        if name == DEFAULT_IMAGE
            && let Some(dir) = &cfg.image_dir
        {
            return Ok(BundleSource {
                dir: BundleDir::open(dir, &trust)?,
                kernel: cfg.kernel_override.clone(),
                rootfs: cfg.rootfs_override.clone(),
            });
        }
        let store = images_dir(&cfg.state_dir);
        let store_dir = BundleDir::open(&store, &trust)?;
        BundleDir::open_entry(&store_dir.dir, &store, name, &trust).map(BundleSource::dir)
    }

    /// Opens and verifies image `name`: the signature, the kernel's, initramfs's and
    /// vmlinux's hashes through their descriptors, the rootfs's size, the pinned root
    /// hash. A refusal is counted and logged in full; the caller is told only which
    /// part failed.
    pub(super) async fn verify_image(&self, name: &str) -> Result<Verified, LauncherError> {
        self.verify_image_for(name, true).await
    }

    /// [`Self::verify_image`]; a refusal is counted in the metrics and logged as a
    /// warning only when `boot` (a listing that finds a broken image is not an
    /// attempt to boot it, and must not raise alerts each time it is asked).
    async fn verify_image_for(&self, name: &str, boot: bool) -> Result<Verified, LauncherError> {
        let policy = VerifyPolicy {
            public_key: self.shared.cfg.public_key,
            pinned_root_hash: self.shared.cfg.pinned_root_hash.clone(),
        };
        let source = self.image_source(name);
        let started = Instant::now();
        let result = off_runtime("image verification", OFF_RUNTIME_LIMIT, move || {
            clawos_image::bundle::verify_bundle(&source?, &policy)
        })
        .await;
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                if boot {
                    self.shared.metrics.images_refused.inc();
                    tracing::warn!(image = name, error = %e, "image refused");
                }
                return Err(e);
            }
        };
        match result {
            Ok(bundle) => {
                tracing::debug!(
                    image = name,
                    ms = started.elapsed().as_millis() as u64,
                    "image verified"
                );
                Ok(Verified {
                    name: name.to_owned(),
                    bundle,
                })
            }
            Err(e) if boot => Err(self.refused(name, &e)),
            Err(e) => {
                tracing::debug!(image = name, error = %e, "image does not verify (listing)");
                Err(refusal(name, &e))
            }
        }
    }

    /// Every image a VM may boot — `default` when configured or registered, and each
    /// registered name — verified now, refused ones with why.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, LauncherError> {
        let cfg = &self.shared.cfg;
        let store = images_dir(&cfg.state_dir);
        let listed = off_runtime("image listing", OFF_RUNTIME_LIMIT, move || {
            std::fs::read_dir(store).map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    // Leftovers of an interrupted `image add` are not images.
                    .filter(|n| check_name(n).is_ok())
                    .collect::<Vec<String>>()
            })
        })
        .await
        .map_err(|e| LauncherError::Internal(format!("image store listing: {e}")))?;
        let mut names = match listed {
            Ok(names) => names,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(LauncherError::Internal(format!("image store: {e}")));
            }
        };
        if cfg.image_dir.is_some() && !names.iter().any(|n| n == DEFAULT_IMAGE) {
            names.push(DEFAULT_IMAGE.to_owned());
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(match self.describe(&name, false).await {
                Ok(info) => info,
                Err(e) => ImageInfo {
                    name,
                    verified: None,
                    refused: Some(e.to_string()),
                },
            });
        }
        Ok(out)
    }

    /// Verifies image `name` as a boot would (a refusal counted and logged as one),
    /// and answers what it verified.
    pub async fn check_image(&self, name: &str) -> Result<ImageInfo, LauncherError> {
        self.describe(name, true).await
    }

    async fn describe(&self, name: &str, boot: bool) -> Result<ImageInfo, LauncherError> {
        check_name(name).map_err(LauncherError::Invalid)?;
        let v = self.verify_image_for(name, boot).await?;
        let m = v.manifest();
        Ok(ImageInfo {
            name: v.name.clone(),
            verified: Some(VerifiedImage {
                version: m.version.clone(),
                created: m.created.clone(),
                kernel_release: m.kernel_release.clone(),
                root_hash: m.verity.root_hash.clone(),
                rootfs_size: m.rootfs_size,
                agent_runtime: m
                    .agent_runtime
                    .as_ref()
                    .map(|r| format!("{} {}", r.name, r.version)),
                signature_checked: self.shared.cfg.public_key.is_some(),
            }),
            refused: None,
        })
    }

    /// The API error for an image that failed verification, logged with its details.
    fn refused(&self, name: &str, e: &ImageError) -> LauncherError {
        let answer = refusal(name, e);
        if matches!(answer, LauncherError::NotFound(_)) {
            tracing::warn!(image = name, error = %e, "no such image");
        } else {
            self.shared.metrics.images_refused.inc();
            // The details (paths, owners, sizes, hashes) are for the operator's log only.
            tracing::warn!(image = name, error = %e, "image refused");
        }
        answer
    }

    /// Copies the verified kernel, initramfs (and vmlinux) into the VM's `boot/`
    /// directory from the descriptors that were hashed, hashing them again as they are
    /// copied, and keeps the rootfs's descriptor for the backend.
    pub(super) async fn stage_boot(
        &self,
        dir: &VmDir,
        image: Verified,
    ) -> Result<BootFiles, LauncherError> {
        let boot = dir.boot();
        let name = image.name.clone();
        let started = Instant::now();
        let staged = off_runtime("boot copy", OFF_RUNTIME_LIMIT, move || {
            stage(&boot, image.bundle)
        })
        .await?;
        match staged {
            Ok(files) => {
                tracing::debug!(image = %name, ms = started.elapsed().as_millis() as u64, "boot files staged");
                Ok(files)
            }
            Err(e) => Err(self.refused(&name, &e)),
        }
    }
}

/// The API error for image `name` that failed verification with `e`: 404 when there
/// is no such image, else the refusal in general terms.
fn refusal(name: &str, e: &ImageError) -> LauncherError {
    if let ImageError::Read {
        what: "image directory",
        source,
        ..
    } = e
        && source.kind() == std::io::ErrorKind::NotFound
    {
        let hint = if name == DEFAULT_IMAGE {
            "configure one (--image / CLAWOS_IMAGE_DIR) or register one with `clawos image add default DIR`"
        } else {
            "register one with `clawos image add NAME DIR`"
        };
        return LauncherError::NotFound(format!("no image named {name}: {hint}"));
    }
    LauncherError::ImageRefused {
        code: crate::image_code(e),
        message: format!("image {name} refused: {}", e.public_message()),
    }
}

/// The copies, made from the verified descriptors (0644 in a 0700 directory inside the
/// 0700 VM directory: readable by a jailed hypervisor's hard link, reachable by no one
/// else).
fn stage(boot: &std::path::Path, b: VerifiedBundle) -> Result<BootFiles, ImageError> {
    let werr = |source| ImageError::Write {
        path: boot.to_owned(),
        source,
    };
    let _ = std::fs::remove_dir_all(boot);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(boot)
            .map_err(werr)?;
    }
    let d = std::fs::File::open(boot).map_err(werr)?;
    let deadline = Instant::now() + Trust::launcher().read_timeout;
    let copy = |f: &OpenFile, name: &str, expected: &str| {
        f.copy_into(&d, boot, name, 0o644, Some(expected), deadline)
            .map(|_| boot.join(name))
    };
    let m = &b.manifest;
    let kernel = copy(&b.kernel, files::KERNEL, &m.kernel_sha256)?;
    let initramfs = copy(&b.initramfs, files::INITRAMFS, &m.initramfs_sha256)?;
    let vmlinux = match (&b.vmlinux, &m.vmlinux_sha256) {
        (Some(v), Some(h)) => Some(copy(v, files::VMLINUX, h)?),
        _ => None,
    };
    Ok(BootFiles {
        kernel,
        initramfs,
        vmlinux,
        rootfs_path: b.rootfs.path,
        rootfs: Arc::new(b.rootfs.file),
        manifest: b.manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_only() {
        assert_eq!(parse_name(None).expect("default"), "default");
        assert_eq!(parse_name(Some("agent-2")).expect("name"), "agent-2");
        for bad in ["/tmp/evil", "../images/x", "relative/dir", "Evil", ""] {
            let e = parse_name(Some(bad)).expect_err(bad).to_string();
            assert!(e.contains("invalid image name"), "{e}");
        }
    }
}
