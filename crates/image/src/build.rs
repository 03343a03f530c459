//! `clawos image build`: kernel + initramfs + erofs rootfs with verity + manifest.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

use crate::cpio::{CpioWriter, Entry};
use crate::kernel::{self, KernelTree};
use crate::manifest::{MANIFEST_VERSION, Manifest, files, sha256_file};
use crate::{BuildError, verity};

/// Where the guest kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// A Debian kernel package, downloaded with `apt-get download` into the cache.
    /// `None`: whatever `linux-image-cloud-amd64` depends on today.
    Debian { package: Option<String> },
    /// An unpacked kernel tree (`boot/vmlinuz-*`, `lib/modules/*`).
    Dir(PathBuf),
}

/// Inputs of an image build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub kernel: KernelSource,
    /// Download cache: kernel packages in `kernel/`, the OpenClaw runtime's downloads in
    /// `openclaw/`.
    pub cache_dir: PathBuf,
    /// Directory holding the static guest binaries ([`GUEST_BINS`]).
    pub guest_bin_dir: PathBuf,
    /// Extra files merged over the default rootfs tree.
    pub rootfs_overlay: Option<PathBuf>,
    /// Output bundle directory (must not exist unless `force`).
    pub out: PathBuf,
    /// Replace an existing output directory.
    pub force: bool,
    /// Image version; defaults to the kernel release.
    pub version: Option<String>,
    /// Fixed timestamp for files and the manifest (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: Option<i64>,
    /// Also extract the uncompressed ELF `vmlinux` (what Firecracker boots).
    pub vmlinux: bool,
    /// A static busybox to install as `/bin/busybox` with a link per applet, so `exec`
    /// has a shell and coreutils. `None`: no shell in the guest.
    pub busybox: Option<PathBuf>,
    /// Which agent runtime the guest agent starts as the `agent` user.
    pub agent: AgentChoice,
}

/// The agent runtime an image carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentChoice {
    /// The built-in runtime ([`AGENTD_BIN`]).
    Builtin,
    /// OpenClaw's gateway on Node.js (see [`crate::openclaw`]); needs npm and apt-get at
    /// build time and 2 GiB of guest memory at run time.
    OpenClaw,
    /// None: the VM boots with no agent (exec and files only).
    None,
}

impl std::str::FromStr for AgentChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "builtin" | "clawos-agentd" => Ok(Self::Builtin),
            "openclaw" => Ok(Self::OpenClaw),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown agent runtime {other:?} (builtin, openclaw or none)"
            )),
        }
    }
}

/// Where Debian's `busybox-static` puts its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Names of the guest binaries.
pub const INIT_BIN: &str = "clawos-init";
/// The guest agent started by init.
pub const AGENT_BIN: &str = "clawos-agent";
/// The guest's syscall audit, started by the agent (crate `clawos-guest-audit`).
pub const AUDIT_BIN: &str = "clawos-audit";
/// The built-in agent runtime (crate `clawos-agentd`), started by the guest agent.
pub const AGENTD_BIN: &str = "clawos-agentd";
/// Every static binary an image build takes from the guest binary directory.
pub const GUEST_BINS: [&str; 4] = [INIT_BIN, AGENT_BIN, AUDIT_BIN, AGENTD_BIN];

const PT_INTERP: u32 = 3;

/// Refuses a guest binary that would need a dynamic loader the initramfs lacks.
fn check_static(path: &Path) -> Result<Vec<u8>, BuildError> {
    let bad = |reason: String| BuildError::GuestBinary {
        path: path.to_owned(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| {
        bad(format!(
            "{e} (build it with scripts/build-guest.sh, or point --guest-bin-dir at it)"
        ))
    })?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return Err(bad("not a 64-bit ELF executable".into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(ph) = bytes.get(at..at + 4) else {
            return Err(bad("truncated program headers".into()));
        };
        if u32::from_le_bytes(ph.try_into().unwrap_or_default()) == PT_INTERP {
            return Err(bad("dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static' (scripts/build-guest.sh)".into()));
        }
    }
    Ok(bytes)
}

/// Writes a file of the rootfs tree with its mode, making its directories.
pub(crate) fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), BuildError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| BuildError::io(parent, e))?;
    }
    fs::write(path, data).map_err(|e| BuildError::io(path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| BuildError::io(path, e))
}

/// The default rootfs: the guest agent and the few files a static binary expects.
fn populate_rootfs(
    tree: &Path,
    agent: &[u8],
    audit: &[u8],
    agentd: Option<&[u8]>,
) -> Result<(), BuildError> {
    for d in [
        "dev",
        "proc",
        "sys",
        "var",
        "workspace",
        "tmp",
        "run",
        "etc",
        "sbin",
    ] {
        let p = tree.join(d);
        fs::create_dir_all(&p).map_err(|e| BuildError::io(&p, e))?;
    }
    write_file(&tree.join("sbin").join(AGENT_BIN), agent, 0o755)?;
    write_file(&tree.join("sbin").join(AUDIT_BIN), audit, 0o755)?;
    if let Some(agentd) = agentd {
        write_file(&tree.join("sbin").join(AGENTD_BIN), agentd, 0o755)?;
    }
    // glibc's static name lookup reads these.
    write_file(
        &tree.join("etc/hosts"),
        b"127.0.0.1 localhost\n::1 localhost\n",
        0o644,
    )?;
    write_file(
        &tree.join("etc/passwd"),
        b"root:x:0:0:root:/workspace:/sbin/nologin\nagent:x:1000:1000:agent:/workspace:/sbin/nologin\n",
        0o644,
    )?;
    write_file(
        &tree.join("etc/group"),
        b"root:x:0:\nagent:x:1000:\n",
        0o644,
    )?;
    write_file(
        &tree.join("etc/os-release"),
        b"NAME=ClawOS\nID=clawos\nPRETTY_NAME=\"ClawOS agent guest\"\n",
        0o644,
    )?;
    Ok(())
}

fn install_busybox(tree: &Path, busybox: &Path) -> Result<usize, BuildError> {
    let bytes = check_static(busybox)?;
    write_file(&tree.join("bin/busybox"), &bytes, 0o755)?;
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| BuildError::Tool {
            command: format!("{} --list", busybox.display()),
            detail: e.to_string(),
        })?;
    let list = String::from_utf8_lossy(&out.stdout);
    let mut applets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|a| {
            !a.is_empty()
                && *a != "busybox"
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.[".contains(&b))
        })
        .collect();
    applets.sort_unstable();
    applets.dedup();
    for a in &applets {
        let link = tree.join("bin").join(a);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).map_err(|e| BuildError::io(&link, e))?;
        }
    }
    Ok(applets.len())
}

fn copy_overlay(overlay: &Path, tree: &Path) -> Result<(), BuildError> {
    let mut src = overlay.as_os_str().to_owned();
    src.push("/.");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(tree)
        .status()
        .map_err(|e| BuildError::io(overlay, e))?;
    if !status.success() {
        return Err(BuildError::Tool {
            command: format!("cp -a {}/. {}", overlay.display(), tree.display()),
            detail: status.to_string(),
        });
    }
    Ok(())
}

fn mkfs_erofs(tree: &Path, out: &Path, epoch: i64, compress: bool) -> Result<(), BuildError> {
    // A fixed filesystem UUID and timestamp: the same tree gives the same bytes.
    let mut cmd = Command::new("mkfs.erofs");
    if compress {
        cmd.arg("-zlz4hc");
    }
    let output = cmd
        .arg(format!("-T{epoch}"))
        .arg("-U")
        .arg("c1a0c1a0-0000-4000-8000-000000000001")
        .arg("--all-root")
        // No xattrs: whatever the staging filesystem attaches (security labels, ...)
        // must not change the image.
        .arg("-x-1")
        // mkfs.erofs also reads the build time from the environment; when it differs
        // from the file times it switches to extended inodes. Pin both.
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .arg("--quiet")
        .arg(out)
        .arg(tree)
        .output()
        .map_err(|e| BuildError::Tool {
            command: "mkfs.erofs".into(),
            detail: format!("{e} (install erofs-utils)"),
        })?;
    if !output.status.success() {
        return Err(BuildError::Tool {
            command: "mkfs.erofs".into(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    // Verity covers whole blocks.
    let len = fs::metadata(out).map_err(|e| BuildError::io(out, e))?.len();
    let padded = len.div_ceil(verity::BLOCK_SIZE) * verity::BLOCK_SIZE;
    if padded != len {
        fs::File::options()
            .write(true)
            .open(out)
            .and_then(|f| f.set_len(padded))
            .map_err(|e| BuildError::io(out, e))?;
    }
    Ok(())
}

/// Magic of the LZ4 "legacy" stream the kernel's bzImage carries its payload in.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

/// Whether `elf` is a whole 64-bit ELF: every loadable segment lies inside the file.
fn elf_is_complete(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff as usize + i * phentsize;
        match (u64_at(at + 8), u64_at(at + 32)) {
            (Some(off), Some(filesz)) => off.saturating_add(filesz) <= elf.len() as u64,
            _ => false,
        }
    })
}

/// Extracts the ELF `vmlinux` from a bzImage whose payload is LZ4-compressed (Debian's
/// cloud kernels), with the `lz4` tool.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), BuildError> {
    let data = fs::read(bzimage).map_err(|e| BuildError::io(bzimage, e))?;
    let start = data
        .windows(4)
        .position(|w| w == LZ4_LEGACY_MAGIC)
        .ok_or_else(|| BuildError::Kernel {
            reason: "no LZ4 payload in the kernel image; --vmlinux supports LZ4-compressed bzImages (Debian cloud kernels)".into(),
        })?;
    let mut child = Command::new("lz4")
        .args(["-d", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| BuildError::Tool {
            command: "lz4 -d".into(),
            detail: format!("{e} (apt-get install lz4)"),
        })?;
    let mut stdin = child.stdin.take().ok_or_else(|| BuildError::Tool {
        command: "lz4 -d".into(),
        detail: "no stdin".into(),
    })?;
    let payload = data[start..].to_vec();
    // Feed stdin from a thread while stdout is drained, or a full pipe would deadlock.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload);
    });
    let output = child
        .wait_with_output()
        .map_err(|e| BuildError::io(out, e))?;
    let _ = feeder.join();
    // lz4 exits non-zero on the bytes the bzImage appends after the stream; the
    // output is accepted only if it is a whole ELF.
    if !elf_is_complete(&output.stdout) {
        return Err(BuildError::Kernel {
            reason: "LZ4 payload of the kernel did not decompress to a complete ELF vmlinux".into(),
        });
    }
    fs::write(out, &output.stdout).map_err(|e| BuildError::io(out, e))
}

/// Salt and verity UUID derived from the data, so a rebuild of the same tree gives the
/// same root hash, while different images never share a salt.
fn derive_salt_uuid(data: &Path) -> Result<([u8; 32], [u8; 16]), BuildError> {
    let digest = sha256_file(data).map_err(|e| BuildError::io(data, e))?;
    let salt: [u8; 32] = Sha256::new()
        .chain_update(b"clawos verity salt\0")
        .chain_update(digest.as_bytes())
        .finalize()
        .into();
    let h: [u8; 32] = Sha256::new()
        .chain_update(b"clawos verity uuid\0")
        .chain_update(salt)
        .finalize()
        .into();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&h[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok((salt, uuid))
}

/// Builds the initramfs: `/init` plus the modules, and `/lib/modules/load-order`.
fn build_initramfs(init: &[u8], modules: &[PathBuf], out: &Path) -> Result<(), BuildError> {
    let file = fs::File::create(out).map_err(|e| BuildError::io(out, e))?;
    // mtime 0 in the gzip header, for reproducible output.
    let gz = GzBuilder::new()
        .mtime(0)
        .write(file, Compression::default());
    let mut w = CpioWriter::new(gz);
    let io = |e| BuildError::io(out, e);
    for path in ["dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        w.add(&Entry::Dir { path, mode: 0o755 }).map_err(io)?;
    }
    // The kernel opens /dev/console for init before any devtmpfs exists.
    w.add(&Entry::CharDev {
        path: "dev/console",
        mode: 0o600,
        major: 5,
        minor: 1,
    })
    .map_err(io)?;
    w.add(&Entry::File {
        path: "init",
        mode: 0o755,
        data: init,
    })
    .map_err(io)?;
    let mut order = String::new();
    for m in modules {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let data = fs::read(m).map_err(|e| BuildError::io(m, e))?;
        let path = format!("lib/modules/{name}");
        w.add(&Entry::File {
            path: &path,
            mode: 0o644,
            data: &data,
        })
        .map_err(io)?;
        order.push_str(&name);
        order.push('\n');
    }
    w.add(&Entry::File {
        path: "lib/modules/load-order",
        mode: 0o644,
        data: order.as_bytes(),
    })
    .map_err(io)?;
    let gz = w.finish().map_err(io)?;
    let mut file = gz.finish().map_err(io)?;
    file.flush().map_err(io)?;
    file.sync_all().map_err(io)
}

fn format_time(epoch: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(epoch)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| epoch.to_string())
}

/// Kernel command line for an image: the verity parameters init needs.
pub fn image_cmdline(v: &verity::VerityGeometry) -> String {
    format!(
        "panic=-1 reboot=t quiet clawos.root_hash={} clawos.salt={} clawos.data_blocks={} clawos.hash_start={}",
        v.root_hash, v.salt, v.data_blocks, v.hash_start_block
    )
}

/// The runtime the guest starts is the one the signed manifest names (the launcher
/// sizes and drives the VM by it): a rootfs overlay cannot bring its own descriptor.
fn check_overlay(opts: &BuildOptions) -> Result<(), BuildError> {
    let descriptor = clawos_guest_protocol::runtime::DESCRIPTOR_PATH.trim_start_matches('/');
    match &opts.rootfs_overlay {
        Some(overlay) if overlay.join(descriptor).exists() => Err(BuildError::Runtime {
            reason: format!(
                "the rootfs overlay {} carries {descriptor}: the agent runtime is chosen with --agent, and named in the signed manifest",
                overlay.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// Builds an image bundle into `opts.out`, reporting each step through `progress`.
/// The bundle appears whole or not at all: it is built beside the target and renamed.
pub fn build(opts: &BuildOptions, progress: &mut dyn FnMut(&str)) -> Result<Manifest, BuildError> {
    check_overlay(opts)?;
    if opts.out.exists() && !opts.force {
        return Err(BuildError::Output {
            path: opts.out.clone(),
            reason: "already exists (pass --force to replace it)".into(),
        });
    }
    let parent = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| BuildError::io(parent, e))?;
    let staging = parent.join(format!(
        ".{}.building-{}",
        opts.out
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("image"),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| BuildError::io(&staging, e))?;
    let result = build_into(opts, &staging, progress).and_then(|m| {
        // Whatever the umask: the launcher refuses a bundle file that group or others
        // could write.
        use std::os::unix::fs::PermissionsExt;
        for e in fs::read_dir(&staging).map_err(|e| BuildError::io(&staging, e))? {
            let p = e.map_err(|e| BuildError::io(&staging, e))?.path();
            if p.is_file() {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                    .map_err(|e| BuildError::io(&p, e))?;
            }
        }
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))
            .map_err(|e| BuildError::io(&staging, e))?;
        Ok(m)
    });
    match result {
        Ok(m) => {
            if opts.out.exists() {
                fs::remove_dir_all(&opts.out).map_err(|e| BuildError::io(&opts.out, e))?;
            }
            fs::rename(&staging, &opts.out).map_err(|e| BuildError::io(&opts.out, e))?;
            Ok(m)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn build_into(
    opts: &BuildOptions,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, BuildError> {
    let epoch = opts.source_date_epoch.unwrap_or(0);
    let init = check_static(&opts.guest_bin_dir.join(INIT_BIN))?;
    let agent = check_static(&opts.guest_bin_dir.join(AGENT_BIN))?;
    let audit = check_static(&opts.guest_bin_dir.join(AUDIT_BIN))?;
    let agentd = match opts.agent {
        AgentChoice::Builtin => Some(check_static(&opts.guest_bin_dir.join(AGENTD_BIN))?),
        AgentChoice::OpenClaw | AgentChoice::None => None,
    };

    let tree: KernelTree = match &opts.kernel {
        KernelSource::Dir(dir) => {
            progress(&format!("kernel: using {}", dir.display()));
            kernel::from_dir(dir)?
        }
        KernelSource::Debian { package } => {
            let package = match package {
                Some(p) => p.clone(),
                None => kernel::resolve_debian_package(kernel::DEBIAN_CLOUD_META)?,
            };
            progress(&format!("kernel: fetching Debian package {package}"));
            kernel::fetch_debian(&package, &opts.cache_dir.join("kernel"))?
        }
    };

    progress("rootfs: assembling tree");
    let rootfs_tree = out.join("rootfs.tree");
    populate_rootfs(&rootfs_tree, &agent, &audit, agentd.as_deref())?;
    if let Some(bb) = &opts.busybox {
        let n = install_busybox(&rootfs_tree, bb)?;
        progress(&format!("rootfs: busybox with {n} applets"));
    }
    let agent_runtime = match opts.agent {
        AgentChoice::OpenClaw => {
            crate::openclaw::install(&rootfs_tree, &opts.cache_dir.join("openclaw"), progress)?;
            Some(crate::openclaw::manifest_runtime())
        }
        AgentChoice::Builtin | AgentChoice::None => None,
    };
    if let Some(overlay) = &opts.rootfs_overlay {
        copy_overlay(overlay, &rootfs_tree)?;
    }
    let rootfs = out.join(files::ROOTFS);
    // A large tree (OpenClaw's 650 MiB of JavaScript) is compressed: lz4hc, which the
    // guest kernel reads fast. The small default tree is left as it is.
    let compress = agent_runtime.is_some();
    progress(if compress {
        "rootfs: mkfs.erofs (lz4hc; about a minute for OpenClaw)"
    } else {
        "rootfs: mkfs.erofs"
    });
    mkfs_erofs(&rootfs_tree, &rootfs, epoch, compress)?;
    fs::remove_dir_all(&rootfs_tree).map_err(|e| BuildError::io(&rootfs_tree, e))?;

    progress("rootfs: computing dm-verity hash tree");
    let (salt, uuid) = derive_salt_uuid(&rootfs)?;
    let geometry = verity::format(&rootfs, None, &salt, &uuid)?;
    let rootfs_size = fs::metadata(&rootfs)
        .map_err(|e| BuildError::io(&rootfs, e))?
        .len();

    progress("initramfs: resolving modules");
    let modules = kernel::resolve_modules(&tree, kernel::GUEST_MODULES)?;
    progress(&format!(
        "initramfs: packing clawos-init and {} modules",
        modules.len()
    ));
    let initramfs = out.join(files::INITRAMFS);
    build_initramfs(&init, &modules, &initramfs)?;

    let kernel_path = out.join(files::KERNEL);
    fs::copy(&tree.image, &kernel_path).map_err(|e| BuildError::io(&kernel_path, e))?;
    let vmlinux_sha256 = if opts.vmlinux {
        progress("kernel: extracting ELF vmlinux (for Firecracker)");
        let p = out.join(files::VMLINUX);
        extract_vmlinux(&kernel_path, &p)?;
        Some(sha256_file(&p).map_err(|e| BuildError::io(&p, e))?)
    } else {
        None
    };

    progress("manifest: hashing kernel and initramfs");
    let created = match opts.source_date_epoch {
        Some(e) => e,
        None => time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        version: opts.version.clone().unwrap_or_else(|| tree.release.clone()),
        created: format_time(created),
        kernel_release: tree.release.clone(),
        kernel_sha256: sha256_file(&kernel_path).map_err(|e| BuildError::io(&kernel_path, e))?,
        initramfs_sha256: sha256_file(&initramfs).map_err(|e| BuildError::io(&initramfs, e))?,
        vmlinux_sha256,
        cmdline: image_cmdline(&geometry),
        rootfs_size,
        verity: geometry,
        agent_runtime,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| BuildError::Output {
        path: out.to_owned(),
        reason: e.to_string(),
    })?;
    json.push(b'\n');
    let manifest_path = out.join(files::MANIFEST);
    fs::write(&manifest_path, json).map_err(|e| BuildError::io(&manifest_path, e))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_cannot_bring_its_own_runtime_descriptor() {
        let d = tempfile::tempdir().expect("tmp");
        let overlay = d.path().join("overlay");
        std::fs::create_dir_all(overlay.join("etc/clawos")).expect("mkdir");
        std::fs::write(overlay.join("etc/clawos/runtime.json"), "{}").expect("write");
        let opts = BuildOptions {
            kernel: KernelSource::Dir(d.path().join("no-kernel")),
            cache_dir: d.path().join("cache"),
            guest_bin_dir: d.path().join("no-bins"),
            rootfs_overlay: Some(overlay),
            out: d.path().join("out"),
            force: false,
            version: None,
            source_date_epoch: None,
            vmlinux: false,
            busybox: None,
            agent: AgentChoice::Builtin,
        };
        let e = build(&opts, &mut |_| {}).expect_err("refused");
        assert!(e.to_string().contains("etc/clawos/runtime.json"), "{e}");
        assert!(!d.path().join("out").exists(), "nothing was built");
    }

    #[test]
    fn truncated_elf_is_incomplete() {
        // Minimal ELF64 header with one program header at 64 claiming 100 bytes at 0.
        let mut elf = vec![0u8; 120];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        elf[64 + 32..64 + 40].copy_from_slice(&100u64.to_le_bytes());
        assert!(elf_is_complete(&elf));
        elf[64 + 32..64 + 40].copy_from_slice(&500u64.to_le_bytes());
        assert!(!elf_is_complete(&elf));
        assert!(!elf_is_complete(b"not an elf"));
    }
}
