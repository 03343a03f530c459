//! The vm-launcher REST API: one definition of its routes ([`routes`]) and wire types,
//! used by the server and by [`LauncherClient`], whose WebSocket clients ([`exec`],
//! [`tunnel`]) run commands in a VM and tunnel TCP to its agent gateway.
//!
//! | route | body → answer |
//! |---|---|
//! | [`routes::START`] `POST /v1/vms` | [`StartVm`] → 202 [`Vm`] (create if new, start if stopped; 409 if running; with an `idempotency_key` equal to the VM's recorded one: 202 with the VM as it is now, never a second boot) |
//! | [`routes::LIST`] `GET /v1/vms` | → `[Vm]` |
//! | [`routes::GET`] `GET /v1/vms/{name}` | → [`Vm`] |
//! | [`routes::STOP`] `POST /v1/vms/{name}/stop` | → [`Vm`] once stopped |
//! | [`routes::DELETE`] `DELETE /v1/vms/{name}` | → 204 (409 while running) |
//! | [`routes::CONSOLE`] `GET /v1/vms/{name}/console?offset=N` | → console bytes from N; `x-console-offset` is the next N |
//! | [`routes::PAUSE`], [`routes::RESUME`] `POST /v1/vms/{name}/pause`, `/resume` | → [`Vm`] |
//! | [`routes::CREATE_SNAPSHOT`] `POST /v1/vms/{name}/snapshots` | [`CreateSnapshot`] → 201 [`Snapshot`] (memory, CPU and disks; the VM keeps running) |
//! | [`routes::LIST_SNAPSHOTS`] `GET /v1/vms/{name}/snapshots` | → `[Snapshot]` |
//! | [`routes::DELETE_SNAPSHOT`] `DELETE /v1/vms/{name}/snapshots/{tag}` | → 204 |
//! | [`routes::RESTORE`] `POST /v1/vms/{name}/restore` | [`RestoreVm`] → 202 [`Vm`] (VM must be stopped; disks return to the snapshot's) |
//! | [`routes::EXEC`] `GET /v1/vms/{name}/exec` (WebSocket) | [`ExecStart`], stdin, → output frames, [`ExecEvent`] |
//! | [`routes::GATEWAY`] `GET /v1/vms/{name}/gateway` (WebSocket) | raw TCP to the agent gateway (guest port 18789), binary messages |
//! | [`routes::PUT_FILE`] `PUT /v1/vms/{name}/files?path=P` | file bytes (`application/octet-stream`, Content-Length required) → 204 |
//! | [`routes::GET_FILE`] `GET /v1/vms/{name}/files?path=P` | → file bytes; with `&list=true` → `[FileEntry]` |
//! | [`routes::AGENT_CHAT`] `POST /v1/vms/{name}/agent/chat/completions` | the agent API's chat request (`clawos_agentd_api`) → its answer, JSON or `text/event-stream`, as the VM's runtime gives it (for an `openclaw` VM the task may not name a model: 400) |
//! | [`routes::AGENT_SESSIONS`] `GET /v1/vms/{name}/agent/sessions` | → the runtime's session list (409 for an `openclaw` VM, which keeps its sessions in its own state) |
//! | [`routes::HEALTHZ`], [`routes::METRICS`] | liveness; Prometheus text |
//!
//! Every route but `/healthz` and `/metrics` needs the operator credential,
//! `Authorization: Bearer <token>` ([`token_path`], 0600, made by the launcher at its
//! first start; [`LauncherClient::with_token`]); WebSocket upgrades too. Requests must
//! name a loopback `Host`, carry no foreign `Origin` (403 otherwise), and send bodies
//! as `application/json` ([`UPLOAD_CONTENT_TYPE`] for uploads; 415 otherwise).
//!
//! Exec over WebSocket: the client's first message is a text [`ExecStart`]; then binary
//! messages are stdin and a text `{"eof":true}` closes stdin. The server sends binary
//! messages whose first byte is [`STDOUT`] or [`STDERR`] followed by the bytes, and ends
//! with one text [`ExecEvent`].
//!
//! **Idempotent starts.** A [`StartVm`] may carry an `idempotency_key` (1–128 characters
//! of `A-Z a-z 0-9 . _ : / -`; 400 otherwise). The launcher records the key of the start
//! that booted a VM ([`Vm::idempotency_key`], kept across launcher restarts). A start
//! whose key equals it answers 202 with the VM as it is now — starting, running,
//! stopped or failed: that attempt is over and is not booted again — instead of 409.
//! Concurrent starts with the same key boot once: the others wait for the first (at
//! most [`IDEMPOTENT_WAIT_SECS`], then 409) and answer what it made; the key is
//! recorded only once a hypervisor was launched, so if the first start answered an
//! error (an image refused, say), the next one tries again. A start with another key,
//! or none, behaves as without keys (409 while the VM is active, a new boot
//! otherwise) and replaces the recorded key with its own.
//!
//! **Token budget.** A [`StartVm`] may carry a `token_budget` (1 to
//! [`MAX_TOKEN_BUDGET`] LLM tokens; 400 otherwise). The launcher records it
//! ([`Vm::token_budget`]) and puts it in every agent token it holds for the VM as the
//! scope `clawos.budget.total:<N>`; inference-proxy then lets the VM's agent spend at
//! most `N` tokens in total (less if the proxy's own total budget is lower). The token
//! never enters the VM, so the guest cannot raise its budget.
//!
//! Errors are [`ErrorBody`] with a 4xx/5xx status; an image the launcher refuses to
//! boot answers 422 with one of the `image_*` codes of `clawos_api::code`, naming what
//! failed (signature, hash, size, pinned root hash).

pub mod agent;
mod client;
pub mod exec;
pub mod tunnel;

use serde::{Deserialize, Serialize};

pub use agent::{AgentEvent, AgentStream, AgentStreamError};
pub use clawos_api::{ClientError, ErrorBody};
pub use client::{Download, LauncherClient};
pub use exec::{ExecError, ExecStatus, WebSocket};
pub use tunnel::TunnelError;

/// Default address of the launcher.
pub const DEFAULT_URL: &str = "http://127.0.0.1:2080";
/// Header carrying the next console offset.
pub const CONSOLE_OFFSET_HEADER: &str = "x-console-offset";
/// `Content-Type` of a [`routes::PUT_FILE`] body; every other body is
/// `application/json`. The launcher refuses others (415).
pub const UPLOAD_CONTENT_TYPE: &str = "application/octet-stream";
/// Longest an idempotent start waits for a start with the same key still in progress
/// before it answers 409.
pub const IDEMPOTENT_WAIT_SECS: u64 = 120;
/// Largest [`StartVm::token_budget`]: 10^12 tokens.
pub const MAX_TOKEN_BUDGET: u64 = 1_000_000_000_000;
/// Longest [`StartVm::idempotency_key`].
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Whether `key` is a valid [`StartVm::idempotency_key`]: 1–128 characters of
/// `A-Z a-z 0-9 . _ : / -`.
pub fn valid_idempotency_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
}

/// Environment variable naming the operator credential file, for the launcher
/// (`--token-path`) and its clients alike.
pub const TOKEN_PATH_ENV: &str = "CLAWOS_LAUNCHER_TOKEN_PATH";

/// Where a state directory keeps the launcher's operator credential (0600, made by the
/// launcher at its first start).
pub fn token_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("launcher/admin.token")
}

/// The local operator's credential: the file `$CLAWOS_LAUNCHER_TOKEN_PATH` names, else
/// [`token_path`] of `state_dir`. The error names the file and why it could not be read.
pub fn local_token(state_dir: &std::path::Path) -> Result<String, String> {
    clawos_api::local_token(TOKEN_PATH_ENV, &token_path(state_dir))
}

/// The route table, mounted by the daemon and called by [`LauncherClient`]. `{name}` is
/// a VM's name, `{tag}` a snapshot's.
pub mod routes {
    use clawos_api::Route;

    pub const START: Route = Route::post("/v1/vms");
    pub const LIST: Route = Route::get("/v1/vms");
    pub const GET: Route = Route::get("/v1/vms/{name}");
    pub const DELETE: Route = Route::delete("/v1/vms/{name}");
    pub const STOP: Route = Route::post("/v1/vms/{name}/stop");
    pub const CONSOLE: Route = Route::get("/v1/vms/{name}/console");
    pub const PAUSE: Route = Route::post("/v1/vms/{name}/pause");
    pub const RESUME: Route = Route::post("/v1/vms/{name}/resume");
    pub const CREATE_SNAPSHOT: Route = Route::post("/v1/vms/{name}/snapshots");
    pub const LIST_SNAPSHOTS: Route = Route::get("/v1/vms/{name}/snapshots");
    pub const DELETE_SNAPSHOT: Route = Route::delete("/v1/vms/{name}/snapshots/{tag}");
    pub const RESTORE: Route = Route::post("/v1/vms/{name}/restore");
    /// WebSocket.
    pub const EXEC: Route = Route::get("/v1/vms/{name}/exec");
    /// WebSocket.
    pub const GATEWAY: Route = Route::get("/v1/vms/{name}/gateway");
    pub const PUT_FILE: Route = Route::put("/v1/vms/{name}/files");
    pub const GET_FILE: Route = Route::get("/v1/vms/{name}/files");
    /// The VM's agent API (OpenAI-compatible chat completions, streamed or not),
    /// passed through to the runtime on guest port 18789.
    pub const AGENT_CHAT: Route = Route::post("/v1/vms/{name}/agent/chat/completions");
    /// The VM's agent sessions.
    pub const AGENT_SESSIONS: Route = Route::get("/v1/vms/{name}/agent/sessions");
    /// The images VMs may boot (`default` and those `clawos image add` registered),
    /// each verified now.
    pub const IMAGES: Route = Route::get("/v1/images");
    /// Verify one image as a boot would (`{name}` is the image's name).
    pub const VERIFY_IMAGE: Route = Route::post("/v1/images/{name}/verify");
    pub const HEALTHZ: Route = Route::get("/healthz");
    pub const METRICS: Route = Route::get("/metrics");
}

/// Request to start an agent VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Image name — `[a-z0-9-]`, 1–63 characters, like a VM name — of a bundle
    /// registered in the launcher's image store (`clawos image add NAME DIR`); `default`
    /// (the launcher's configured image) when absent. Never a path: a path is refused
    /// with 400.
    #[serde(default)]
    pub image: Option<String>,
    /// Make the VM snapshot-capable. On QEMU this boots the `pc` machine (the vsock
    /// device is hot-pluggable there, so it can be unplugged while memory is saved)
    /// instead of `microvm`, which costs some boot time. Firecracker VMs can always be
    /// snapshotted.
    #[serde(default)]
    pub snapshots: bool,
    /// Makes the start idempotent (see the crate documentation): 1–128 characters of
    /// `A-Z a-z 0-9 . _ : / -`. A start whose key equals the one recorded for the VM
    /// answers the VM as it is now instead of booting it or answering 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Total LLM tokens the VM's agent may spend (1 to [`MAX_TOKEN_BUDGET`]), carried
    /// in the VM's agent token as the scope `clawos.budget.total:<N>` and enforced by
    /// inference-proxy. None: only the proxy's own budgets apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u64>,
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The idempotency key of the start that booted it last, if it had one (a
    /// restore from a snapshot keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The total token budget its agent token carries, if it was started with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u64>,
    /// The agent runtime its image runs when not the built-in `clawos-agentd`
    /// (`openclaw`), as the image's signed manifest names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_runtime: Option<String>,
}

/// Request to snapshot a running or paused VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateSnapshot {
    /// Snapshot name, same rules as a VM name; a time stamp when absent.
    #[serde(default)]
    pub tag: Option<String>,
}

/// Request to restore a stopped VM from one of its snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreVm {
    /// The snapshot's tag.
    pub snapshot: String,
}

/// A saved VM: guest memory and device state plus copies of its writable disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// An image as [`routes::IMAGES`] lists it: verified when listed (signature, file
/// hashes, rootfs size, pinned root hash), or why it was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageInfo {
    /// The name VMs boot it by (`StartVm.image`).
    pub name: String,
    /// What its verified manifest says; absent when it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifiedImage>,
    /// Why it was refused, in general terms (the launcher's log has the details).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The verified facts of an image (its signed manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VerifiedImage {
    pub version: String,
    /// RFC 3339.
    pub created: String,
    pub kernel_release: String,
    /// dm-verity root hash of the rootfs, hex.
    pub root_hash: String,
    pub rootfs_size: u64,
    /// The agent runtime it starts (`openclaw 2026.4.1`), when not the built-in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_runtime: Option<String>,
    /// Whether the manifest's signature was checked against the launcher's key (false
    /// only on a launcher started with `--allow-unsigned`).
    pub signature_checked: bool,
}

/// A guest directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
}

/// The query of [`routes::CONSOLE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConsoleQuery {
    /// Byte offset in the console log to read from.
    #[serde(default)]
    pub offset: u64,
}

/// The query of [`routes::PUT_FILE`] and [`routes::GET_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileQuery {
    /// A path in the VM's `/workspace` (relative, or absolute under it).
    pub path: String,
    /// List the directory instead of reading a file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub list: bool,
}
