//! `vm-launcher`: parse config → init tracing → run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use clawos_vm_launcher::RawConfig;

/// Verifies signed agent images and runs them as microVMs (REST API, default port 2080).
#[derive(Debug, Parser)]
#[command(name = "vm-launcher", version)]
struct Args {
    /// Listen address: loopback only (the API has no TLS; others are refused).
    #[arg(long, env = "CLAWOS_LAUNCHER_ADDR", default_value = "127.0.0.1:2080")]
    addr: String,
    /// Operator credential file, made 0600 at the first start; every route but
    /// /healthz and /metrics needs `Authorization: Bearer <its content>`
    /// [default: $STATE_DIR/launcher/admin.token].
    #[arg(long, env = clawos_vm_launcher_api::TOKEN_PATH_ENV)]
    token_path: Option<PathBuf>,
    /// Browser origin allowed to call the API (scheme://host[:port]), repeatable or
    /// comma-separated; none by default, so no web page can.
    #[arg(
        long = "allow-origin",
        env = "CLAWOS_LAUNCHER_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// State directory (VM records, disks, console logs).
    #[arg(long, env = "CLAWOS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Default image bundle directory [default: $STATE_DIR/images/default if it exists].
    #[arg(long, env = "CLAWOS_IMAGE_DIR")]
    image: Option<PathBuf>,
    /// Kernel overriding the bundle's (still checked against the signed manifest).
    #[arg(long, env = "CLAWOS_AGENT_KERNEL")]
    kernel: Option<PathBuf>,
    /// Rootfs overriding the bundle's.
    #[arg(long, env = "CLAWOS_AGENT_ROOTFS")]
    rootfs: Option<PathBuf>,
    /// Refuse images whose verity root hash differs.
    #[arg(long, env = "CLAWOS_AGENT_ROOTHASH")]
    root_hash: Option<String>,
    /// Trusted image signing key (hex Ed25519 public key).
    #[arg(long, env = "CLAWOS_SIGNING_PUBKEY")]
    signing_pubkey: Option<String>,
    /// Boot images without checking signatures (hashes are still checked).
    #[arg(long, env = "CLAWOS_ALLOW_UNSIGNED")]
    allow_unsigned: bool,
    /// Host inference proxy the agents' LLM traffic is relayed to.
    #[arg(
        long,
        env = "CLAWOS_INFERENCE_PROXY_URL",
        default_value = "http://127.0.0.1:11435"
    )]
    inference_proxy_url: String,
    /// monitor-daemon URL: each VM's hypervisor and helper processes are registered there
    /// for syscall auditing (e.g. http://127.0.0.1:2084).
    #[arg(long, env = "CLAWOS_MONITOR_URL")]
    monitor_url: Option<String>,
    /// identity-manager URL: each running VM gets an agent token from it, which the
    /// launcher's relays attach to the guest's requests (e.g. http://127.0.0.1:2082).
    /// Without it, guests' LLM requests are answered 503.
    #[arg(long, env = "CLAWOS_IDENTITY_URL")]
    identity_url: Option<String>,
    /// identity-manager's service credential file [default: $STATE_DIR/identity/service.token].
    #[arg(long, env = "CLAWOS_IDENTITY_TOKEN_PATH")]
    identity_token_path: Option<PathBuf>,
    /// Lifetime of each agent token in seconds (60-3600); replaced at two thirds of it.
    #[arg(long, env = "CLAWOS_AGENT_TOKEN_TTL_SECS", default_value_t = 900)]
    agent_token_ttl_secs: u64,
    /// Audience of the tokens attached to LLM requests (inference-proxy's --audience).
    #[arg(long, env = "CLAWOS_PROXY_AUDIENCE", default_value = "inference-proxy")]
    proxy_audience: String,
    /// skill-manager URL: agents' MCP requests to guest 127.0.0.1:2083 are relayed there
    /// with a token of the VM's own for it (e.g. http://127.0.0.1:2083). Without it, the
    /// guest has no skills.
    #[arg(long = "skill-manager-url", env = "CLAWOS_SKILLS_URL")]
    skills_url: Option<String>,
    /// Audience of the tokens attached to skill requests (skill-manager's --audience).
    #[arg(long, env = "CLAWOS_SKILLS_AUDIENCE", default_value = "skill-manager")]
    skills_audience: String,
    /// Hypervisor: auto, qemu or firecracker.
    #[arg(long, env = "CLAWOS_BACKEND", default_value = "auto")]
    backend: String,
    /// QEMU binary.
    #[arg(long, env = "CLAWOS_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Firecracker binary.
    #[arg(long, env = "CLAWOS_FIRECRACKER", default_value = "firecracker")]
    firecracker: PathBuf,
    /// vhost-device-vsock binary (QEMU's hybrid vsock: exec, files, relays).
    #[arg(long, env = "CLAWOS_VHOST_VSOCK", default_value = "vhost-device-vsock")]
    vhost_vsock: PathBuf,
    /// vhost-device-vsock's log level in each VM's vsock-device.log (off, error, warn,
    /// info, debug, trace); the launcher's own RUST_LOG is not passed on.
    #[arg(long, env = "CLAWOS_VSOCK_DEVICE_LOG", default_value = "error")]
    vsock_device_log: String,
    /// Run Firecracker under this jailer binary (chroot, uid/gid, cgroup v2).
    #[arg(long, env = "CLAWOS_JAILER")]
    jailer: Option<PathBuf>,
    /// uid:gid the jailed Firecracker runs as.
    #[arg(long, env = "CLAWOS_JAILER_USER")]
    jailer_user: Option<String>,
    /// Base directory of the jailer's chroots [default: $STATE_DIR/jail].
    #[arg(long, env = "CLAWOS_JAILER_CHROOT_BASE")]
    jailer_chroot_base: Option<PathBuf>,
    /// Network namespace jailed VMs join (e.g. /var/run/netns/clawos).
    #[arg(long, env = "CLAWOS_JAILER_NETNS")]
    jailer_netns: Option<PathBuf>,
    /// Seconds a guest gets to power off before it is killed.
    #[arg(long, default_value_t = 20)]
    stop_timeout: u64,
    /// Seconds a guest gets to report ready before it is failed.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// MiB a VM's live console log may grow to before it is cut (the earlier part is
    /// kept as console.log.1).
    #[arg(long, env = "CLAWOS_CONSOLE_MAX_MIB", default_value_t = 8)]
    console_max_mib: u64,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

fn main() -> Result<()> {
    let args = Args::parse();
    clawos_service::init_tracing(args.log.format());
    let state_dir = args
        .state_dir
        .unwrap_or_else(clawos_service::default_state_dir);
    let image = args.image.or_else(|| {
        let d = state_dir.join("images/default");
        d.is_dir().then_some(d)
    });
    let cfg = RawConfig {
        addr: args.addr,
        token_path: args.token_path,
        allowed_origins: args.allowed_origins,
        state_dir,
        image_dir: image,
        kernel_override: args.kernel,
        rootfs_override: args.rootfs,
        pinned_root_hash: args.root_hash.filter(|s| !s.is_empty()),
        public_key: args.signing_pubkey.filter(|s| !s.is_empty()),
        allow_unsigned: args.allow_unsigned,
        inference_proxy_url: args.inference_proxy_url,
        monitor_url: args.monitor_url,
        identity_url: args.identity_url.filter(|s| !s.is_empty()),
        identity_token_path: args.identity_token_path,
        agent_token_ttl_secs: args.agent_token_ttl_secs,
        llm_audience: args.proxy_audience,
        skills_url: args.skills_url,
        skills_audience: args.skills_audience,
        backend: args.backend,
        qemu_bin: args.qemu,
        firecracker_bin: args.firecracker,
        vhost_vsock_bin: args.vhost_vsock,
        vsock_device_log: args.vsock_device_log,
        jailer_bin: args.jailer,
        jailer_user: args.jailer_user,
        jailer_chroot_base: args.jailer_chroot_base,
        jailer_netns: args.jailer_netns,
        stop_timeout_secs: args.stop_timeout,
        boot_timeout_secs: args.boot_timeout,
        console_max_mib: args.console_max_mib,
    }
    .validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(clawos_vm_launcher::run(cfg, shutdown_signal()))?;
    Ok(())
}

async fn shutdown_signal() {
    clawos_service::shutdown_signal().await;
    tracing::info!("shutting down; VMs keep running and are re-adopted on the next start");
}
