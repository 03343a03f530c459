//! `clawos vm ...`: agent VM lifecycle, logs, files and snapshots through vm-launcher.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Subcommand;
use clawos_vm_launcher_api::{LauncherClient, StartVm, VmState};

use crate::exec::{exec, port_forward};
use crate::exit::{Exit, api_exit};
use crate::output::{print_json, snapshot_table, vm_table};

/// Largest download `vm cp` takes unless `--max-bytes` says otherwise: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

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
        /// Image name, as registered with `clawos image add NAME DIR` [default: `default`,
        /// the launcher's configured image]. Never a path.
        #[arg(long)]
        image: Option<String>,
        /// Return once the VM process started, without waiting for ready.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for ready [default: as long as the launcher waits for this
        /// image: its boot timeout, longer for a runtime that starts slowly (OpenClaw)].
        #[arg(long)]
        timeout: Option<u64>,
        /// Make the VM snapshot-capable (QEMU boots the `pc` machine instead of
        /// `microvm`: a little slower to boot).
        #[arg(long)]
        snapshots: bool,
        /// Make the start idempotent: if the VM was last started with this key, answer
        /// the VM as it is (starting, running, stopped or failed) instead of booting it
        /// again or refusing because it runs. 1-128 characters of A-Z a-z 0-9 . _ : / -.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Total LLM tokens the VM's agent may spend (1 to 10^12), enforced by
        /// inference-proxy through the VM's agent token.
        #[arg(long, value_name = "TOKENS")]
        token_budget: Option<u64>,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List,
    /// Show one VM.
    Show { name: String },
    /// Stop a VM (clean power-off, killed after a timeout); disks are kept.
    Stop { name: String },
    /// Print a VM's console log. On a terminal, control characters the guest wrote
    /// (escape sequences) are shown as text, e.g. `\x1b`.
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Pass the guest's bytes to the terminal unchanged, escape sequences included.
        #[arg(long)]
        raw: bool,
    },
    /// Delete a stopped VM and its disks.
    Rm { name: String },
    /// Run a command in a VM; streams its output and exits with its exit code. On a
    /// terminal, control characters in its output are shown as text, e.g. `\x1b`.
    Exec {
        name: String,
        /// Pass the command's output to the terminal unchanged, escape sequences
        /// included.
        #[arg(long)]
        raw: bool,
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
    /// Both ways stream; a download lands whole or not at all (temporary file, renamed
    /// once every byte arrived).
    Cp {
        src: String,
        dst: String,
        /// Refuse a download larger than this many bytes (nothing is written).
        #[arg(long, default_value_t = DEFAULT_MAX_BYTES)]
        max_bytes: u64,
    },
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
        /// Seconds to wait for ready [default: as long as the launcher waits for this
        /// image: its boot timeout, longer for a runtime that starts slowly (OpenClaw)].
        #[arg(long)]
        timeout: Option<u64>,
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
            idempotency_key,
            token_budget,
        } => {
            let req = StartVm {
                name: name.clone(),
                model,
                mem_mib: mem,
                vcpus,
                image,
                snapshots,
                idempotency_key,
                token_budget,
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
        VmCmd::Logs { name, follow, raw } => {
            let mut offset = 0;
            let mut out = std::io::stdout();
            let safe = crate::terminal::neutralise(&out, raw);
            let mut neutralizer = crate::terminal::Neutralizer::default();
            let mut shown = Vec::new();
            loop {
                let (bytes, next) = client.console(&name, offset).await.map_err(api_exit)?;
                let show = if safe {
                    shown.clear();
                    neutralizer.feed(&bytes, &mut shown);
                    &shown
                } else {
                    &bytes
                };
                out.write_all(show).map_err(|e| Exit(1, e.into()))?;
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
            if safe {
                shown.clear();
                neutralizer.finish(&mut shown);
                out.write_all(&shown).map_err(|e| Exit(1, e.into()))?;
            }
        }
        VmCmd::Exec {
            name,
            raw,
            interactive,
            timeout,
            cwd,
            env,
            command,
        } => {
            let run = crate::exec::ExecArgs {
                interactive,
                raw,
                timeout,
                cwd,
                env,
                command,
            };
            return exec(client, &name, run).await;
        }
        VmCmd::Cp {
            src,
            dst,
            max_bytes,
        } => {
            let remote = |s: &str| -> Option<(String, String)> {
                let (vm, path) = s.split_once(':')?;
                (!vm.is_empty() && !vm.contains('/')).then(|| (vm.to_owned(), path.to_owned()))
            };
            match (remote(&src), remote(&dst)) {
                (None, Some((vm, path))) => {
                    let n = upload(client, &src, &vm, &path, max_bytes).await?;
                    if !json {
                        eprintln!("copied {n} bytes to {vm}:{path}");
                    }
                }
                (Some((vm, path)), None) => {
                    let n =
                        download(client, &vm, &path, std::path::Path::new(&dst), max_bytes).await?;
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

/// Sends local file `src` to `vm:path`, streamed from a regular file; anything else
/// (a FIFO, a device) is read first, at most `max_bytes` of it. Returns the bytes sent.
async fn upload(
    client: &LauncherClient,
    src: &str,
    vm: &str,
    path: &str,
    max_bytes: u64,
) -> Result<u64, Exit> {
    let read_err = |e: std::io::Error| Exit(1, anyhow!("read {src}: {e}"));
    let file = tokio::fs::File::open(src).await.map_err(read_err)?;
    let meta = file.metadata().await.map_err(read_err)?;
    if meta.is_file() {
        client
            .put_file_from(vm, path, file, meta.len())
            .await
            .map_err(api_exit)?;
        return Ok(meta.len());
    }
    if meta.is_dir() {
        return Err(Exit(1, anyhow!("{src} is a directory")));
    }
    let mut data = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut tokio::io::AsyncReadExt::take(file, max_bytes.saturating_add(1)),
        &mut data,
    )
    .await
    .map_err(read_err)?;
    if data.len() as u64 > max_bytes {
        return Err(Exit(
            1,
            anyhow!("{src} has more than --max-bytes {max_bytes} bytes; nothing was sent"),
        ));
    }
    let n = data.len() as u64;
    client.put_file(vm, path, data).await.map_err(api_exit)?;
    Ok(n)
}

/// Fetches `vm:path` into local `dst`, streamed: a regular file (or none) is replaced
/// only once every byte arrived, so a refused, cut or oversized download leaves `dst`
/// as it was; a device or FIFO (e.g. `/dev/null`) is written to as bytes arrive. More
/// than `max_bytes` is refused, before any byte when the launcher announces the size.
/// A directory `dst` receives the file under its own name. Returns the bytes copied.
async fn download(
    client: &LauncherClient,
    vm: &str,
    path: &str,
    dst: &std::path::Path,
    max_bytes: u64,
) -> Result<u64, Exit> {
    let mut d = client.download(vm, path).await.map_err(api_exit)?;
    let too_big = |size: String| {
        Exit(
            1,
            anyhow!(
                "{vm}:{path} is {size} bytes, more than --max-bytes {max_bytes}; nothing was written"
            ),
        )
    };
    if let Some(size) = d.size().filter(|&s| s > max_bytes) {
        return Err(too_big(size.to_string()));
    }
    let dst = match std::fs::metadata(dst) {
        Ok(m) if m.is_dir() => {
            let name = std::path::Path::new(path)
                .file_name()
                .ok_or_else(|| Exit(1, anyhow!("{vm}:{path} names no file")))?;
            dst.join(name)
        }
        _ => dst.to_owned(),
    };
    let write_err = |e: std::io::Error| Exit(1, anyhow!("write {}: {e}", dst.display()));
    enum Sink {
        Replace(clawos_service::AtomicFile),
        Device(std::fs::File),
    }
    let sink = if std::fs::metadata(&dst).is_ok_and(|m| !m.is_file()) {
        Sink::Device(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&dst)
                .map_err(write_err)?,
        )
    } else {
        // 0666 less the umask, as for any file the user creates.
        Sink::Replace(clawos_service::AtomicFile::create(&dst, 0o666).map_err(write_err)?)
    };
    let mut out: &std::fs::File = match &sink {
        Sink::Replace(a) => a.file(),
        Sink::Device(f) => f,
    };
    let mut n = 0u64;
    // Dropping `sink` on any error below removes the partial file.
    while let Some(chunk) = d.chunk().await.map_err(api_exit)? {
        n += chunk.len() as u64;
        if n > max_bytes {
            return Err(too_big(format!("more than {}", n - chunk.len() as u64)));
        }
        out.write_all(&chunk).map_err(write_err)?;
    }
    if let Sink::Replace(a) = sink {
        a.commit().map_err(write_err)?;
    }
    Ok(n)
}

/// Polls until a VM leaves `starting`, printing progress dots unless `json`.
async fn wait_ready(
    client: &LauncherClient,
    mut vm: clawos_vm_launcher_api::Vm,
    what: &str,
    timeout: Option<u64>,
    json: bool,
) -> Result<clawos_vm_launcher_api::Vm, Exit> {
    // Without a timeout of its own the CLI waits for the launcher, which fails a VM
    // that is not ready by its deadline; an hour caps a launcher that never answers.
    let timeout = timeout.unwrap_or(3600);
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A one-shot HTTP server answering the first request with `head` and `body`
    /// (then closing); returns its base URL.
    fn one_shot(head: String, body: Vec<u8>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().expect("accept");
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let _ = c.write_all(head.as_bytes());
            let _ = c.write_all(&body);
        });
        url
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn downloads_over_the_cap_are_refused_and_leave_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let dst = d.path().join("out.bin");
        let body = vec![7u8; 4096];

        // Announced too large: refused before a byte is read, nothing created.
        let url = one_shot(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()),
            body.clone(),
        );
        let c = LauncherClient::new(&url);
        let Exit(code, e) = download(&c, "vm", "f.bin", &dst, 1000)
            .await
            .expect_err("over the cap");
        assert_eq!(code, 1);
        assert!(e.to_string().contains("--max-bytes 1000"), "{e}");
        assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));

        // Not announced (the stream just goes on): refused once past the cap, and the
        // partial file is gone; an older file of that name is left as it was.
        std::fs::write(&dst, b"old").expect("old file");
        let url = one_shot(
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".into(),
            body.clone(),
        );
        let c = LauncherClient::new(&url);
        download(&c, "vm", "f.bin", &dst, 1000)
            .await
            .expect_err("over the cap");
        assert_eq!(names(d.path()), ["out.bin"]);
        assert_eq!(std::fs::read(&dst).expect("read"), b"old");

        // Cut short of the announced size: an error, the old file stays.
        let url = one_shot(
            "HTTP/1.1 200 OK\r\nContent-Length: 9999\r\n\r\n".into(),
            body.clone(),
        );
        let c = LauncherClient::new(&url);
        download(&c, "vm", "f.bin", &dst, 1 << 20)
            .await
            .expect_err("short body");
        assert_eq!(names(d.path()), ["out.bin"]);
        assert_eq!(std::fs::read(&dst).expect("read"), b"old");

        // Within the cap: the whole file replaces the old one; into a directory, under
        // its own name.
        for (target, want) in [
            (dst.clone(), dst.clone()),
            (d.path().to_owned(), d.path().join("f.bin")),
        ] {
            let url = one_shot(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()),
                body.clone(),
            );
            let c = LauncherClient::new(&url);
            let n = download(&c, "vm", "dir/f.bin", &target, 4096)
                .await
                .unwrap_or_else(|Exit(_, e)| panic!("{e}"));
            assert_eq!(n, 4096);
            assert_eq!(std::fs::read(&want).expect("read"), body);
        }
        assert_eq!(names(d.path()), ["f.bin", "out.bin"]);
    }
}
