//! `identity-manager`: parse config → init tracing → run.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use clawos_identity_manager::{Config, IssuerConfig, MasterKeySource};

/// Per-agent Ed25519 JWTs, JWKS + OIDC discovery, encrypted key store (port 2082).
#[derive(Debug, Parser)]
#[command(name = "identity-manager", version)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Listen address.
    #[arg(long, env = "CLAWOS_IDENTITY_ADDR", default_value = "127.0.0.1:2082")]
    addr: String,
    /// State directory (the key store lives in `<dir>/identity/`).
    #[arg(long, global = true, env = "CLAWOS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Master key, 64 hex characters.
    #[arg(long, env = "CLAWOS_MASTER_KEY", hide_env_values = true)]
    master_key: Option<String>,
    /// Master key file (created 0600 on first start) [default: <state>/identity/master.key].
    #[arg(long, global = true, env = "CLAWOS_MASTER_KEY_PATH")]
    master_key_path: Option<PathBuf>,
    /// Issuer URL (`iss`, discovery base).
    #[arg(long, env = "CLAWOS_IDENTITY_ISSUER")]
    issuer: Option<String>,
    /// SPIFFE trust domain of agent subjects.
    #[arg(long, env = "CLAWOS_TRUST_DOMAIN", default_value = "clawos.local")]
    trust_domain: String,
    /// Maximum age of a token lineage in seconds: a token renewed from a token renewed
    /// from … the one the service issued is refused once that first one is older than
    /// this, and no renewed token outlives it.
    #[arg(
        long,
        env = "CLAWOS_IDENTITY_MAX_LINEAGE_SECS",
        default_value_t = clawos_identity_manager::identity::DEFAULT_MAX_LINEAGE_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_lineage_secs: u64,
    /// Service credential file [default: <state>/identity/service.token, created 0600].
    #[arg(long, env = "CLAWOS_IDENTITY_SERVICE_TOKEN_PATH")]
    service_token_path: Option<PathBuf>,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Re-seal every stored private key under a new master key kept in the master key
    /// file (the service must be stopped; crash-safe). `clawos identity
    /// rotate-master-key` runs this.
    RotateMasterKey,
}

fn main() -> Result<()> {
    let args = Args::parse();
    clawos_service::init_tracing(args.log.format());
    let state = args
        .state_dir
        .unwrap_or_else(clawos_service::default_state_dir);
    let dir = state.join("identity");
    if let Some(Cmd::RotateMasterKey) = args.cmd {
        let key = args
            .master_key_path
            .unwrap_or_else(|| dir.join("master.key"));
        let (n, v) =
            clawos_identity_manager::rotate_master_key_file(&dir.join("identity.db"), &key)?;
        println!(
            "re-sealed {n} keys under a new master key (version {v}) in {}",
            key.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("chmod 700 {}", dir.display()))?;
    let addr = args
        .addr
        .parse()
        .with_context(|| format!("listen address {:?}", args.addr))?;
    let master = match (args.master_key, args.master_key_path) {
        (Some(_), Some(_)) => bail!("give CLAWOS_MASTER_KEY or CLAWOS_MASTER_KEY_PATH, not both"),
        (Some(hex), None) => MasterKeySource::Hex(hex),
        (None, p) => MasterKeySource::Path(p.unwrap_or_else(|| dir.join("master.key"))),
    };
    let token_path = args
        .service_token_path
        .unwrap_or_else(|| dir.join("service.token"));
    let service_token = clawos_identity_manager::keystore::load_or_create_secret(&token_path)?;
    let cfg = Config {
        addr,
        db_path: dir.join("identity.db"),
        master,
        issuer: IssuerConfig {
            issuer: args.issuer.unwrap_or_else(|| format!("http://{addr}")),
            trust_domain: args.trust_domain,
            max_lineage_secs: args.max_lineage_secs,
        },
        service_token,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(clawos_identity_manager::run(
        cfg,
        clawos_service::shutdown_signal(),
    ))?;
    Ok(())
}
