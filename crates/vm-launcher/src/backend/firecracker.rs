//! Firecracker backend: one `firecracker` process per VM, configured through its API
//! socket (`../shared/reference/firecracker-api.yaml`). Needs hardware KVM, so it is
//! chosen only where that exists.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::process::Command;

use clawos_guest::disk;

use super::{
    BackendError, BoxFuture, GUEST_CID, Hypervisor, LaunchSpec, Launched, VSOCK_SOCKET,
    connect_in_dir, log_file,
};
use crate::store::VmDir;

/// API socket name inside the VM directory.
pub const API_SOCKET: &str = "firecracker.sock";

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    pub bin: PathBuf,
}

fn fc_err(detail: impl std::fmt::Display) -> BackendError {
    BackendError::Control {
        backend: "firecracker",
        detail: detail.to_string(),
    }
}

/// The API requests that configure and boot one VM, in order: `(path, body)`, all PUT.
pub fn boot_requests(spec: &LaunchSpec, vmlinux: &std::path::Path) -> Vec<(String, Value)> {
    let mut reqs = vec![
        (
            "/machine-config".to_owned(),
            json!({ "vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib, "smt": false }),
        ),
        (
            "/boot-source".to_owned(),
            json!({
                "kernel_image_path": vmlinux,
                "initrd_path": spec.initramfs,
                // Firecracker has no pvpanic: a guest panic reboots, which ends the VM.
                "boot_args": format!("console=ttyS0 reboot=k pci=off {}", spec.image_cmdline),
            }),
        ),
    ];
    // Firecracker reports the drive id as the virtio-blk serial, which is how
    // clawos-init finds each disk.
    let drives = [
        (disk::ROOTFS, spec.rootfs.clone(), true),
        (disk::RUNTIME, spec.dir.runtime_disk(), false),
        (disk::WORKSPACE, spec.dir.workspace_disk(), false),
        (disk::CONFIG, spec.dir.config_disk(), true),
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

/// Every call this backend makes, as `(method, path, body)`: what the API-spec test
/// validates.
pub fn all_calls(
    spec: &LaunchSpec,
    vmlinux: &std::path::Path,
) -> Vec<(&'static str, String, Value)> {
    let mut calls: Vec<_> = boot_requests(spec, vmlinux)
        .into_iter()
        .map(|(p, b)| ("put", p, b))
        .collect();
    let (p, b) = stop_request();
    calls.push(("put", p, b));
    for pause in [true, false] {
        let (p, b) = pause_request(pause);
        calls.push(("patch", p, b));
    }
    calls
}

/// One PUT on the API socket.
async fn api_put(dir: &VmDir, path: &str, body: &Value) -> Result<(), BackendError> {
    api_request(dir, hyper::Method::PUT, path, body).await
}

/// One request on the API socket.
async fn api_request(
    dir: &VmDir,
    method: hyper::Method,
    path: &str,
    body: &Value,
) -> Result<(), BackendError> {
    let stream = connect_in_dir(&dir.root, API_SOCKET)
        .await
        .map_err(fc_err)?;
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
            let console = log_file(&spec.dir.console())?;
            let log = log_file(&spec.dir.hypervisor_log())?;
            let _ = std::fs::remove_file(spec.dir.root.join(API_SOCKET));
            let mut child = Command::new(&self.bin)
                .args(["--api-sock", API_SOCKET, "--id"])
                .arg(format!("clawos-{}", spec.name))
                .current_dir(&spec.dir.root)
                .stdin(Stdio::null())
                // The guest's serial console is Firecracker's stdout.
                .stdout(console)
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(|source| BackendError::Spawn {
                    bin: self.bin.clone(),
                    source,
                })?;
            let sock = spec.dir.root.join(API_SOCKET);
            for _ in 0..100 {
                if sock.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for (path, body) in boot_requests(spec, &vmlinux) {
                if let Err(e) = api_put(&spec.dir, &path, &body).await {
                    let _ = child.start_kill();
                    return Err(e);
                }
            }
            Ok(Launched {
                child,
                helpers: Vec::new(),
                vsock: true,
            })
        })
    }

    fn request_stop<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        // Ctrl-Alt-Del reaches clawos-init as SIGINT; it powers off cleanly.
        Box::pin(async move {
            let (path, body) = stop_request();
            api_put(dir, &path, &body).await
        })
    }

    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let (path, body) = pause_request(true);
            api_request(dir, hyper::Method::PATCH, &path, &body).await
        })
    }

    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let (path, body) = pause_request(false);
            api_request(dir, hyper::Method::PATCH, &path, &body).await
        })
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
            image_cmdline: "panic=-1".into(),
        };
        let reqs = boot_requests(&spec, std::path::Path::new("/img/vmlinux"));
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
