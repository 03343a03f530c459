//! `clawos`: the operator's command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use clawos_image::{ImagePaths, KernelSource, VerifyPolicy, keys, manifest};
use clawos_vm_launcher_api::{ClientError, DEFAULT_URL, LauncherClient, StartVm, Vm, VmState};

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict (e.g. already running, paused),
5 image refused (signature/hash), 6 the VM failed, 7 cannot reach vm-launcher.
`vm exec` exits with the command's own code (124 on --timeout).

Environment: CLAWOS_STATE_DIR (default ~/.clawos), CLAWOS_LAUNCHER_URL,
CLAWOS_SIGNING_PUBKEY, CLAWOS_GUEST_BIN_DIR.";

#[derive(Debug, Parser)]
#[command(name = "clawos", version, about = "Run AI agents in signed, verified microVMs", after_help = AFTER_HELP)]
struct Cli {
    /// vm-launcher URL.
    #[arg(long, global = true, env = "CLAWOS_LAUNCHER_URL", default_value = DEFAULT_URL)]
    launcher_url: String,
    /// identity-manager URL.
    #[arg(
        long,
        global = true,
        env = "CLAWOS_IDENTITY_URL",
        default_value = "http://127.0.0.1:2082"
    )]
    identity_url: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create an Ed25519 image-signing key (0600) and print its public key.
    Keygen {
        /// Where to write the private key [default: $CLAWOS_STATE_DIR/signing.key].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build, sign and verify agent images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Start, list, stop and inspect agent VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Agent tokens from identity-manager.
    #[command(subcommand)]
    Token(TokenCmd),
    /// identity-manager keys.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// LLM usage per agent and model, from inference-proxy's ledger.
    Usage {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Window: the last N minutes [default: all].
        #[arg(long)]
        since_minutes: Option<u64>,
        /// inference-proxy URL.
        #[arg(
            long,
            env = "CLAWOS_PROXY_URL",
            default_value = "http://127.0.0.1:11435"
        )]
        proxy_url: String,
    },
    /// The syscall audit trail from monitor-daemon.
    #[command(subcommand)]
    Audit(AuditCmd),
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Print audit events (syscalls, alerts, drop reports), oldest first.
    Tail {
        /// Only this agent's events.
        #[arg(long)]
        agent: Option<String>,
        /// Only alerts and drop reports.
        #[arg(long)]
        alerts: bool,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Print at most this many (without --follow).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Keep printing new events.
        #[arg(short, long)]
        follow: bool,
        /// monitor-daemon URL.
        #[arg(long, env = "CLAWOS_MONITOR_URL", default_value = clawos_monitor_api::DEFAULT_URL)]
        monitor_url: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Issue a token for an agent (prints the JWT).
    Issue {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        vm: String,
        #[arg(long, default_value = "inference-proxy")]
        audience: String,
        /// Lifetime in seconds (max 3600).
        #[arg(long)]
        ttl: Option<u64>,
        /// Verity root hash of the agent's image.
        #[arg(long, default_value = "")]
        root_hash: String,
        #[arg(long)]
        scope: Vec<String>,
    },
    /// Check a token (signature, expiry, revocation) via introspection.
    Verify { token: String },
    /// Revoke one token (by jti) or every token of an agent.
    Revoke {
        #[arg(long, conflicts_with = "agent", required_unless_present = "agent")]
        jti: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum IdentityCmd {
    /// Rotate the token signing keys (next → active → retired).
    RotateKeys,
    /// Re-seal every stored private key under a new master key (identity-manager
    /// must be stopped; crash-safe).
    RotateMasterKey {
        /// Master key file [default: $CLAWOS_STATE_DIR/identity/master.key].
        #[arg(long, env = "CLAWOS_MASTER_KEY_PATH")]
        master_key_path: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
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
    /// Verify a bundle as the launcher does before boot.
    Verify {
        /// Bundle directory.
        dir: PathBuf,
        /// Trusted public key, hex.
        #[arg(long, env = "CLAWOS_SIGNING_PUBKEY")]
        pubkey: Option<String>,
    },
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// Output bundle directory [default: $CLAWOS_STATE_DIR/images/default].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Debian kernel package to fetch [default: what linux-image-cloud-amd64 depends on].
    #[arg(long, conflicts_with = "kernel_dir")]
    kernel_package: Option<String>,
    /// Use an unpacked kernel tree (boot/vmlinuz-*, lib/modules/*) instead of Debian's.
    #[arg(long)]
    kernel_dir: Option<PathBuf>,
    /// Directory with the static clawos-init, clawos-agent and clawos-audit [default: next to this binary].
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
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Create (if new) and start an agent VM; waits until the guest is ready.
    Start {
        name: String,
        /// Model the agent uses.
        #[arg(long)]
        model: Option<String>,
        /// Memory in MiB.
        #[arg(long, default_value_t = 512)]
        mem: u32,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Image bundle directory [default: the launcher's].
        #[arg(long)]
        image: Option<PathBuf>,
        /// Return once the VM process started, without waiting for ready.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for ready.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
        /// Make the VM snapshot-capable (QEMU boots the `pc` machine instead of
        /// `microvm`: a little slower to boot).
        #[arg(long)]
        snapshots: bool,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List,
    /// Show one VM.
    Show { name: String },
    /// Stop a VM (clean power-off, killed after a timeout); disks are kept.
    Stop { name: String },
    /// Print a VM's console log.
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
    },
    /// Delete a stopped VM and its disks.
    Rm { name: String },
    /// Run a command in a VM; streams its output and exits with its exit code.
    Exec {
        name: String,
        /// Forward this command's stdin to the guest command.
        #[arg(short, long)]
        interactive: bool,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// Working directory in the guest [default: /workspace].
        #[arg(long)]
        cwd: Option<String>,
        /// Environment variables (KEY=VALUE), repeatable.
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a VM's /workspace: `cp FILE NAME:PATH` or `cp NAME:PATH FILE`.
    Cp { src: String, dst: String },
    /// List a directory of a VM's /workspace.
    Files {
        name: String,
        #[arg(default_value = "/workspace")]
        path: String,
    },
    /// Forward a local TCP port to the VM's agent gateway (guest port 18789).
    PortForward {
        name: String,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1:18789")]
        listen: String,
    },
    /// Freeze a running VM's vCPUs.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Save a running or paused VM (memory, devices and disks); it keeps running.
    Snapshot {
        name: String,
        /// Snapshot name [default: snap-<unix time>].
        #[arg(long)]
        tag: Option<String>,
    },
    /// List a VM's snapshots.
    Snapshots { name: String },
    /// Boot a stopped VM from a snapshot. Its disks return to the snapshot's: changes
    /// made after the snapshot are discarded.
    Restore {
        name: String,
        /// The snapshot's tag.
        #[arg(long)]
        snapshot: String,
        /// Return once the VM process started, without waiting for ready.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for ready.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Delete one of a VM's snapshots.
    SnapshotRm { name: String, tag: String },
}

/// An error with the exit code it maps to.
#[derive(Debug)]
struct Exit(u8, anyhow::Error);

fn state_dir() -> PathBuf {
    std::env::var_os("CLAWOS_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(clawos_service::default_state_dir)
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

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn api_exit(e: ClientError) -> Exit {
    let code = match e.status() {
        Some(404) => 3,
        Some(409) => 4,
        Some(422) => 5,
        Some(_) => 1,
        None => 7,
    };
    Exit(code, e.into())
}

fn vm_table(vms: &[Vm]) {
    println!(
        "{:<24} {:<9} {:>7} {:>5} {:>8} {:<16} REASON",
        "NAME", "STATE", "MEM", "VCPU", "BOOT", "ROOT HASH"
    );
    for v in vms {
        println!(
            "{:<24} {:<9} {:>6}M {:>5} {:>8} {:<16} {}",
            v.name,
            v.state.to_string(),
            v.mem_mib,
            v.vcpus,
            v.boot_ms
                .map(|m| format!("{:.1}s", m as f64 / 1000.0))
                .unwrap_or_default(),
            &v.root_hash[..v.root_hash.len().min(16)],
            v.reason.as_deref().unwrap_or("")
        );
    }
}

fn image_cmd(cmd: ImageCmd, json: bool) -> Result<(), Exit> {
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
            let opts = clawos_image::BuildOptions {
                kernel,
                cache_dir: state_dir().join("cache/kernel"),
                guest_bin_dir,
                rootfs_overlay: a.rootfs_overlay,
                out: a.out.unwrap_or_else(|| state_dir().join("images/default")),
                force: a.force,
                version: a.version,
                source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
                    .ok()
                    .and_then(|s| s.parse().ok()),
                vmlinux: a.vmlinux,
                busybox: (!a.no_busybox).then_some(a.busybox),
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
            let key_path = key.unwrap_or_else(|| state_dir().join("signing.key"));
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
        ImageCmd::Verify { dir, pubkey } => {
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

async fn vm_cmd(cmd: VmCmd, client: &LauncherClient, json: bool) -> Result<(), Exit> {
    match cmd {
        VmCmd::Start {
            name,
            model,
            mem,
            vcpus,
            image,
            no_wait,
            timeout,
            snapshots,
        } => {
            let image = image
                .map(|p| std::path::absolute(&p).unwrap_or(p))
                .map(|p| p.to_string_lossy().into_owned());
            let req = StartVm {
                name: name.clone(),
                model,
                mem_mib: mem,
                vcpus,
                image,
                snapshots,
            };
            let mut vm = client.start(&req).await.map_err(api_exit)?;
            if !no_wait {
                vm = wait_ready(client, vm, "starting", timeout, json).await?;
            }
            if json {
                print_json(&vm).map_err(|e| Exit(1, e))?;
            } else {
                vm_table(std::slice::from_ref(&vm));
            }
            if vm.state == VmState::Failed {
                return Err(Exit(
                    6,
                    anyhow!("{name} failed: {}", vm.reason.unwrap_or_default()),
                ));
            }
        }
        VmCmd::List => {
            let vms = client.list().await.map_err(api_exit)?;
            if json {
                print_json(&vms).map_err(|e| Exit(1, e))?;
            } else {
                vm_table(&vms);
            }
        }
        VmCmd::Show { name } => {
            let vm = client.get(&name).await.map_err(api_exit)?;
            print_json(&vm).map_err(|e| Exit(1, e))?;
        }
        VmCmd::Stop { name } => {
            let vm = client.stop(&name).await.map_err(api_exit)?;
            if json {
                print_json(&vm).map_err(|e| Exit(1, e))?;
            } else {
                println!("{name}: {}", vm.state);
            }
        }
        VmCmd::Logs { name, follow } => {
            let mut offset = 0;
            let mut out = std::io::stdout();
            loop {
                let (bytes, next) = client.console(&name, offset).await.map_err(api_exit)?;
                out.write_all(&bytes).map_err(|e| Exit(1, e.into()))?;
                out.flush().map_err(|e| Exit(1, e.into()))?;
                offset = next;
                if !follow {
                    break;
                }
                if bytes.is_empty() {
                    let vm = client.get(&name).await.map_err(api_exit)?;
                    if !vm.state.is_active() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        VmCmd::Exec {
            name,
            interactive,
            timeout,
            cwd,
            env,
            command,
        } => return exec(client, &name, interactive, timeout, cwd, env, command).await,
        VmCmd::Cp { src, dst } => {
            let remote = |s: &str| -> Option<(String, String)> {
                let (vm, path) = s.split_once(':')?;
                (!vm.is_empty() && !vm.contains('/')).then(|| (vm.to_owned(), path.to_owned()))
            };
            match (remote(&src), remote(&dst)) {
                (None, Some((vm, path))) => {
                    let data =
                        std::fs::read(&src).map_err(|e| Exit(1, anyhow!("read {src}: {e}")))?;
                    let n = data.len();
                    client.put_file(&vm, &path, data).await.map_err(api_exit)?;
                    if !json {
                        eprintln!("copied {n} bytes to {vm}:{path}");
                    }
                }
                (Some((vm, path)), None) => {
                    let data = client.get_file(&vm, &path).await.map_err(api_exit)?;
                    let n = data.len();
                    let tmp = format!("{dst}.clawos-partial");
                    std::fs::write(&tmp, &data)
                        .and_then(|()| std::fs::rename(&tmp, &dst))
                        .map_err(|e| Exit(1, anyhow!("write {dst}: {e}")))?;
                    if !json {
                        eprintln!("copied {n} bytes from {vm}:{path}");
                    }
                }
                _ => {
                    return Err(Exit(
                        2,
                        anyhow!("exactly one of SRC and DST must be NAME:PATH"),
                    ));
                }
            }
        }
        VmCmd::Files { name, path } => {
            let entries = client.list_files(&name, &path).await.map_err(api_exit)?;
            if json {
                print_json(&entries).map_err(|e| Exit(1, e))?;
            } else {
                for e in entries {
                    println!("{:<8} {:>12} {}", e.kind, e.size, e.name);
                }
            }
        }
        VmCmd::PortForward { name, listen } => return port_forward(client, &name, &listen).await,
        VmCmd::Pause { name } => {
            let vm = client.pause(&name).await.map_err(api_exit)?;
            println!("{name}: {}", vm.state);
        }
        VmCmd::Resume { name } => {
            let vm = client.resume(&name).await.map_err(api_exit)?;
            println!("{name}: {}", vm.state);
        }
        VmCmd::Snapshot { name, tag } => {
            if !json {
                eprintln!("saving {name} (the guest is frozen meanwhile)...");
            }
            let snap = client
                .snapshot(&name, &clawos_vm_launcher_api::CreateSnapshot { tag })
                .await
                .map_err(api_exit)?;
            if json {
                print_json(&snap).map_err(|e| Exit(1, e))?;
            } else {
                println!(
                    "{name}: snapshot {} taken in {} ms ({} MiB state, {} MiB disk data); restore with: clawos vm restore {name} --snapshot {}",
                    snap.tag,
                    snap.save_ms,
                    snap.state_bytes >> 20,
                    snap.disk_bytes >> 20,
                    snap.tag
                );
            }
        }
        VmCmd::Snapshots { name } => {
            let snaps = client.snapshots(&name).await.map_err(api_exit)?;
            if json {
                print_json(&snaps).map_err(|e| Exit(1, e))?;
            } else {
                println!(
                    "{:<24} {:>12} {:>6} {:>10} {:>10} {:>8}",
                    "TAG", "CREATED", "MEM", "STATE", "DISK", "SAVE"
                );
                for s in snaps {
                    println!(
                        "{:<24} {:>12} {:>5}M {:>9}M {:>9}M {:>6}ms",
                        s.tag,
                        s.created_at,
                        s.mem_mib,
                        s.state_bytes >> 20,
                        s.disk_bytes >> 20,
                        s.save_ms
                    );
                }
            }
        }
        VmCmd::Restore {
            name,
            snapshot,
            no_wait,
            timeout,
        } => {
            let mut vm = client
                .restore(&name, &clawos_vm_launcher_api::RestoreVm { snapshot })
                .await
                .map_err(api_exit)?;
            if !no_wait {
                vm = wait_ready(client, vm, "restoring", timeout, json).await?;
            }
            if json {
                print_json(&vm).map_err(|e| Exit(1, e))?;
            } else {
                vm_table(std::slice::from_ref(&vm));
            }
        }
        VmCmd::SnapshotRm { name, tag } => {
            client
                .delete_snapshot(&name, &tag)
                .await
                .map_err(api_exit)?;
            if !json {
                println!("{name}: snapshot {tag} deleted");
            }
        }
        VmCmd::Rm { name } => {
            client.delete(&name).await.map_err(api_exit)?;
            if !json {
                println!("{name}: deleted");
            }
        }
    }
    Ok(())
}

/// Prints audit events; with `follow`, keeps polling for new ones.
async fn audit_tail(
    client: &clawos_monitor_api::MonitorClient,
    agent: Option<&str>,
    alerts_only: bool,
    mut after: u64,
    limit: usize,
    follow: bool,
    json: bool,
) -> Result<(), Exit> {
    use clawos_monitor_api::Kind;
    let mut printed = 0;
    loop {
        let batch = client
            .events(agent, after, if follow { 1000 } else { limit - printed })
            .await
            .map_err(|e| {
                let code = if matches!(e, clawos_monitor_api::ClientError::Transport { .. }) {
                    7
                } else {
                    1
                };
                Exit(code, e.into())
            })?;
        for e in &batch {
            after = e.seq;
            if alerts_only && e.kind == Kind::Syscall {
                continue;
            }
            printed += 1;
            if json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
                continue;
            }
            let who = format!(
                "{}/{}{} {}[{}]",
                e.agent.as_deref().unwrap_or("-"),
                e.vm.as_deref().unwrap_or("-"),
                if e.guest_boot.is_some() { ":guest" } else { "" },
                e.comm.as_deref().unwrap_or("-").escape_debug(),
                e.pid.unwrap_or(0)
            );
            let line = match e.kind {
                Kind::Syscall | Kind::Alert => {
                    let args = e
                        .args
                        .map(|a| {
                            a.iter()
                                .map(|v| format!("{v:#x}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    let path = e
                        .path
                        .as_ref()
                        .map(|p| format!(" {:?}", p))
                        .unwrap_or_default();
                    let alert = match (&e.rule, e.severity) {
                        (Some(r), Some(s)) => format!("ALERT {r} severity {s}: "),
                        _ => String::new(),
                    };
                    format!(
                        "{alert}{}({args}) = {}{path}",
                        e.syscall.as_deref().unwrap_or("?"),
                        e.ret.unwrap_or(0)
                    )
                }
                Kind::Drops => format!(
                    "DROPPED {} events in the kernel ({} in all)",
                    e.dropped.unwrap_or(0),
                    e.dropped_total.unwrap_or(0)
                ),
                Kind::ForwardDrops => format!(
                    "DROPPED {} events for the SIEM (spool full)",
                    e.dropped.unwrap_or(0)
                ),
                Kind::GuestDrops => format!(
                    "DROPPED {} events inside the VM ({})",
                    e.dropped.unwrap_or(0),
                    e.detail.as_deref().unwrap_or("-")
                ),
            };
            println!("{:>8} {} {who} {line}", e.seq, e.ts);
        }
        if !follow && (batch.is_empty() || printed >= limit) {
            return Ok(());
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Polls until a VM leaves `starting`, printing progress dots unless `json`.
async fn wait_ready(
    client: &LauncherClient,
    mut vm: clawos_vm_launcher_api::Vm,
    what: &str,
    timeout: u64,
    json: bool,
) -> Result<clawos_vm_launcher_api::Vm, Exit> {
    let name = vm.name.clone();
    let started = Instant::now();
    if !json {
        eprint!("{what} {name}");
    }
    while vm.state == VmState::Starting {
        if started.elapsed() > Duration::from_secs(timeout) {
            return Err(Exit(
                1,
                anyhow!("{name} not ready after {timeout}s (clawos vm logs {name})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if !json {
            eprint!(".");
            let _ = std::io::stderr().flush();
        }
        vm = client.get(&name).await.map_err(api_exit)?;
    }
    if !json {
        eprintln!();
    }
    Ok(vm)
}

/// Sends what `src` yields as binary WebSocket messages until it ends. Returns false
/// if the WebSocket went away first.
async fn pump_to_websocket<S>(mut src: impl tokio::io::AsyncRead + Unpin, tx: &mut S) -> bool
where
    S: futures_util::Sink<tokio_tungstenite::tungstenite::Message> + Unpin,
{
    use futures_util::SinkExt;
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => {
                let msg = tokio_tungstenite::tungstenite::Message::Binary(buf[..n].to_vec().into());
                if tx.send(msg).await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Runs a command in the guest over the launcher's WebSocket exec endpoint.
async fn exec(
    client: &LauncherClient,
    name: &str,
    interactive: bool,
    timeout: Option<f64>,
    cwd: Option<String>,
    env: Vec<String>,
    command: Vec<String>,
) -> Result<(), Exit> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};

    let env = env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Exit(2, anyhow!("--env {kv:?} is not KEY=VALUE")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (mut ws, _) = match tokio_tungstenite::connect_async(client.exec_url(name)).await {
        Ok(ok) => ok,
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            let message = serde_json::from_str::<clawos_vm_launcher_api::ApiError>(&body)
                .map(|e| e.message)
                .unwrap_or(body);
            return Err(api_exit(ClientError::Api {
                status,
                code: String::new(),
                message,
            }));
        }
        Err(e) => return Err(Exit(7, anyhow!("cannot reach vm-launcher for exec: {e}"))),
    };
    let start = clawos_vm_launcher_api::ExecStart {
        argv: command,
        env,
        cwd,
        stdin: interactive,
        timeout_ms: timeout.map(|s| (s * 1000.0) as u64),
    };
    let text = serde_json::to_string(&start).map_err(|e| Exit(1, e.into()))?;
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| Exit(1, e.into()))?;
    let (mut tx, mut rx) = ws.split();
    if interactive {
        tokio::spawn(async move {
            if pump_to_websocket(tokio::io::stdin(), &mut tx).await {
                let _ = tx.send(Message::Text(r#"{"eof":true}"#.into())).await;
            }
        });
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(msg) = rx.next().await {
        match msg.map_err(|e| Exit(1, anyhow!("exec stream: {e}")))? {
            Message::Binary(b) if !b.is_empty() => {
                let out = if b[0] == clawos_vm_launcher_api::STDERR {
                    stderr.write_all(&b[1..]).await
                } else {
                    stdout.write_all(&b[1..]).await
                };
                out.map_err(|e| Exit(1, e.into()))?;
            }
            Message::Text(t) => {
                let _ = stdout.flush().await;
                let _ = stderr.flush().await;
                return match serde_json::from_str(&t) {
                    Ok(clawos_vm_launcher_api::ExecEvent::Exit { code: Some(0), .. }) => Ok(()),
                    Ok(clawos_vm_launcher_api::ExecEvent::Exit { code: Some(c), .. }) => {
                        // The command's own exit code, as ssh and docker exec do.
                        std::process::exit(c)
                    }
                    Ok(clawos_vm_launcher_api::ExecEvent::Exit {
                        timed_out: true, ..
                    }) => Err(Exit(124, anyhow!("command timed out and was killed"))),
                    Ok(clawos_vm_launcher_api::ExecEvent::Exit { signal, .. }) => Err(Exit(
                        128,
                        anyhow!("command killed by signal {}", signal.unwrap_or(0)),
                    )),
                    Ok(clawos_vm_launcher_api::ExecEvent::Error { message }) => {
                        Err(Exit(1, anyhow!("exec: {message}")))
                    }
                    Err(e) => Err(Exit(1, anyhow!("exec: bad event {t:?}: {e}"))),
                };
            }
            _ => {}
        }
    }
    Err(Exit(1, anyhow!("exec stream ended without an exit status")))
}

/// Listens locally; each accepted connection is tunnelled to the guest gateway through
/// its own WebSocket to the launcher.
async fn port_forward(client: &LauncherClient, name: &str, listen: &str) -> Result<(), Exit> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;

    // Fail early, with the launcher's words, if the VM cannot be reached.
    let vm = client.get(name).await.map_err(api_exit)?;
    if vm.state != VmState::Running {
        return Err(Exit(4, anyhow!("VM {name} is {}", vm.state)));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Exit(1, anyhow!("listen on {listen}: {e}")))?;
    let local = listener.local_addr().map_err(|e| Exit(1, e.into()))?;
    eprintln!("forwarding {local} -> {name}:18789 (Ctrl-C to stop)");
    let url = client.gateway_url(name);
    loop {
        let (tcp, peer) = listener.accept().await.map_err(|e| Exit(1, e.into()))?;
        let url = url.clone();
        tokio::spawn(async move {
            let ws = match tokio_tungstenite::connect_async(&url).await {
                Ok((ws, _)) => ws,
                Err(e) => {
                    eprintln!("{peer}: gateway unreachable: {e}");
                    return;
                }
            };
            let (mut tx, mut rx) = ws.split();
            let (mut tr, mut tw) = tcp.into_split();
            let up = async move {
                pump_to_websocket(&mut tr, &mut tx).await;
                let _ = tx.send(Message::Close(None)).await;
            };
            let down = async move {
                while let Some(Ok(m)) = rx.next().await {
                    match m {
                        Message::Binary(b) if tw.write_all(&b).await.is_err() => break,
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
                let _ = tw.shutdown().await;
            };
            tokio::select! {
                () = up => {}
                () = down => {}
            }
        });
    }
}

/// The service credential identity-manager created in the state directory.
fn identity_credential() -> Result<String, Exit> {
    let path = std::env::var_os("CLAWOS_IDENTITY_SERVICE_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir().join("identity/service.token"));
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| {
            Exit(
                1,
                anyhow!("identity service credential {}: {e}", path.display()),
            )
        })
}

async fn identity_call(
    url: &str,
    path: &str,
    auth: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, Exit> {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", url.trim_end_matches('/')))
        .bearer_auth(auth);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Exit(7, anyhow!("cannot reach identity-manager at {url}: {e}")))?;
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    if status >= 400 {
        let code = match status {
            401 => 1,
            404 => 3,
            _ => 1,
        };
        return Err(Exit(
            code,
            anyhow!(
                "{} (HTTP {status})",
                v["message"].as_str().unwrap_or("error")
            ),
        ));
    }
    Ok(v)
}

async fn token_cmd(cmd: TokenCmd, url: &str, json: bool) -> Result<(), Exit> {
    let cred = identity_credential()?;
    match cmd {
        TokenCmd::Issue {
            agent,
            vm,
            audience,
            ttl,
            root_hash,
            scope,
        } => {
            let v = identity_call(
                url,
                "/v1/tokens",
                &cred,
                Some(serde_json::json!({
                    "agent": agent, "vm_id": vm, "audience": audience, "ttl_secs": ttl,
                    "image_root_hash": root_hash, "scopes": scope,
                })),
            )
            .await?;
            if json {
                print_json(&v).map_err(|e| Exit(1, e))?;
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
            }
        }
        TokenCmd::Verify { token } => {
            let v = identity_call(
                url,
                "/v1/introspect",
                &cred,
                Some(serde_json::json!({ "token": token })),
            )
            .await?;
            print_json(&v).map_err(|e| Exit(1, e))?;
            if v["active"] != true {
                return Err(Exit(1, anyhow!("token is not active")));
            }
        }
        TokenCmd::Revoke { jti, agent } => {
            let body = match (jti, agent) {
                (Some(j), _) => serde_json::json!({ "jti": j }),
                (None, Some(a)) => serde_json::json!({ "agent": a }),
                (None, None) => return Err(Exit(2, anyhow!("give --jti or --agent"))),
            };
            identity_call(url, "/v1/revoke", &cred, Some(body)).await?;
            if !json {
                println!("revoked");
            }
        }
    }
    Ok(())
}

/// A single-threaded runtime for the commands that talk to a service.
fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit(1, e.into()))
}

fn run(cli: Cli) -> Result<(), Exit> {
    match cli.cmd {
        Cmd::Keygen { out } => {
            let path = out.unwrap_or_else(|| state_dir().join("signing.key"));
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("create {}", parent.display()))
                    .map_err(|e| Exit(1, e))?;
            }
            let key = keys::generate(&path).map_err(|e| Exit(1, e.into()))?;
            if cli.json {
                print_json(
                    &serde_json::json!({"private_key": path, "public_key": keys::public_hex(&key)}),
                )
                .map_err(|e| Exit(1, e))?;
            } else {
                eprintln!("wrote private key {} (mode 0600)", path.display());
                println!("{}", keys::public_hex(&key));
            }
            Ok(())
        }
        Cmd::Image(cmd) => image_cmd(cmd, cli.json),
        Cmd::Token(cmd) => {
            let rt = runtime()?;
            rt.block_on(token_cmd(cmd, &cli.identity_url, cli.json))
        }
        Cmd::Audit(AuditCmd::Tail {
            agent,
            alerts,
            after,
            limit,
            follow,
            monitor_url,
        }) => {
            let token_path = clawos_monitor_api::token_path(&state_dir());
            let token = std::fs::read_to_string(&token_path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| {
                    Exit(
                        1,
                        anyhow!("monitor operator credential {}: {e}", token_path.display()),
                    )
                })?;
            let client = clawos_monitor_api::MonitorClient::new(&monitor_url, &token);
            let rt = runtime()?;
            rt.block_on(audit_tail(
                &client,
                agent.as_deref(),
                alerts,
                after,
                limit,
                follow,
                cli.json,
            ))
        }
        Cmd::Usage {
            agent,
            since_minutes,
            proxy_url,
        } => {
            let since_ms = since_minutes
                .map(|m| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    now.saturating_sub(m * 60_000)
                })
                .unwrap_or(0);
            let token_path = std::env::var_os("CLAWOS_PROXY_ADMIN_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| state_dir().join("proxy/admin.token"));
            let token = std::fs::read_to_string(&token_path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| {
                    Exit(
                        1,
                        anyhow!("proxy operator credential {}: {e}", token_path.display()),
                    )
                })?;
            let rt = runtime()?;
            let v: serde_json::Value = rt.block_on(async {
                let mut q = vec![("since_ms", since_ms.to_string())];
                if let Some(a) = &agent {
                    q.push(("agent", a.clone()));
                }
                let r = reqwest::Client::new()
                    .get(format!("{}/v1/usage", proxy_url.trim_end_matches('/')))
                    .bearer_auth(&token)
                    .query(&q)
                    .send()
                    .await
                    .map_err(|e| {
                        Exit(
                            7,
                            anyhow!("cannot reach inference-proxy at {proxy_url}: {e}"),
                        )
                    })?;
                let status = r.status().as_u16();
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                if status >= 400 {
                    return Err(Exit(
                        1,
                        anyhow!(
                            "{} (HTTP {status})",
                            v["message"].as_str().unwrap_or("error")
                        ),
                    ));
                }
                Ok(v)
            })?;
            if cli.json {
                print_json(&v).map_err(|e| Exit(1, e))?;
            } else {
                println!(
                    "{:<24} {:<28} {:>9} {:>12} {:>12}",
                    "AGENT", "MODEL", "REQUESTS", "INPUT", "OUTPUT"
                );
                for r in v["usage"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<28} {:>9} {:>12} {:>12}",
                        r["agent"].as_str().unwrap_or(""),
                        r["model"].as_str().unwrap_or(""),
                        r["requests"].as_u64().unwrap_or(0),
                        r["input_tokens"].as_u64().unwrap_or(0)
                            + r["cache_creation_input_tokens"].as_u64().unwrap_or(0)
                            + r["cache_read_input_tokens"].as_u64().unwrap_or(0),
                        r["output_tokens"].as_u64().unwrap_or(0)
                    );
                }
            }
            Ok(())
        }
        Cmd::Identity(IdentityCmd::RotateKeys) => {
            let rt = runtime()?;
            let cred = identity_credential()?;
            let v = rt.block_on(identity_call(
                &cli.identity_url,
                "/v1/keys/rotate",
                &cred,
                None,
            ))?;
            println!(
                "active signing key: {}",
                v["active_kid"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Cmd::Identity(IdentityCmd::RotateMasterKey { master_key_path }) => {
            let dir = state_dir().join("identity");
            let key = master_key_path.unwrap_or_else(|| dir.join("master.key"));
            let (n, v) =
                clawos_identity_manager::rotate_master_key_file(&dir.join("identity.db"), &key)
                    .map_err(|e| Exit(1, e.into()))?;
            println!(
                "re-sealed {n} keys under a new master key (version {v}) in {}",
                key.display()
            );
            Ok(())
        }
        Cmd::Vm(cmd) => {
            let client = LauncherClient::new(&cli.launcher_url);
            let rt = runtime()?;
            rt.block_on(vm_cmd(cmd, &client, cli.json))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit(code, e)) => {
            eprintln!("clawos: error: {e:#}");
            ExitCode::from(code)
        }
    }
}
