//! `clawos up`, `down`, `status` and `config`: this machine's daemons as one host
//! (`clawos_host`), configured by `clawos.toml`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use clawos_host::{Found, Host, HostConfig, Step};

use crate::exit::Exit;

/// Where the host's configuration comes from.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The host's configuration (TOML) [default: $CLAWOS_STATE_DIR/clawos.toml when it
    /// exists, else the built-in defaults: `clawos config default`].
    #[arg(long, env = "CLAWOS_CONFIG")]
    config: Option<PathBuf>,
}

/// `clawos down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Leave the VMs running (a launcher started again adopts them); by default they
    /// are stopped, each gracefully, before vm-launcher.
    #[arg(long)]
    keep_vms: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Check the configuration (file, then environment over the defaults) and print
    /// what it comes to.
    Check(ConfigArgs),
    /// Print the built-in defaults: every key, documented.
    Default,
}

fn config_error(e: impl std::fmt::Display) -> Exit {
    Exit(2, anyhow::anyhow!("configuration: {e}"))
}

/// The configuration: `--config`, else `<state>/clawos.toml` if there, over the defaults.
fn load(args: &ConfigArgs) -> Result<HostConfig, Exit> {
    let state = crate::own_state_dir();
    let implicit = state.join("clawos.toml");
    let file = match &args.config {
        Some(f) => Some(f.clone()),
        None => implicit.is_file().then_some(implicit),
    };
    HostConfig::load(file.as_deref(), &|k| std::env::var(k).ok(), &state).map_err(config_error)
}

/// What the plan needs from this machine: the image key, the upstream key, whether
/// eBPF can run.
fn found(cfg: &HostConfig) -> Result<Found, Exit> {
    let signing_pubkey = if cfg.launcher.signing_pubkey.is_empty() {
        let key = cfg.state_dir.join("signing.key");
        if key.is_file() {
            let k = clawos_image::keys::load(&key)
                .map_err(|e| Exit(1, anyhow::anyhow!("{}: {e}", key.display())))?;
            Some(clawos_image::keys::public_hex(&k))
        } else {
            None
        }
    } else {
        Some(cfg.launcher.signing_pubkey.clone())
    };
    let anthropic_key = if cfg.proxy.anthropic_key_file.as_os_str().is_empty() {
        std::env::var("ANTHROPIC_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
    } else {
        let p = &cfg.proxy.anthropic_key_file;
        let text = std::fs::read_to_string(p)
            .map_err(|e| config_error(format!("proxy.anthropic_key_file {}: {e}", p.display())))?;
        Some(text.trim().to_owned()).filter(|k| !k.is_empty())
    };
    Ok(Found {
        signing_pubkey,
        anthropic_key,
        monitor_unavailable: clawos_host::monitor_unavailable(),
    })
}

/// The host as `down` and `status` see it: what runs and where. They read no key:
/// a missing or unreadable key file must not keep anyone from stopping the host.
fn host(args: &ConfigArgs) -> Result<Host, Exit> {
    let cfg = load(args)?;
    let found = Found {
        monitor_unavailable: clawos_host::monitor_unavailable(),
        ..Found::default()
    };
    Ok(plan(cfg, &found))
}

fn plan(cfg: HostConfig, found: &Found) -> Host {
    let exe = std::env::current_exe().ok();
    let beside = exe.as_deref().and_then(Path::parent);
    let plan = clawos_host::plan(&cfg, found, beside);
    Host::new(cfg, plan)
}

fn progress(json: bool) -> impl FnMut(Step) {
    move |s| {
        // Progress goes to stderr with --json, so stdout stays one JSON document.
        if json {
            eprintln!("==> {s}");
        } else {
            println!("==> {s}");
        }
    }
}

fn print_status(rows: &[clawos_host::StatusRow], json: bool) -> Result<(), Exit> {
    if json {
        return crate::output::print_json(&rows).map_err(|e| Exit(1, e));
    }
    println!(
        "{:<17} {:<10} {:>8} {:<22} {:>8}  DETAIL",
        "DAEMON", "STATE", "PID", "ADDRESS", "UPTIME"
    );
    for r in rows {
        println!(
            "{:<17} {:<10} {:>8} {:<22} {:>8}  {}",
            r.name,
            r.state,
            r.pid.map(|p| p.to_string()).unwrap_or_default(),
            r.addr.as_deref().unwrap_or(""),
            r.uptime_secs.map(|s| format!("{s}s")).unwrap_or_default(),
            r.detail.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// Whether every daemon the configuration asks for runs and answers.
fn all_up(rows: &[clawos_host::StatusRow]) -> bool {
    rows.iter()
        .all(|r| r.state == "running" || r.state == "off")
}

pub fn up(args: ConfigArgs, json: bool) -> Result<u8, Exit> {
    let cfg = load(&args)?;
    let found = found(&cfg)?;
    let host = plan(cfg, &found);
    if found.signing_pubkey.is_none() && host.running(clawos_host::Daemon::Launcher).is_none() {
        return Err(config_error(format!(
            "vm-launcher needs the image signing key: `clawos keygen` (makes {}), or launcher.signing_pubkey",
            host.cfg.state_dir.join("signing.key").display()
        )));
    }
    if found.anthropic_key.is_none() && host.running(clawos_host::Daemon::Proxy).is_none() {
        return Err(config_error(
            "inference-proxy needs the Anthropic API key: set ANTHROPIC_API_KEY for `clawos up`, or proxy.anthropic_key_file (CLAWOS_PROXY_ANTHROPIC_KEY_FILE)",
        ));
    }
    if !host.cfg.image().join("manifest.json").is_file() {
        eprintln!(
            "clawos: note: no image at {} yet: VMs need `--image` at start (or `clawos image build --out {}` and `clawos image sign`)",
            host.cfg.image().display(),
            host.cfg.image().display()
        );
    }
    crate::block_on(async {
        host.up(&mut progress(json))
            .await
            .map_err(|e| Exit(7, e.into()))?;
        let rows = host.status().await;
        print_status(&rows, json)?;
        Ok(0)
    })
}

pub fn down(args: DownArgs, json: bool) -> Result<u8, Exit> {
    let host = host(&args.config)?;
    crate::block_on(async {
        let mut steps = 0;
        let mut show = progress(json);
        host.down(args.keep_vms, &mut |s| {
            steps += 1;
            show(s);
        })
        .await;
        if steps == 0 && !json {
            println!("nothing was running");
        }
        let rows = host.status().await;
        let left: Vec<&str> = rows
            .iter()
            .filter(|r| r.pid.is_some())
            .map(|r| r.name)
            .collect();
        if json {
            print_status(&rows, true)?;
        }
        if !left.is_empty() {
            return Err(Exit(
                1,
                anyhow::anyhow!("still running: {}", left.join(", ")),
            ));
        }
        Ok(0)
    })
}

pub fn status(args: ConfigArgs, json: bool) -> Result<u8, Exit> {
    let host = host(&args)?;
    crate::block_on(async {
        let rows = host.status().await;
        print_status(&rows, json)?;
        // Scripts can wait on it: 7 while a daemon the configuration asks for is not up.
        Ok(if all_up(&rows) { 0 } else { 7 })
    })
}

pub fn config(cmd: ConfigCmd, json: bool) -> Result<u8, Exit> {
    match cmd {
        ConfigCmd::Default => {
            print!("{}", clawos_host::config::DEFAULTS);
            Ok(0)
        }
        ConfigCmd::Check(args) => {
            let cfg = load(&args)?;
            if json {
                crate::output::print_json(&cfg).map_err(|e| Exit(1, e))?;
            } else {
                eprintln!("configuration ok");
                print!("{}", cfg.to_toml());
            }
            Ok(0)
        }
    }
}
