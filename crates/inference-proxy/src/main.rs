//! `inference-proxy`: parse config → init tracing → run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use clawos_inference_proxy::{ProxyConfig, config};

/// The only road from an agent to an LLM (port 11435).
#[derive(Debug, Parser)]
#[command(name = "inference-proxy", version)]
struct Args {
    #[arg(long, env = "CLAWOS_PROXY_ADDR", default_value = "127.0.0.1:11435")]
    addr: String,
    #[arg(long, env = "CLAWOS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Requests per minute per agent.
    #[arg(long, env = "CLAWOS_PROXY_RATE_LIMIT_RPM", default_value_t = 60)]
    rpm: u32,
    /// Tokens per agent per rolling minute (0: no budget).
    #[arg(long, env = "CLAWOS_PROXY_TOKENS_PER_MINUTE", default_value_t = 0)]
    tokens_per_minute: u64,
    /// Tokens per agent per UTC day (0: no budget).
    #[arg(long, env = "CLAWOS_PROXY_TOKENS_PER_DAY", default_value_t = 0)]
    tokens_per_day: u64,
    /// Tokens per agent in total (0: no budget).
    #[arg(long, env = "CLAWOS_PROXY_TOKENS_TOTAL", default_value_t = 0)]
    tokens_total: u64,
    /// Seconds to wait for a non-streaming upstream answer (504 after).
    #[arg(
        long,
        env = "CLAWOS_PROXY_UPSTREAM_TIMEOUT_SECS",
        default_value_t = 600
    )]
    upstream_timeout: u64,
    /// Rotate the audit file at this size (MiB), keeping 5 old files.
    #[arg(long, env = "CLAWOS_PROXY_AUDIT_MAX_MIB", default_value_t = 64)]
    audit_max_mib: u64,
    /// identity-manager issuer URL whose JWKS verifies agent tokens.
    #[arg(long, env = "CLAWOS_IDENTITY_ISSUER")]
    issuer: Option<String>,
    /// Audience agent tokens must carry.
    #[arg(long, env = "CLAWOS_PROXY_AUDIENCE", default_value = "inference-proxy")]
    audience: String,
    /// DEVELOPMENT ONLY, INSECURE: JSON file `{"<token>": "<agent>"}` accepted instead of
    /// identity-manager JWTs, so agents' requests are NOT verified (no signature, expiry
    /// or revocation check). Refused unless --insecure-dev-tokens is also given, and
    /// next to --issuer.
    #[arg(long, env = "CLAWOS_PROXY_STATIC_TOKENS")]
    static_tokens: Option<PathBuf>,
    /// Allow --static-tokens (development and tests only): requests are then not
    /// verified, and every start logs a warning saying so.
    #[arg(
        long,
        env = "CLAWOS_PROXY_INSECURE_DEV_TOKENS",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    insecure_dev_tokens: bool,
    /// Upstreams JSON file; default: one Anthropic upstream keyed by ANTHROPIC_API_KEY.
    #[arg(long, env = "CLAWOS_PROXY_UPSTREAMS")]
    upstreams: Option<PathBuf>,
    /// Base URL of the default Anthropic upstream.
    #[arg(
        long,
        env = "CLAWOS_PROXY_ANTHROPIC_URL",
        default_value = "https://api.anthropic.com"
    )]
    anthropic_url: String,
    /// Requests one agent may have in flight at once (429 past it).
    #[arg(long, env = "CLAWOS_PROXY_MAX_IN_FLIGHT", default_value_t = config::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// `max_tokens` set on OpenAI-API requests without a maximum while a token budget
    /// is on (so the reservation bounds them).
    #[arg(long, env = "CLAWOS_PROXY_DEFAULT_MAX_TOKENS", default_value_t = config::DEFAULT_MAX_TOKENS)]
    default_max_tokens: u64,
    /// Per-agent allowlist of anthropic-beta flags and provider-side tools (JSON file);
    /// default: none allowed.
    #[arg(long, env = "CLAWOS_PROXY_AGENT_POLICY")]
    agent_policy: Option<PathBuf>,
    /// Client connections held at once, in all (lowered to fit the descriptor limit).
    #[arg(long, env = "CLAWOS_PROXY_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Client connections held at once from one peer address.
    #[arg(
        long,
        env = "CLAWOS_PROXY_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 512
    )]
    max_connections_per_peer: usize,
    /// Seconds from connect to a complete first request head.
    #[arg(long, env = "CLAWOS_PROXY_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a keep-alive connection may stay idle between requests.
    #[arg(long, env = "CLAWOS_PROXY_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    idle_timeout: u64,
    /// Seconds to receive a request body once its head has arrived (408 after).
    #[arg(long, env = "CLAWOS_PROXY_BODY_TIMEOUT_SECS", default_value_t = 30)]
    body_timeout: u64,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

fn main() -> Result<()> {
    let a = Args::parse();
    clawos_service::init_tracing(a.log.format());
    // Before anything is created: unverified agents are refused unless asked for.
    config::check_dev_tokens(
        a.static_tokens.as_deref(),
        a.insecure_dev_tokens,
        a.issuer.as_deref(),
    )?;
    let state = a
        .state_dir
        .unwrap_or_else(clawos_service::default_state_dir);
    let dir = state.join("proxy");
    // The ledger, the audit trail and the operator credential: root's business only.
    clawos_inference_proxy::ledger::private_dir(&dir)?;
    // Services often start with a soft limit of 1,024 descriptors; the connection caps
    // are sized under whatever is in force.
    let nofile = clawos_inference_proxy::conns::raise_fd_limit();
    let static_tokens = match &a.static_tokens {
        Some(p) => {
            let map: HashMap<String, String> = serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
            )
            .with_context(|| format!("{}", p.display()))?;
            tracing::warn!(
                static_tokens = %p.display(),
                agents = map.len(),
                "INSECURE development mode (--insecure-dev-tokens): agents authenticate with the static tokens in {}, and their requests are NOT verified (no JWT signature, expiry, audience or revocation check); never run this in production",
                p.display()
            );
            Some(map)
        }
        None => None,
    };
    if a.issuer.is_none() && static_tokens.is_none() {
        bail!(
            "no agent authentication: set CLAWOS_IDENTITY_ISSUER (identity-manager URL) or, for development only, CLAWOS_PROXY_STATIC_TOKENS with {}",
            config::INSECURE_DEV_TOKENS_FLAG
        );
    }
    let cfg = ProxyConfig {
        addr: a
            .addr
            .parse()
            .with_context(|| format!("listen address {:?}", a.addr))?,
        upstreams: config::upstreams(a.upstreams.as_deref(), &a.anthropic_url, &|k| {
            std::env::var(k).ok()
        })?,
        rpm: a.rpm,
        tokens_per_minute: a.tokens_per_minute,
        tokens_per_day: a.tokens_per_day,
        tokens_total: a.tokens_total,
        issuer: a.issuer,
        audience: a.audience,
        static_tokens,
        ledger_path: dir.join("ledger.db"),
        audit_path: dir.join("audit.jsonl"),
        admin_token: config::admin_token(&dir.join("admin.token"))?,
        upstream_timeout: std::time::Duration::from_secs(a.upstream_timeout.max(1)),
        audit_rotation: clawos_inference_proxy::ledger::AuditRotation {
            max_bytes: a.audit_max_mib.max(1) << 20,
            keep: 5,
        },
        max_in_flight: a.max_in_flight,
        default_max_tokens: a.default_max_tokens,
        policies: clawos_inference_proxy::policy::Policies::load(a.agent_policy.as_deref())?,
        connections: clawos_inference_proxy::conns::ConnLimits {
            max_connections: a.max_connections,
            max_per_peer: a.max_connections_per_peer,
            header_timeout: Duration::from_secs(a.header_timeout),
            idle_timeout: Duration::from_secs(a.idle_timeout),
        },
        body_timeout: Duration::from_secs(a.body_timeout),
    };
    cfg.validate()?;
    tracing::debug!(nofile, "descriptor limit");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(clawos_inference_proxy::run(
        cfg,
        clawos_service::shutdown_signal(),
    ))?;
    Ok(())
}
