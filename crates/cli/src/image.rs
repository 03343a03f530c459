//! `clawos keygen` and `clawos image build|sign|verify|add`: signing keys and image
//! bundles, and registering a bundle in the launcher's image store.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand};
use clawos_image::{ImagePaths, KernelSource, VerifyPolicy, keys, manifest};

use crate::exit::Exit;
use crate::output::print_json;
use crate::{own_state_dir, state_dir};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build an image bundle: kernel, initramfs, erofs rootfs + dm-verity, manifest.
    Build(BuildArgs),
    /// Sign a bundle's manifest with an Ed25519 key.
    Sign {
        /// Bundle directory.
        dir: PathBuf,
        /// Private key [default: $CLAWOS_STATE_DIR/signing.key].
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Verify a bundle and copy it into the launcher's image store as NAME
    /// ($CLAWOS_STATE_DIR/images/NAME: directories 0700, files 0644, owned by the store's
    /// owner). VMs boot it with `clawos vm start VM --image NAME`; the launcher never
    /// boots a path an API caller names. Run it as the launcher's user (or root).
    Add {
        /// Image name: [a-z0-9-], 1-63 characters (like a VM name).
        name: String,
        /// Bundle directory to verify and copy.
        dir: PathBuf,
        /// Trusted public key, hex. Without one only the hashes are checked here; the
        /// launcher checks the signature again before every boot.
        #[arg(long, env = "CLAWOS_SIGNING_PUBKEY")]
        pubkey: Option<String>,
        /// Replace an existing image of that name (atomically; running VMs keep theirs).
        #[arg(long)]
        force: bool,
    },
    /// Verify a bundle directory here as the launcher does before boot, or (--name) ask
    /// the launcher to verify one of its images with its own key.
    Verify {
        /// Bundle directory.
        #[arg(required_unless_present = "name", conflicts_with = "name")]
        dir: Option<PathBuf>,
        /// A registered image, verified by the launcher (also through --server).
        #[arg(long)]
        name: Option<String>,
        /// Trusted public key, hex (for a bundle directory).
        #[arg(long, env = "CLAWOS_SIGNING_PUBKEY")]
        pubkey: Option<String>,
    },
    /// The images VMs may boot, each verified by the launcher now (also through
    /// --server).
    List,
}

impl ImageCmd {
    /// Whether the command asks the launcher (and so works through --server) rather
    /// than working on this machine's files.
    pub fn asks_launcher(&self) -> bool {
        matches!(self, Self::List | Self::Verify { name: Some(_), .. })
    }
}

/// `image list` and `image verify --name`: the launcher's (or a control plane's) view.
pub async fn run_launcher(
    cmd: ImageCmd,
    client: &clawos_vm_launcher_api::LauncherClient,
    json: bool,
) -> Result<u8, Exit> {
    match cmd {
        ImageCmd::List => {
            let images = client.images().await?;
            if json {
                print_json(&images).map_err(|e| Exit(1, e))?;
                return Ok(0);
            }
            println!(
                "{:<20} {:<9} {:<24} {:<16} ROOT HASH",
                "NAME", "VERIFIED", "VERSION", "RUNTIME"
            );
            for i in &images {
                match &i.verified {
                    Some(v) => println!(
                        "{:<20} {:<9} {:<24} {:<16} {}",
                        i.name,
                        if v.signature_checked {
                            "signed"
                        } else {
                            "unsigned"
                        },
                        v.version,
                        v.agent_runtime.as_deref().unwrap_or("builtin"),
                        v.root_hash
                    ),
                    None => println!(
                        "{:<20} {:<9} {}",
                        i.name,
                        "REFUSED",
                        i.refused.as_deref().unwrap_or("-")
                    ),
                }
            }
            Ok(0)
        }
        ImageCmd::Verify {
            name: Some(name), ..
        } => {
            let info = client.verify_image(&name).await?;
            if json {
                print_json(&info).map_err(|e| Exit(1, e))?;
            } else if let Some(v) = &info.verified {
                println!(
                    "ok: image {name} verified by the launcher ({}; root hash {})",
                    if v.signature_checked {
                        "signature and hashes match"
                    } else {
                        "hashes match; the launcher checks no signatures (--allow-unsigned)"
                    },
                    v.root_hash
                );
            }
            Ok(0)
        }
        _ => Err(Exit(
            2,
            anyhow!("this image command works on this machine's files, not the launcher's"),
        )),
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Output bundle directory [default: $CLAWOS_STATE_DIR/images/default, or
    /// images/openclaw with --agent openclaw].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Debian kernel package to fetch [default: what linux-image-cloud-amd64 depends on].
    #[arg(long, conflicts_with = "kernel_dir")]
    kernel_package: Option<String>,
    /// Use an unpacked kernel tree (boot/vmlinuz-*, lib/modules/*) instead of Debian's.
    #[arg(long)]
    kernel_dir: Option<PathBuf>,
    /// Directory with the static clawos-init, clawos-agent, clawos-audit and clawos-agentd [default: next to this binary].
    #[arg(long, env = "CLAWOS_GUEST_BIN_DIR")]
    guest_bin_dir: Option<PathBuf>,
    /// Files to merge over the default rootfs tree.
    #[arg(long)]
    rootfs_overlay: Option<PathBuf>,
    /// Image version [default: kernel release].
    #[arg(long)]
    version: Option<String>,
    /// Replace an existing bundle.
    #[arg(long)]
    force: bool,
    /// Also extract the ELF vmlinux, which the Firecracker backend boots.
    #[arg(long)]
    vmlinux: bool,
    /// Static busybox installed as the guest's shell and coreutils.
    #[arg(long, default_value = clawos_image::build::DEFAULT_BUSYBOX, conflicts_with = "no_busybox")]
    busybox: PathBuf,
    /// Build a guest without a shell.
    #[arg(long)]
    no_busybox: bool,
    /// The agent runtime the VM runs: `builtin` (clawos-agentd), `openclaw` (OpenClaw's
    /// gateway 2026.9.6 on Node 24: downloads about 250 MB once through npm and apt-get,
    /// cached under $CLAWOS_STATE_DIR/cache/openclaw; its VMs need --mem 2048 or more) or
    /// `none` (exec and files only).
    #[arg(long, default_value = "builtin", value_parser = parse_agent)]
    agent: clawos_image::AgentChoice,
    /// The same as --agent none.
    #[arg(long, conflicts_with = "agent")]
    without_agent_runtime: bool,
}

fn parse_agent(s: &str) -> Result<clawos_image::AgentChoice, String> {
    s.parse()
}

/// `clawos keygen`: writes a new signing key to `out` and prints its public key.
pub fn keygen(out: Option<PathBuf>, json: bool) -> Result<(), Exit> {
    let path = out.unwrap_or_else(|| own_state_dir().join("signing.key"));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create {}", parent.display()))
            .map_err(|e| Exit(1, e))?;
    }
    let key = keys::generate(&path).map_err(|e| Exit(1, e.into()))?;
    if json {
        print_json(&serde_json::json!({"private_key": path, "public_key": keys::public_hex(&key)}))
            .map_err(|e| Exit(1, e))?;
    } else {
        eprintln!("wrote private key {} (mode 0600)", path.display());
        println!("{}", keys::public_hex(&key));
    }
    Ok(())
}

/// Where the static guest binaries are: next to this binary (an install), or in the
/// cargo target directory for the static target (a checkout).
fn find_guest_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the clawos binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        // A checkout: the static build beside target/{debug,release}, preferred over the
        // dynamic builds cargo also leaves there.
        dir.join("../x86_64-unknown-linux-gnu/release"),
        dir.join("../../x86_64-unknown-linux-gnu/release"),
        dir.to_path_buf(),
    ];
    candidates
        .iter()
        .find(|d| {
            clawos_image::build::GUEST_BINS
                .iter()
                .all(|b| d.join(b).is_file())
        })
        .cloned()
        .ok_or_else(|| {
            anyhow!("static guest binaries not found next to {}; run scripts/build-guest.sh or pass --guest-bin-dir", exe.display())
        })
}

pub fn run(cmd: ImageCmd, json: bool) -> Result<(), Exit> {
    let err = |e: anyhow::Error| Exit(1, e);
    match cmd {
        ImageCmd::Build(a) => {
            let kernel = match a.kernel_dir {
                Some(d) => KernelSource::Dir(d),
                None => KernelSource::Debian {
                    package: a.kernel_package,
                },
            };
            let guest_bin_dir = match a.guest_bin_dir {
                Some(d) => d,
                None => find_guest_bin_dir().map_err(err)?,
            };
            let agent = match a.without_agent_runtime {
                true => clawos_image::AgentChoice::None,
                false => a.agent,
            };
            let default_out = match agent {
                clawos_image::AgentChoice::OpenClaw => "images/openclaw",
                _ => "images/default",
            };
            let opts = clawos_image::BuildOptions {
                kernel,
                cache_dir: own_state_dir().join("cache"),
                guest_bin_dir,
                rootfs_overlay: a.rootfs_overlay,
                out: a.out.unwrap_or_else(|| own_state_dir().join(default_out)),
                force: a.force,
                version: a.version,
                source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
                    .ok()
                    .and_then(|s| s.parse().ok()),
                vmlinux: a.vmlinux,
                busybox: (!a.no_busybox).then_some(a.busybox),
                agent,
            };
            let started = Instant::now();
            let m = clawos_image::build(&opts, &mut |msg| {
                eprintln!("[{:>5.1}s] {msg}", started.elapsed().as_secs_f64());
            })
            .map_err(|e| err(e.into()))?;
            if json {
                print_json(&m).map_err(err)?;
            } else {
                println!(
                    "built {} (root hash {})",
                    opts.out.display(),
                    m.verity.root_hash
                );
                println!("next: clawos image sign {}", opts.out.display());
            }
        }
        ImageCmd::Sign { dir, key } => {
            let key_path = key.unwrap_or_else(|| own_state_dir().join("signing.key"));
            let key = keys::load(&key_path).map_err(|e| err(e.into()))?;
            let sig = manifest::sign_bundle(&dir, &key).map_err(|e| err(e.into()))?;
            if json {
                print_json(
                    &serde_json::json!({"signature": sig, "public_key": keys::public_hex(&key)}),
                )
                .map_err(err)?;
            } else {
                println!(
                    "signed {} with public key {}",
                    sig.display(),
                    keys::public_hex(&key)
                );
            }
        }
        ImageCmd::Add {
            name,
            dir,
            pubkey,
            force,
        } => {
            clawos_image::store::check_name(&name).map_err(|m| err(anyhow!(m)))?;
            let public_key = pubkey
                .as_deref()
                .map(manifest::parse_public_key)
                .transpose()
                .map_err(|e| err(e.into()))?;
            let signed = public_key.is_some();
            let policy = VerifyPolicy {
                public_key,
                pinned_root_hash: None,
            };
            let source = clawos_image::BundleDir::open(&dir, &clawos_image::Trust::operator())
                .map(clawos_image::BundleSource::dir)
                .map_err(|e| Exit(5, e.into()))?;
            let store = clawos_image::store::images_dir(&state_dir());
            let m =
                clawos_image::store::add(&store, &name, &source, &policy, force).map_err(|e| {
                    match e {
                        clawos_image::ImageError::Write { .. } => Exit(1, e.into()),
                        e => Exit(5, e.into()),
                    }
                })?;
            let path = store.join(&name);
            if json {
                print_json(&serde_json::json!({
                    "name": name,
                    "path": path,
                    "root_hash": m.verity.root_hash,
                    "signature_checked": signed,
                }))
                .map_err(err)?;
            } else {
                println!(
                    "added image {name} at {} (root hash {}){}",
                    path.display(),
                    m.verity.root_hash,
                    if signed {
                        ""
                    } else {
                        "; signature NOT checked here (set CLAWOS_SIGNING_PUBKEY); the launcher checks it before every boot"
                    }
                );
            }
        }
        ImageCmd::List | ImageCmd::Verify { dir: None, .. } => {
            return Err(Exit(
                2,
                anyhow!("`image list` and `image verify --name` ask the launcher"),
            ));
        }
        ImageCmd::Verify {
            dir: Some(dir),
            pubkey,
            ..
        } => {
            let public_key = pubkey
                .as_deref()
                .map(manifest::parse_public_key)
                .transpose()
                .map_err(|e| err(e.into()))?;
            let signed = public_key.is_some();
            let policy = VerifyPolicy {
                public_key,
                pinned_root_hash: None,
            };
            let m = clawos_image::verify(&ImagePaths::bundle(&dir), &policy)
                .map_err(|e| Exit(5, e.into()))?;
            if json {
                print_json(
                    &serde_json::json!({"ok": true, "signature_checked": signed, "manifest": m}),
                )
                .map_err(err)?;
            } else if signed {
                println!(
                    "ok: signature and hashes match (root hash {})",
                    m.verity.root_hash
                );
            } else {
                println!(
                    "ok: hashes match (root hash {}); signature NOT checked: set CLAWOS_SIGNING_PUBKEY",
                    m.verity.root_hash
                );
            }
        }
    }
    Ok(())
}
