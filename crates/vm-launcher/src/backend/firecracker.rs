//! Firecracker backend: one `firecracker` process per VM, configured through its API
//! socket (`../shared/reference/firecracker-api.yaml`). Needs hardware KVM, so it is
//! chosen only where that exists.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::process::Command;

use clawos_guest_protocol::disk;

use super::{
    BackendError, BoxFuture, GUEST_CID, Hypervisor, LaunchSpec, Launched, VSOCK_SOCKET,
    connect_in_dir, log_file, wait_until_accepting,
};
use crate::store::VmDir;

/// API socket name inside the VM directory.
pub const API_SOCKET: &str = "firecracker.sock";

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    pub bin: PathBuf,
    /// Run each Firecracker under the jailer (chroot, uid/gid, cgroup v2, netns).
    pub jailer: Option<Jailer>,
}

/// Jailer settings (Firecracker's `jailer` binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailer {
    pub bin: PathBuf,
    /// Unprivileged uid and gid Firecracker runs as.
    pub uid: u32,
    pub gid: u32,
    /// `--chroot-base-dir`; each VM's chroot is `<base>/firecracker/clawos-<name>/root`.
    pub chroot_base: PathBuf,
    /// Network namespace to join (`--netns`), e.g. `/var/run/netns/clawos`.
    pub netns: Option<PathBuf>,
}

/// The files a VM boots from, as Firecracker sees them (host paths, or paths inside the
/// jailer's chroot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    pub runtime: PathBuf,
    pub workspace: PathBuf,
    pub config: PathBuf,
}

impl BootFiles {
    fn direct(spec: &LaunchSpec, vmlinux: &Path) -> Self {
        Self {
            vmlinux: vmlinux.to_owned(),
            initramfs: spec.initramfs.clone(),
            rootfs: spec.rootfs.clone(),
            runtime: spec.dir.runtime_disk(),
            workspace: spec.dir.workspace_disk(),
            config: spec.dir.config_disk(),
        }
    }
}

impl Jailer {
    fn id(name: &str) -> String {
        format!("clawos-{name}")
    }

    /// The chroot the jailer builds for a VM (it names it after the exec file).
    pub fn chroot(&self, name: &str, exec_file: &Path) -> PathBuf {
        let exe = exec_file
            .file_name()
            .map_or_else(|| "firecracker".into(), |n| n.to_owned());
        self.chroot_base.join(exe).join(Self::id(name)).join("root")
    }

    /// The jailer's argument list; the API socket is at `/firecracker.sock` in the chroot.
    pub fn args(&self, name: &str, exec_file: &Path) -> Vec<String> {
        let mut a = vec![
            "--id".to_owned(),
            Self::id(name),
            "--exec-file".to_owned(),
            exec_file.display().to_string(),
            "--uid".to_owned(),
            self.uid.to_string(),
            "--gid".to_owned(),
            self.gid.to_string(),
            "--chroot-base-dir".to_owned(),
            self.chroot_base.display().to_string(),
            "--cgroup-version".to_owned(),
            "2".to_owned(),
        ];
        if let Some(ns) = &self.netns {
            a.extend(["--netns".to_owned(), ns.display().to_string()]);
        }
        a.extend([
            "--".to_owned(),
            "--api-sock".to_owned(),
            format!("/{API_SOCKET}"),
        ]);
        a
    }

    /// Links the VM's files into its chroot (hard links: the jailed process can see
    /// nothing else) and hands the writable ones to the jail's uid/gid. Returns the
    /// files as Firecracker will name them.
    pub fn prepare(
        &self,
        spec: &LaunchSpec,
        vmlinux: &Path,
        exec_file: &Path,
    ) -> Result<BootFiles, BackendError> {
        let root = self.chroot(&spec.name, exec_file);
        let err = |what: &str, e: std::io::Error| BackendError::Control {
            backend: "firecracker",
            detail: format!("jailer chroot {}: {what}: {e}", root.display()),
        };
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(|e| err("create", e))?;
        let files = [
            ("vmlinux", vmlinux.to_owned(), false),
            ("initramfs.cpio.gz", spec.initramfs.clone(), false),
            ("rootfs.img", spec.rootfs.clone(), false),
            ("runtime.img", spec.dir.runtime_disk(), true),
            ("workspace.img", spec.dir.workspace_disk(), true),
            ("config.img", spec.dir.config_disk(), false),
        ];
        for (name, src, writable) in &files {
            let dst = root.join(name);
            if std::fs::hard_link(src, &dst).is_err() {
                if *writable {
                    // A copy of a writable disk would fork the VM's state.
                    return Err(err(
                        &format!(
                            "{} must be on the chroot's filesystem to be hard-linked",
                            src.display()
                        ),
                        std::io::Error::from(std::io::ErrorKind::CrossesDevices),
                    ));
                }
                std::fs::copy(src, &dst).map_err(|e| err(name, e))?;
            }
            if *writable {
                std::os::unix::fs::chown(&dst, Some(self.uid), Some(self.gid))
                    .map_err(|e| err(name, e))?;
            }
        }
        std::os::unix::fs::chown(&root, Some(self.uid), Some(self.gid))
            .map_err(|e| err("chown", e))?;
        let inside = |n: &str| PathBuf::from("/").join(n);
        Ok(BootFiles {
            vmlinux: inside("vmlinux"),
            initramfs: inside("initramfs.cpio.gz"),
            rootfs: inside("rootfs.img"),
            runtime: inside("runtime.img"),
            workspace: inside("workspace.img"),
            config: inside("config.img"),
        })
    }
}

fn fc_err(detail: impl std::fmt::Display) -> BackendError {
    BackendError::Control {
        backend: "firecracker",
        detail: detail.to_string(),
    }
}

/// The API requests that configure and boot one VM, in order: `(path, body)`, all PUT.
pub fn boot_requests(spec: &LaunchSpec, files: &BootFiles) -> Vec<(String, Value)> {
    let mut reqs = vec![
        (
            "/machine-config".to_owned(),
            json!({ "vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib, "smt": false }),
        ),
        (
            "/boot-source".to_owned(),
            json!({
                "kernel_image_path": files.vmlinux,
                "initrd_path": files.initramfs,
                // Firecracker has no pvpanic: a guest panic reboots, which ends the VM.
                "boot_args": format!("console=ttyS0 reboot=k pci=off {}", spec.image_cmdline),
            }),
        ),
    ];
    // Firecracker reports the drive id as the virtio-blk serial, which is how
    // clawos-init finds each disk.
    let drives = [
        (disk::ROOTFS, files.rootfs.clone(), true),
        (disk::RUNTIME, files.runtime.clone(), false),
        (disk::WORKSPACE, files.workspace.clone(), false),
        (disk::CONFIG, files.config.clone(), true),
    ];
    for (id, path, ro) in drives {
        reqs.push((
            format!("/drives/{id}"),
            json!({ "drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": ro }),
        ));
    }
    // Firecracker's native hybrid vsock; the path is relative to its working directory
    // (the VM directory), which keeps it under the 108-byte socket path limit.
    reqs.push((
        "/vsock".to_owned(),
        json!({ "guest_cid": GUEST_CID, "uds_path": VSOCK_SOCKET }),
    ));
    reqs.push((
        "/actions".to_owned(),
        json!({ "action_type": "InstanceStart" }),
    ));
    reqs
}

/// The stop request: Ctrl-Alt-Del reaches clawos-init as SIGINT; it powers off cleanly.
pub fn stop_request() -> (String, Value) {
    (
        "/actions".into(),
        json!({ "action_type": "SendCtrlAltDel" }),
    )
}

/// `PATCH /vm` body that pauses (`true`) or resumes the guest.
pub fn pause_request(pause: bool) -> (String, Value) {
    (
        "/vm".into(),
        json!({ "state": if pause { "Paused" } else { "Resumed" } }),
    )
}

/// `PUT /snapshot/create`: a full snapshot into `snap` (relative to Firecracker's
/// working directory, the VM directory).
pub fn snapshot_create_request(snap: &str) -> (String, Value) {
    (
        "/snapshot/create".into(),
        json!({
            "snapshot_type": "Full",
            "snapshot_path": format!("{snap}/{}", crate::snapshot::FC_VMSTATE),
            "mem_file_path": format!("{snap}/{}", crate::snapshot::FC_MEMORY),
        }),
    )
}

/// `PUT /snapshot/load`: the state and memory in `snap`, running the guest at once.
pub fn snapshot_load_request(snap: &str) -> (String, Value) {
    (
        "/snapshot/load".into(),
        json!({
            "snapshot_path": format!("{snap}/{}", crate::snapshot::FC_VMSTATE),
            "mem_backend": {
                "backend_type": "File",
                "backend_path": format!("{snap}/{}", crate::snapshot::FC_MEMORY),
            },
            "resume_vm": true,
        }),
    )
}

/// Every call this backend makes, as `(method, path, body)`: what the API-spec test
/// validates.
pub fn all_calls(spec: &LaunchSpec, files: &BootFiles) -> Vec<(&'static str, String, Value)> {
    let mut calls: Vec<_> = boot_requests(spec, files)
        .into_iter()
        .map(|(p, b)| ("put", p, b))
        .collect();
    let (p, b) = stop_request();
    calls.push(("put", p, b));
    for pause in [true, false] {
        let (p, b) = pause_request(pause);
        calls.push(("patch", p, b));
    }
    let (p, b) = snapshot_create_request("snapshots/.t1.saving");
    calls.push(("put", p, b));
    let (p, b) = snapshot_load_request("snapshots/t1");
    calls.push(("put", p, b));
    calls
}

/// One PUT on the API socket.
async fn api_put(sockets: &Path, path: &str, body: &Value) -> Result<(), BackendError> {
    api_request(sockets, hyper::Method::PUT, path, body).await
}

/// One request on the API socket.
async fn api_request(
    sockets: &Path,
    method: hyper::Method,
    path: &str,
    body: &Value,
) -> Result<(), BackendError> {
    let stream = connect_in_dir(sockets, API_SOCKET).await.map_err(fc_err)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(fc_err)?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method.clone())
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(fc_err)?;
    let resp = sender.send_request(req).await.map_err(fc_err)?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(fc_err(format!(
            "{method} {path}: {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(())
}

impl Firecracker {
    /// Starts a Firecracker process for `dir` and waits for its API socket (not jailed).
    async fn spawn_direct(&self, spec: &LaunchSpec) -> Result<tokio::process::Child, BackendError> {
        let console = log_file(&spec.dir.console())?;
        let log = log_file(&spec.dir.hypervisor_log())?;
        let _ = std::fs::remove_file(spec.dir.root.join(API_SOCKET));
        let mut child = Command::new(&self.bin)
            .args(["--api-sock", API_SOCKET, "--id"])
            .arg(format!("clawos-{}", spec.name))
            .current_dir(&spec.dir.root)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| BackendError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        if let Err(why) = wait_until_accepting(
            &spec.dir.root,
            API_SOCKET,
            &mut child,
            Duration::from_secs(5),
        )
        .await
        {
            let _ = child.start_kill();
            return Err(fc_err(format!("Firecracker: {why} (see hypervisor.log)")));
        }
        Ok(child)
    }

    /// Where a VM's API and vsock sockets are: its chroot when jailed, else its directory.
    pub fn socket_dir(&self, dir: &VmDir) -> PathBuf {
        match &self.jailer {
            Some(j) => {
                let name = dir
                    .root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                j.chroot(&name, &self.bin)
            }
            None => dir.root.clone(),
        }
    }
}

impl Hypervisor for Firecracker {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Launched, BackendError>> {
        Box::pin(async move {
            let vmlinux = spec.vmlinux.clone().ok_or_else(|| {
                BackendError::Unsupported(
                    "firecracker boots an ELF vmlinux and this image has none: rebuild it with `clawos image build --vmlinux`".into(),
                )
            })?;
            // Firecracker opens its drives by path: a link to exactly the checked rootfs.
            let mut spec = spec.clone();
            spec.rootfs = super::rootfs_path(&spec)?;
            let spec = &spec;
            let sockets = self.socket_dir(&spec.dir);
            let (mut child, files) = match &self.jailer {
                Some(j) => {
                    let files = j.prepare(spec, &vmlinux, &self.bin)?;
                    let console = log_file(&spec.dir.console())?;
                    let log = log_file(&spec.dir.hypervisor_log())?;
                    let _ = std::fs::remove_file(sockets.join(API_SOCKET));
                    let mut child = Command::new(&j.bin)
                        .args(j.args(&spec.name, &self.bin))
                        .stdin(Stdio::null())
                        // The guest's serial console is Firecracker's stdout.
                        .stdout(console)
                        .stderr(log)
                        .process_group(0)
                        .spawn()
                        .map_err(|source| BackendError::Spawn {
                            bin: j.bin.clone(),
                            source,
                        })?;
                    if let Err(why) = wait_until_accepting(
                        &sockets,
                        API_SOCKET,
                        &mut child,
                        Duration::from_secs(5),
                    )
                    .await
                    {
                        let _ = child.start_kill();
                        return Err(fc_err(format!("Firecracker: {why} (see hypervisor.log)")));
                    }
                    (child, files)
                }
                None => (
                    self.spawn_direct(spec).await?,
                    BootFiles::direct(spec, &vmlinux),
                ),
            };
            for (path, body) in boot_requests(spec, &files) {
                if let Err(e) = api_put(&sockets, &path, &body).await {
                    let _ = child.start_kill();
                    return Err(e);
                }
            }
            Ok(Launched {
                child,
                helpers: Vec::new(),
                vsock: true,
                socket_dir: self.jailer.as_ref().map(|_| sockets),
            })
        })
    }

    fn request_stop<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let (path, body) = stop_request();
            api_put(&self.socket_dir(dir), &path, &body).await
        })
    }

    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let (path, body) = pause_request(true);
            api_request(&self.socket_dir(dir), hyper::Method::PATCH, &path, &body).await
        })
    }

    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let (path, body) = pause_request(false);
            api_request(&self.socket_dir(dir), hyper::Method::PATCH, &path, &body).await
        })
    }

    fn snapshot_unsupported(&self, _snapshots: bool) -> Option<String> {
        self.jailer.as_ref().map(|_| {
            "snapshots of jailed Firecracker VMs are not supported yet (the state files \
             would have to be moved in and out of the chroot)"
                .into()
        })
    }

    fn save<'a>(
        &'a self,
        dir: &'a VmDir,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(async move {
            let sockets = self.socket_dir(dir);
            let (path, body) = pause_request(true);
            api_request(&sockets, hyper::Method::PATCH, &path, &body).await?;
            let (path, body) = snapshot_create_request(snap);
            api_put(&sockets, &path, &body).await?;
            let size =
                |f: &str| std::fs::metadata(dir.root.join(snap).join(f)).map_or(0, |m| m.len());
            Ok(size(crate::snapshot::FC_VMSTATE) + size(crate::snapshot::FC_MEMORY))
        })
    }

    fn after_save<'a>(
        &'a self,
        dir: &'a VmDir,
        helpers: &'a [crate::host::ProcessId],
        resume: bool,
    ) -> BoxFuture<'a, Result<Vec<crate::host::ProcessId>, BackendError>> {
        Box::pin(async move {
            if resume {
                let (path, body) = pause_request(false);
                api_request(&self.socket_dir(dir), hyper::Method::PATCH, &path, &body).await?;
            }
            Ok(helpers.to_vec())
        })
    }

    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<Launched, BackendError>> {
        Box::pin(async move {
            if let Some(why) = self.snapshot_unsupported(true) {
                return Err(BackendError::Unsupported(why));
            }
            let mut spec = spec.clone();
            spec.rootfs = super::rootfs_path(&spec)?;
            let spec = &spec;
            // Firecracker binds the saved vsock path again on load.
            let _ = std::fs::remove_file(spec.dir.root.join(VSOCK_SOCKET));
            let mut child = self.spawn_direct(spec).await?;
            let (path, body) = snapshot_load_request(snap);
            if let Err(e) = api_put(&spec.dir.root, &path, &body).await {
                let _ = child.start_kill();
                return Err(e);
            }
            Ok(Launched {
                child,
                helpers: Vec::new(),
                vsock: true,
                socket_dir: None,
            })
        })
    }

    fn cleanup(&self, dir: &VmDir) {
        if let Some(j) = &self.jailer {
            let name = dir
                .root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // The chroot holds only hard links; the VM's disks stay in its directory.
            if let Some(jail) = j.chroot(&name, &self.bin).parent() {
                let _ = std::fs::remove_dir_all(jail);
            }
            let _ =
                std::fs::remove_dir(format!("/sys/fs/cgroup/firecracker/{}", Jailer::id(&name)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_requests_match_the_api_shapes() {
        let spec = LaunchSpec {
            name: "a".into(),
            dir: VmDir {
                root: "/s/vms/a".into(),
            },
            mem_mib: 256,
            vcpus: 1,
            kernel: "/img/vmlinuz".into(),
            vmlinux: Some("/img/vmlinux".into()),
            initramfs: "/img/initramfs.cpio.gz".into(),
            rootfs: "/img/rootfs.img".into(),
            rootfs_fd: None,
            image_cmdline: "panic=-1".into(),
            snapshots: false,
        };
        let reqs = boot_requests(&spec, &BootFiles::direct(&spec, Path::new("/img/vmlinux")));
        let paths: Vec<&str> = reqs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/machine-config",
                "/boot-source",
                "/drives/rootfs",
                "/drives/runtime",
                "/drives/workspace",
                "/drives/config",
                "/vsock",
                "/actions"
            ]
        );
        // Required fields per the spec's schemas.
        assert_eq!(reqs[0].1["vcpu_count"], 1);
        assert_eq!(reqs[0].1["mem_size_mib"], 256);
        assert_eq!(reqs[1].1["kernel_image_path"], "/img/vmlinux");
        for (_, d) in &reqs[2..6] {
            for f in ["drive_id", "is_root_device"] {
                assert!(d.get(f).is_some(), "{d} lacks {f}");
            }
        }
        assert_eq!(reqs[2].1["is_read_only"], true);
        assert_eq!(reqs[6].1["guest_cid"], 3);
        assert_eq!(reqs[7].1["action_type"], "InstanceStart");
    }
}

#[cfg(test)]
mod jailer_tests {
    use super::*;

    fn jailer(base: &Path) -> Jailer {
        Jailer {
            bin: "/usr/bin/jailer".into(),
            uid: 123,
            gid: 456,
            chroot_base: base.to_owned(),
            netns: Some("/var/run/netns/clawos".into()),
        }
    }

    #[test]
    fn jailer_args_drop_privileges_into_a_chroot_with_cgroup_v2() {
        let j = jailer(Path::new("/srv/jail"));
        let a = j
            .args("agent-1", Path::new("/usr/bin/firecracker"))
            .join(" ");
        assert_eq!(
            a,
            "--id clawos-agent-1 --exec-file /usr/bin/firecracker --uid 123 --gid 456 --chroot-base-dir /srv/jail --cgroup-version 2 --netns /var/run/netns/clawos -- --api-sock /firecracker.sock"
        );
        assert_eq!(
            j.chroot("agent-1", Path::new("/usr/bin/firecracker")),
            PathBuf::from("/srv/jail/firecracker/clawos-agent-1/root")
        );
    }

    #[test]
    fn chroot_holds_links_to_exactly_the_vm_files() {
        let t = tempfile::tempdir().expect("tmp");
        let vm = t.path().join("vms/a");
        std::fs::create_dir_all(&vm).expect("mkdir");
        let img = t.path().join("img");
        std::fs::create_dir_all(&img).expect("mkdir");
        for f in ["vmlinux", "initramfs.cpio.gz", "rootfs.img"] {
            std::fs::write(img.join(f), f).expect("write");
        }
        for f in ["runtime.img", "workspace.img", "config.img"] {
            std::fs::write(vm.join(f), f).expect("write");
        }
        let spec = LaunchSpec {
            name: "a".into(),
            dir: VmDir { root: vm.clone() },
            mem_mib: 128,
            vcpus: 1,
            kernel: img.join("vmlinuz"),
            vmlinux: Some(img.join("vmlinux")),
            initramfs: img.join("initramfs.cpio.gz"),
            rootfs: img.join("rootfs.img"),
            rootfs_fd: None,
            image_cmdline: String::new(),
            snapshots: false,
        };
        // Our own uid/gid, so the test needs no privileges.
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let j = Jailer {
            uid,
            gid,
            ..jailer(&t.path().join("jail"))
        };
        let fc = Path::new("/usr/bin/firecracker");
        let files = j.prepare(&spec, &img.join("vmlinux"), fc).expect("prepare");
        assert_eq!(files.workspace, PathBuf::from("/workspace.img"));
        let root = j.chroot("a", fc);
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .expect("chroot")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "config.img",
                "initramfs.cpio.gz",
                "rootfs.img",
                "runtime.img",
                "vmlinux",
                "workspace.img"
            ]
        );
        // Hard links: the guest's writes land in the VM's own disk.
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).expect("meta").ino();
        assert_eq!(
            ino(&root.join("workspace.img")),
            ino(&vm.join("workspace.img"))
        );
        // Every request stays valid with chroot-relative paths.
        let reqs = boot_requests(&spec, &files);
        assert_eq!(reqs[1].1["kernel_image_path"], "/vmlinux");
        assert_eq!(reqs[4].1["path_on_host"], "/workspace.img");
        let fc_backend = Firecracker {
            bin: fc.into(),
            jailer: Some(j),
        };
        assert_eq!(fc_backend.socket_dir(&spec.dir), root);
        fc_backend.cleanup(&spec.dir);
        assert!(!root.exists());
        assert!(
            vm.join("workspace.img").exists(),
            "cleanup never touches the VM's disks"
        );
    }
}
