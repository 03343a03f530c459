//! `skill-manager`: the daemon. Flags (each also an environment variable) are checked
//! before any socket opens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use clawos_skill_manager::host::{AgentLimits, SkillHost};
use clawos_skill_manager::outbound::Outbound;
use clawos_skill_manager::runtime::SkillRuntime;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "ClawOS skill-manager: sandboxed WebAssembly skills for agents, over MCP"
)]
struct Args {
    /// Listen address (loopback: agents reach it through the launcher's relay).
    #[arg(long, env = "CLAWOS_SKILLS_ADDR", default_value = "127.0.0.1:2083")]
    addr: SocketAddr,
    /// State directory (the skills live in `<state>/skills`).
    #[arg(long, env = "CLAWOS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// identity-manager's issuer URL: agent tokens are verified against its JWKS and
    /// revocation feed. Required: agents are never taken on their word.
    #[arg(long, env = "CLAWOS_IDENTITY_ISSUER")]
    issuer: String,
    /// The audience agent tokens must carry.
    #[arg(long, env = "CLAWOS_SKILLS_AUDIENCE", default_value = "skill-manager")]
    audience: String,
    /// The Ed25519 public key (hex) skills must be signed with — the image signing key.
    /// Without it unsigned skills are installed (logged at start).
    #[arg(long, env = "CLAWOS_SIGNING_PUBKEY")]
    signing_pubkey: Option<String>,
    /// A file of host secrets skills may be given, `NAME=value` per line (0600, the
    /// daemon's own). Only skills whose manifest names a secret get it, as a header.
    #[arg(long, env = "CLAWOS_SKILLS_SECRETS")]
    secrets: Option<PathBuf>,
    /// Pin a host name skills may reach to an address, `name=ip` (repeatable; the
    /// offline demo and tests point `search.local` at the stand-in search server).
    #[arg(long = "resolve", value_name = "NAME=IP")]
    resolve: Vec<String>,
    /// Skill calls one agent may make per minute (the whole minute's may come at once,
    /// then one per 60 s / N). Operators' calls are not limited.
    #[arg(long, env = "CLAWOS_SKILLS_AGENT_CALLS_PER_MINUTE", default_value_t = AgentLimits::default().calls_per_minute, value_parser = clap::value_parser!(u32).range(1..))]
    agent_calls_per_minute: u32,
    /// Skill calls one agent may have running at once.
    #[arg(long, env = "CLAWOS_SKILLS_AGENT_IN_FLIGHT", default_value_t = AgentLimits::default().in_flight as u64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    agent_in_flight: u64,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

fn read_secrets(path: &std::path::Path) -> Result<HashMap<String, String>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        bail!(
            "{}: must be a regular file only its owner can read (chmod 600)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!("{} line {}: expected NAME=value", path.display(), i + 1);
        };
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

fn main() -> Result<()> {
    let a = Args::parse();
    clawos_service::init_tracing(a.log.format());
    let key = a
        .signing_pubkey
        .as_deref()
        .map(clawos_image::manifest::parse_public_key)
        .transpose()
        .context("--signing-pubkey")?;
    let secrets = match &a.secrets {
        Some(p) => read_secrets(p)?,
        None => HashMap::new(),
    };
    let mut resolve = HashMap::new();
    for r in &a.resolve {
        let (name, ip) = r
            .split_once('=')
            .with_context(|| format!("--resolve {r:?}: expected NAME=IP"))?;
        let ip: std::net::IpAddr = ip
            .parse()
            .with_context(|| format!("--resolve {r:?}: {ip:?} is not an IP address"))?;
        resolve.insert(name.to_ascii_lowercase(), SocketAddr::new(ip, 0));
    }
    url_check(&a.issuer)?;
    let state = a
        .state_dir
        .unwrap_or_else(clawos_service::default_state_dir);
    let dir = state.join("skills");
    clawos_service::create_private_dir(&dir).with_context(|| format!("{}", dir.display()))?;
    let token_path = clawos_skill_manager_api::token_path(&state);
    let token = clawos_service::operator_token(&token_path).map_err(anyhow::Error::msg)?;
    if key.is_none() {
        tracing::warn!(
            "no signing key configured (--signing-pubkey): unsigned skills are installed"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let outbound = Outbound::new(&resolve).map_err(anyhow::Error::msg)?;
        let runtime = SkillRuntime::new(Some(&dir.join("compiled")), outbound)?;
        let limits = AgentLimits {
            calls_per_minute: a.agent_calls_per_minute,
            in_flight: a.agent_in_flight as usize,
            ..AgentLimits::default()
        };
        let host = Arc::new(SkillHost::open(&dir, runtime, key, secrets, limits)?);
        let verifier = Arc::new(clawos_agent_token::Verifier::new(
            clawos_agent_token::VerifierConfig::new(&a.issuer, &a.audience),
        ));
        let app = clawos_skill_manager::http::router(
            host,
            &token,
            &token_path.display().to_string(),
            a.addr,
            verifier,
        );
        let listener = tokio::net::TcpListener::bind(a.addr)
            .await
            .with_context(|| format!("listening on {}", a.addr))?;
        tracing::info!(addr = %a.addr, credential = %token_path.display(), "skill-manager listening");
        axum::serve(listener, app)
            .with_graceful_shutdown(clawos_service::shutdown_signal())
            .await?;
        Ok(())
    })
}

fn url_check(u: &str) -> Result<()> {
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        bail!("--issuer {u:?}: an http(s) URL of identity-manager");
    }
    Ok(())
}
