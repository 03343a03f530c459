//! What connects a running VM to the host's other services: the LLM relay (guest
//! `127.0.0.1:11435` → vsock → inference-proxy), the guest's syscall audit stream (→
//! monitor-daemon's guest socket), and the registration of the VM's host processes
//! with monitor-daemon. A VM's relays live in one task its supervisor ends with it.

use std::path::{Path, PathBuf};

use clawos_guest_protocol::{AUDIT_PORT, PROXY_PORT};
use tokio::task::JoinHandle;

use crate::backend::{VSOCK_SOCKET, bind_in_dir};
use crate::config::Config;
use crate::names::VmName;
use crate::store::VmRecord;

/// Starts the VM's host-side relays in `sockets` (its directory, or a jailed
/// Firecracker's chroot): LLM traffic always, the audit stream when a monitor is
/// configured.
pub fn start(cfg: &Config, name: &VmName, sockets: PathBuf) -> JoinHandle<()> {
    let proxy = proxy_relay(sockets.clone(), cfg.inference_proxy_authority.clone());
    let audit = cfg
        .monitor_url
        .is_some()
        .then(|| audit_relay(sockets, name.clone(), cfg.state_dir.clone()));
    tokio::spawn(async move {
        tokio::join!(proxy, async {
            if let Some(a) = audit {
                a.await;
            }
        });
    })
}

/// Removes the relays' sockets once the VM has ended.
pub fn remove_sockets(dir: &Path) {
    for port in [PROXY_PORT, AUDIT_PORT] {
        let _ = std::fs::remove_file(dir.join(format!("{VSOCK_SOCKET}_{port}")));
    }
}

/// Relays the guest's syscall audit stream (its `clawos-audit` connects to host vsock
/// port 2084, which arrives on `<vsock>_2084` here) to monitor-daemon's guest socket.
/// The header line names the VM: the guest cannot choose where its events are filed.
/// A monitor that is down ends the guest's connection; the guest queues and retries.
async fn audit_relay(dir: PathBuf, vm: VmName, state_dir: PathBuf) {
    use tokio::io::AsyncWriteExt;
    let listener = match bind_in_dir(&dir, &format!("{VSOCK_SOCKET}_{AUDIT_PORT}")) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(vm = %vm, dir = %dir.display(), error = %e, "guest audit relay not available");
            return;
        }
    };
    let socket = clawos_monitor_api::guest_socket_path(&state_dir);
    let token_path = clawos_monitor_api::token_path(&state_dir);
    loop {
        let Ok((mut guest, _)) = listener.accept().await else {
            continue;
        };
        let (vm, socket, token_path) = (vm.clone(), socket.clone(), token_path.clone());
        tokio::spawn(async move {
            let token = match tokio::fs::read_to_string(&token_path).await {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    tracing::warn!(vm = %vm, path = %token_path.display(), error = %e, "no monitor-daemon token; guest audit stream waits");
                    return;
                }
            };
            let mut monitor = match tokio::net::UnixStream::connect(&socket).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(vm = %vm, socket = %socket.display(), error = %e, "monitor-daemon not taking guest streams; the guest queues");
                    return;
                }
            };
            let header = clawos_monitor_api::GuestStreamHeader {
                token,
                agent: vm.to_string(),
                vm: vm.to_string(),
            };
            let mut line = serde_json::to_vec(&header).unwrap_or_default();
            line.push(b'\n');
            // Both ways: records to the monitor, its acknowledgements back.
            if monitor.write_all(&line).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut guest, &mut monitor).await;
            }
        });
    }
}

/// Relays guest connections to the inference proxy: the guest agent forwards its
/// `127.0.0.1:11435` to host vsock port 11435, which arrives on `<vsock>_11435` here.
async fn proxy_relay(dir: PathBuf, target: String) {
    let listener = match bind_in_dir(&dir, &format!("{VSOCK_SOCKET}_{PROXY_PORT}")) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "LLM relay not available");
            return;
        }
    };
    loop {
        let Ok((mut guest, _)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(&target).await {
                Ok(mut upstream) => {
                    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
                }
                Err(e) => {
                    tracing::warn!(%target, error = %e, "inference proxy unreachable for a guest connection")
                }
            }
        });
    }
}

/// Asks monitor-daemon (when configured) to audit the VM's hypervisor and helper
/// processes, tagged with the VM's name. Best effort: a monitor that is down is
/// logged, the VM runs regardless.
pub fn register_with_monitor(cfg: &Config, record: &VmRecord) {
    let Some(url) = cfg.monitor_url.clone() else {
        return;
    };
    let token_path = clawos_monitor_api::token_path(&cfg.state_dir);
    let pids: Vec<u32> = record
        .process
        .iter()
        .chain(record.helpers.iter())
        .map(|p| p.pid)
        .collect();
    let name = record.name.clone();
    tokio::spawn(async move {
        let token = match std::fs::read_to_string(&token_path) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, path = %token_path.display(), "no monitor-daemon token; VM not audited");
                return;
            }
        };
        let client = clawos_monitor_api::MonitorClient::new(&url, &token);
        for pid in pids {
            let req = clawos_monitor_api::WatchRequest {
                pid: Some(pid),
                cgroup: None,
                agent: name.clone(),
                vm: Some(name.clone()),
            };
            match client.watch(&req).await {
                Ok(()) => tracing::info!(vm = %name, pid, "registered with monitor-daemon"),
                Err(e) => {
                    tracing::warn!(vm = %name, pid, error = %e, "monitor-daemon registration failed")
                }
            }
        }
    });
}
