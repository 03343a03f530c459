//! The vm-launcher REST API: one definition of its wire types, used by the server and by
//! [`LauncherClient`].
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | POST | `/v1/vms` | [`StartVm`] → 202 [`Vm`] (create if new, start if stopped; 409 if running) |
//! | GET | `/v1/vms` | → `[Vm]` |
//! | GET | `/v1/vms/{name}` | → [`Vm`] |
//! | POST | `/v1/vms/{name}/stop` | → [`Vm`] once stopped |
//! | DELETE | `/v1/vms/{name}` | → 204 (409 while running) |
//! | GET | `/v1/vms/{name}/console?offset=N` | → console bytes from N; `x-console-offset` is the next N |
//! | POST | `/v1/vms/{name}/pause`, `/resume` | → [`Vm`] |
//! | POST | `/v1/vms/{name}/snapshots` | [`CreateSnapshot`] → 201 [`Snapshot`] (memory, CPU and disks; the VM keeps running) |
//! | GET | `/v1/vms/{name}/snapshots` | → `[Snapshot]` |
//! | DELETE | `/v1/vms/{name}/snapshots/{tag}` | → 204 |
//! | POST | `/v1/vms/{name}/restore` | [`RestoreVm`] → 202 [`Vm`] (VM must be stopped; disks return to the snapshot's) |
//! | GET (WebSocket) | `/v1/vms/{name}/exec` | [`ExecStart`], stdin, → output frames, [`ExecEvent`] |
//! | GET (WebSocket) | `/v1/vms/{name}/gateway` | raw TCP to the agent gateway (guest port 18789), binary messages |
//! | PUT | `/v1/vms/{name}/files?path=P` | file bytes (Content-Length required) → 204 |
//! | GET | `/v1/vms/{name}/files?path=P` | → file bytes |
//! | GET | `/v1/vms/{name}/files?path=P&list=true` | → `[FileEntry]` |
//! | GET | `/healthz`, `/metrics` | liveness; Prometheus text |
//!
//! Exec over WebSocket: the client's first message is a text [`ExecStart`]; then binary
//! messages are stdin and a text `{"eof":true}` closes stdin. The server sends binary
//! messages whose first byte is [`STDOUT`] or [`STDERR`] followed by the bytes, and ends
//! with one text [`ExecEvent`].
//!
//! Errors are [`ApiError`] JSON with a 4xx/5xx status.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default address of the launcher.
pub const DEFAULT_URL: &str = "http://127.0.0.1:2080";
/// Header carrying the next console offset.
pub const CONSOLE_OFFSET_HEADER: &str = "x-console-offset";

/// Request to start an agent VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVm {
    /// VM name: `[a-z0-9-]`, 1–63 characters, not starting or ending with `-`.
    pub name: String,
    /// Model the agent uses (written to its `/workspace/.env`).
    #[serde(default)]
    pub model: Option<String>,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
    /// Virtual CPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Image bundle directory; the launcher's default image when absent.
    #[serde(default)]
    pub image: Option<String>,
    /// Make the VM snapshot-capable. On QEMU this boots the `pc` machine (the vsock
    /// device is hot-pluggable there, so it can be unplugged while memory is saved)
    /// instead of `microvm`, which costs some boot time. Firecracker VMs can always be
    /// snapshotted.
    #[serde(default)]
    pub snapshots: bool,
}

fn default_mem() -> u32 {
    512
}
fn default_vcpus() -> u32 {
    1
}

/// Life cycle of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The hypervisor runs; the guest has not reported ready yet.
    Starting,
    /// The guest reported ready.
    Running,
    /// vCPUs frozen (`pause`); memory kept.
    Paused,
    /// A stop was requested.
    Stopping,
    /// Not running; disks kept.
    Stopped,
    /// Ended with an error; `reason` says which.
    Failed,
}

impl VmState {
    /// Whether a hypervisor process belongs to this state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Paused | Self::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        })
    }
}

/// A VM as the launcher reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub state: VmState,
    /// Why the VM failed or stopped unexpectedly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub model: Option<String>,
    pub mem_mib: u32,
    pub vcpus: u32,
    /// Image bundle directory the VM boots.
    pub image: String,
    /// Verity root hash of the image it booted last.
    pub root_hash: String,
    /// `qemu` or `firecracker`.
    pub backend: String,
    /// Hypervisor process id while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Milliseconds from start request to the guest's ready report, last boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    /// Unix time (s) of the last start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Whether the VM was started snapshot-capable.
    #[serde(default)]
    pub snapshots: bool,
}

/// Request to snapshot a running or paused VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Snapshot name, same rules as a VM name; a time stamp when absent.
    #[serde(default)]
    pub tag: Option<String>,
}

/// Request to restore a stopped VM from one of its snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreVm {
    /// The snapshot's tag.
    pub snapshot: String,
}

/// A saved VM: guest memory and device state plus copies of its writable disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub tag: String,
    pub vm: String,
    /// Unix time (s) it was taken.
    pub created_at: u64,
    /// `qemu` or `firecracker`; a snapshot restores only on the backend that took it.
    pub backend: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    /// Verity root hash of the image the VM ran; a restore needs the same image.
    pub root_hash: String,
    /// Bytes of the saved memory and device state.
    pub state_bytes: u64,
    /// Bytes of disk data held (sparse copies: data only).
    pub disk_bytes: u64,
    /// How long the guest was frozen for the save, milliseconds.
    pub save_ms: u64,
}

/// First byte of a WebSocket binary message carrying stdout.
pub const STDOUT: u8 = 1;
/// First byte of a WebSocket binary message carrying stderr.
pub const STDERR: u8 = 2;

/// What `exec` runs in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether stdin will be sent; otherwise it is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the command (and its process group) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The end of an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecEvent {
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Error {
        message: String,
    },
}

/// A guest directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable kind: `invalid_request`, `not_found`, `conflict`,
    /// `image_refused`, `internal`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The launcher answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The launcher could not be reached or answered garbage.
    #[error("cannot talk to vm-launcher at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Transport { .. } => None,
        }
    }
}

/// A typed client for the launcher.
#[derive(Debug, Clone)]
pub struct LauncherClient {
    base: String,
    http: reqwest::Client,
}

impl LauncherClient {
    /// A client for the launcher at `base` (e.g. `http://127.0.0.1:2080`).
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let transport = |source| ClientError::Transport {
            url: self.base.clone(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(transport)?;
        let err = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
            code: "unknown".into(),
            message: String::from_utf8_lossy(&body).into_owned(),
        });
        Err(ClientError::Api {
            status,
            code: err.code,
            message: err.message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(req)
            .await?
            .json()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })
    }

    /// Creates (if new) and starts a VM.
    pub async fn start(&self, req: &StartVm) -> Result<Vm, ClientError> {
        self.json(self.http.post(self.url("/v1/vms")).json(req))
            .await
    }

    /// Lists VMs.
    pub async fn list(&self) -> Result<Vec<Vm>, ClientError> {
        self.json(self.http.get(self.url("/v1/vms"))).await
    }

    /// One VM.
    pub async fn get(&self, name: &str) -> Result<Vm, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/vms/{name}"))))
            .await
    }

    /// Stops a VM and waits until it is stopped.
    pub async fn stop(&self, name: &str) -> Result<Vm, ClientError> {
        self.json(
            self.http
                .post(self.url(&format!("/v1/vms/{name}/stop")))
                .timeout(Duration::from_secs(120)),
        )
        .await
    }

    /// Deletes a stopped VM and its disks.
    pub async fn delete(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/vms/{name}"))))
            .await
            .map(drop)
    }

    /// Freezes a running VM.
    pub async fn pause(&self, name: &str) -> Result<Vm, ClientError> {
        self.json(self.http.post(self.url(&format!("/v1/vms/{name}/pause"))))
            .await
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, name: &str) -> Result<Vm, ClientError> {
        self.json(self.http.post(self.url(&format!("/v1/vms/{name}/resume"))))
            .await
    }

    /// Snapshots a running or paused VM (it keeps its state afterwards).
    pub async fn snapshot(
        &self,
        name: &str,
        req: &CreateSnapshot,
    ) -> Result<Snapshot, ClientError> {
        self.json(
            self.http
                .post(self.url(&format!("/v1/vms/{name}/snapshots")))
                .timeout(Duration::from_secs(600))
                .json(req),
        )
        .await
    }

    /// A VM's snapshots, oldest first.
    pub async fn snapshots(&self, name: &str) -> Result<Vec<Snapshot>, ClientError> {
        self.json(
            self.http
                .get(self.url(&format!("/v1/vms/{name}/snapshots"))),
        )
        .await
    }

    /// Deletes one snapshot.
    pub async fn delete_snapshot(&self, name: &str, tag: &str) -> Result<(), ClientError> {
        self.send(
            self.http
                .delete(self.url(&format!("/v1/vms/{name}/snapshots/{tag}"))),
        )
        .await
        .map(drop)
    }

    /// Boots a stopped VM from a snapshot; its disks return to the snapshot's.
    pub async fn restore(&self, name: &str, req: &RestoreVm) -> Result<Vm, ClientError> {
        self.json(
            self.http
                .post(self.url(&format!("/v1/vms/{name}/restore")))
                .timeout(Duration::from_secs(600))
                .json(req),
        )
        .await
    }

    /// Uploads `data` to `path` in the VM's workspace.
    pub async fn put_file(&self, name: &str, path: &str, data: Vec<u8>) -> Result<(), ClientError> {
        self.send(
            self.http
                .put(self.url(&format!("/v1/vms/{name}/files")))
                .query(&[("path", path)])
                .body(data),
        )
        .await
        .map(drop)
    }

    /// Downloads `path` from the VM's workspace.
    pub async fn get_file(&self, name: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self
            .send(
                self.http
                    .get(self.url(&format!("/v1/vms/{name}/files")))
                    .query(&[("path", path)]),
            )
            .await?;
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })
    }

    /// Lists a directory in the VM's workspace.
    pub async fn list_files(&self, name: &str, path: &str) -> Result<Vec<FileEntry>, ClientError> {
        self.json(
            self.http
                .get(self.url(&format!("/v1/vms/{name}/files")))
                .query(&[("path", path), ("list", "true")]),
        )
        .await
    }

    /// The WebSocket URL of a VM's exec endpoint.
    pub fn exec_url(&self, name: &str) -> String {
        format!("{}/v1/vms/{name}/exec", self.ws_base())
    }

    /// The WebSocket URL of a VM's gateway tunnel.
    pub fn gateway_url(&self, name: &str) -> String {
        format!("{}/v1/vms/{name}/gateway", self.ws_base())
    }

    fn ws_base(&self) -> String {
        self.base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
    }

    /// Console output from byte `offset`; returns the bytes and the next offset.
    pub async fn console(&self, name: &str, offset: u64) -> Result<(Vec<u8>, u64), ClientError> {
        let resp = self
            .send(
                self.http
                    .get(self.url(&format!("/v1/vms/{name}/console?offset={offset}"))),
            )
            .await?;
        let next = resp
            .headers()
            .get(CONSOLE_OFFSET_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(offset);
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })?;
        Ok((bytes.to_vec(), next))
    }
}
