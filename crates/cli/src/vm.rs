//! `clawos vm ...`: agent VM lifecycle, logs, files and snapshots through vm-launcher.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Subcommand;
use clawos_vm_launcher_api::{LauncherClient, StartVm, VmState};

use crate::exec::{exec, port_forward};
use crate::exit::{Exit, api_exit};
use crate::output::{print_json, snapshot_table, vm_table};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
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

/// Runs a `vm` subcommand. `Ok` carries the exit status: 0, or `vm exec`'s command's own.
pub async fn run(cmd: VmCmd, client: &LauncherClient, json: bool) -> Result<u8, Exit> {
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
                    // 0666 less the umask, as for any file the user creates.
                    clawos_service::atomic_write(std::path::Path::new(&dst), &data, 0o666)
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
        VmCmd::PortForward { name, listen } => port_forward(client, &name, &listen).await?,
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
                snapshot_table(&snaps);
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
    Ok(0)
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
