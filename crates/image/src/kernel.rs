//! The guest kernel: Debian's cloud kernel package (downloaded, unpacked, never
//! installed) or a kernel tree the user names, and the modules the guest must load.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BuildError;

/// Debian's meta package that always depends on the current cloud kernel.
pub const DEBIAN_CLOUD_META: &str = "linux-image-cloud-amd64";

/// Modules `clawos-init` loads, by module name; their dependencies are added
/// automatically, from each module's own `.modinfo`.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    // The `pc` machine (snapshot-capable VMs) puts its devices on PCI.
    "virtio_pci",
    "virtio_blk",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "dm_verity",
    "erofs",
    // ACPI power button (QEMU `system_powerdown`) and the evdev node init reads it from.
    "button",
    "evdev",
    "pvpanic_mmio",
];

/// A kernel image plus the modules directory matching it.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// `vmlinuz`.
    pub image: PathBuf,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
    /// Kernel release string, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

/// Which package the meta package currently points at.
pub fn resolve_debian_package(meta: &str) -> Result<String, BuildError> {
    let out = crate::run_tool(Command::new("apt-cache").args(["depends", meta]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|s| s.trim().to_owned())
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| BuildError::Kernel {
            reason: format!(
                "apt-cache depends {meta} names no linux-image package (run apt-get update?)"
            ),
        })
}

/// Downloads (once) and unpacks a Debian kernel package into `cache`.
pub fn fetch_debian(package: &str, cache: &Path) -> Result<KernelTree, BuildError> {
    if !package
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.+".contains(c))
    {
        return Err(BuildError::Kernel {
            reason: format!("{package:?} is not a Debian package name"),
        });
    }
    let unpacked = cache.join(package);
    if !unpacked.join("boot").is_dir() {
        fs::create_dir_all(cache).map_err(|e| BuildError::io(cache, e))?;
        // Per-process scratch names: concurrent builds may fetch the same package.
        let pid = std::process::id();
        let dl = cache.join(format!("{package}.download-{pid}"));
        let tmp = cache.join(format!("{package}.unpack-{pid}"));
        let result = (|| {
            fs::create_dir_all(&dl).map_err(|e| BuildError::io(&dl, e))?;
            crate::run_tool(
                Command::new("apt-get")
                    .args(["download", "-q", package])
                    .current_dir(&dl),
            )?;
            let deb = fs::read_dir(&dl)
                .map_err(|e| BuildError::io(&dl, e))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .ok_or_else(|| BuildError::Kernel {
                    reason: format!("apt-get download {package} produced no .deb"),
                })?;
            crate::run_tool(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
            match fs::rename(&tmp, &unpacked) {
                Ok(()) => Ok(()),
                // Another build unpacked it first.
                Err(_) if unpacked.join("boot").is_dir() => Ok(()),
                Err(e) => Err(BuildError::io(&unpacked, e)),
            }
        })();
        let _ = fs::remove_dir_all(&dl);
        let _ = fs::remove_dir_all(&tmp);
        result?;
    }
    from_dir(&unpacked)
}

/// A kernel tree laid out like an unpacked kernel package: `boot/vmlinuz-<release>` and
/// `lib/modules/<release>/`.
pub fn from_dir(dir: &Path) -> Result<KernelTree, BuildError> {
    let boot = dir.join("boot");
    let entries = fs::read_dir(&boot).map_err(|e| BuildError::io(&boot, e))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    images.sort();
    let image = match images.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(BuildError::Kernel {
                reason: format!("no boot/vmlinuz-* in {}", dir.display()),
            });
        }
        _ => {
            return Err(BuildError::Kernel {
                reason: format!(
                    "several kernels in {}: name one tree per release",
                    boot.display()
                ),
            });
        }
    };
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let modules_dir = dir.join("lib/modules").join(&release);
    if !modules_dir.is_dir() {
        return Err(BuildError::Kernel {
            reason: format!(
                "kernel {release} has no modules directory {}",
                modules_dir.display()
            ),
        });
    }
    Ok(KernelTree {
        image,
        modules_dir,
        release,
    })
}

fn module_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.strip_suffix(".ko")?;
    Some(name.replace('-', "_"))
}

/// `depends=` of a module, read from its `.modinfo` strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(KEY))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// The module files to load for `wanted`, dependencies first. A module that is built
/// into the kernel (no `.ko`, but named in `modules.builtin`) is skipped.
pub fn resolve_modules(tree: &KernelTree, wanted: &[&str]) -> Result<Vec<PathBuf>, BuildError> {
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![tree.modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(|e| BuildError::io(&dir, e))? {
            let p = e.map_err(|e| BuildError::io(&dir, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = module_name(&p) {
                index.insert(n, p);
            }
        }
    }
    let builtin: HashSet<String> = fs::read_to_string(tree.modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();

    let mut order = Vec::new();
    let mut done = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<(), BuildError> {
        if done.contains(name) || builtin.contains(name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(BuildError::Kernel {
                reason: format!("module dependency cycle at {name}"),
            });
        }
        let path = index.get(name).ok_or_else(|| BuildError::Kernel {
            reason: format!("module {name} is neither a .ko in this kernel nor built in"),
        })?;
        let bytes = fs::read(path).map_err(|e| BuildError::io(path, e))?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, builtin, done, order, depth + 1)?;
        }
        done.insert(name.to_owned());
        order.push(path.clone());
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &builtin, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_is_read_from_modinfo_strings() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio,virtio_ring,dm-mod\0name=x\0";
        assert_eq!(module_depends(ko), vec!["virtio", "virtio_ring", "dm_mod"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }
}
