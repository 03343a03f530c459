//! `clawos skill`: skills on this host's skill-manager — install a bundle, list, remove,
//! enable or disable one for an agent, and call one as the operator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use base64::Engine as _;
use clap::{Args, Subcommand};
use clawos_skill_manager_api::{CallSkill, InstallSkill, SkillsClient};

use crate::exit::{Exit, api_exit};
use crate::output::print_json;
use crate::{block_on, state_dir};

#[derive(Debug, Args)]
pub struct SkillArgs {
    /// skill-manager URL.
    #[arg(long, env = "CLAWOS_SKILLS_URL", default_value = clawos_skill_manager_api::DEFAULT_URL)]
    skills_url: String,
    #[command(subcommand)]
    cmd: SkillCmd,
}

#[derive(Debug, Subcommand)]
pub enum SkillCmd {
    /// Install a skill bundle directory (skill.toml, skill.wasm, optional SKILL.md and
    /// skill.sig). The skill-manager checks the signature when it has a key.
    Install {
        dir: PathBuf,
        /// Override a setting of the manifest's [config] on this host (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List installed skills and the agents each is enabled for.
    List,
    /// Remove a skill (and its enablements).
    Rm { name: String },
    /// Let an agent see and call a skill.
    Enable { name: String, agent: String },
    /// Stop an agent from seeing and calling a skill.
    Disable { name: String, agent: String },
    /// Sign a skill bundle directory (writes skill.sig) with the image signing key, after
    /// checking its manifest. Works on local files; needs no skill-manager.
    Sign {
        dir: PathBuf,
        /// Private key [default: $CLAWOS_STATE_DIR/signing.key].
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Call a skill as the operator (audited as the operator's).
    Call {
        name: String,
        /// The tool's input, JSON.
        #[arg(long)]
        input: String,
    },
}

fn read_optional(path: &Path) -> Result<Option<String>, Exit> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Exit(1, anyhow!("{}: {e}", path.display()))),
    }
}

fn install_request(dir: &Path, set: &[String]) -> Result<InstallSkill, Exit> {
    let usage = |e: anyhow::Error| Exit(2, e);
    let manifest = std::fs::read_to_string(dir.join("skill.toml"))
        .with_context(|| format!("{}", dir.join("skill.toml").display()))
        .map_err(usage)?;
    let wasm = std::fs::read(dir.join("skill.wasm"))
        .with_context(|| format!("{}", dir.join("skill.wasm").display()))
        .map_err(usage)?;
    let mut config = BTreeMap::new();
    for s in set {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| Exit(2, anyhow!("--set {s:?}: expected KEY=VALUE")))?;
        config.insert(k.to_owned(), v.to_owned());
    }
    Ok(InstallSkill {
        manifest,
        component_base64: base64::engine::general_purpose::STANDARD.encode(wasm),
        instructions: read_optional(&dir.join("SKILL.md"))?,
        signature: read_optional(&dir.join("skill.sig"))?,
        config,
    })
}

impl SkillArgs {
    /// Whether the command works on local files only (signing).
    pub fn is_local_file_command(&self) -> bool {
        matches!(self.cmd, SkillCmd::Sign { .. })
    }
}

/// `clawos skill sign`.
fn sign(dir: &Path, key: Option<PathBuf>, json: bool) -> Result<(), Exit> {
    let key_path = key.unwrap_or_else(|| state_dir().join("signing.key"));
    let key = clawos_image::keys::load(&key_path).map_err(|e| Exit(1, e.into()))?;
    let sig = clawos_skill_bundle::bundle::sign(dir, &key).map_err(|e| Exit(1, e.into()))?;
    let public = clawos_image::keys::public_hex(&key);
    if json {
        print_json(&serde_json::json!({"signature": sig, "public_key": public}))
            .map_err(|e| Exit(1, e))?;
    } else {
        println!("signed {} with public key {public}", sig.display());
    }
    Ok(())
}

/// Runs against the local skill-manager with its operator credential.
pub fn run_local(args: SkillArgs, json: bool) -> Result<(), Exit> {
    if let SkillCmd::Sign { dir, key } = args.cmd {
        return sign(&dir, key, json);
    }
    let token = clawos_skill_manager_api::local_token(&state_dir()).map_err(|why| {
        Exit(
            9,
            anyhow!(
                "no skill-manager operator credential: {why} (run as the skill-manager's user, or set CLAWOS_STATE_DIR or CLAWOS_SKILLS_TOKEN_PATH)"
            ),
        )
    })?;
    let client = SkillsClient::new(&args.skills_url, &token);
    block_on(run(args.cmd, &client, json))
}

pub async fn run(cmd: SkillCmd, client: &SkillsClient, json: bool) -> Result<(), Exit> {
    match cmd {
        SkillCmd::Install { dir, set } => {
            let req = install_request(&dir, &set)?;
            let info = client.install(&req).await.map_err(api_exit)?;
            if json {
                print_json(&info).map_err(|e| Exit(1, e))?;
            } else {
                println!(
                    "installed {} {} ({}, digest {})",
                    info.name,
                    info.version,
                    if info.signed { "signed" } else { "UNSIGNED" },
                    &info.digest[..16.min(info.digest.len())]
                );
            }
        }
        SkillCmd::List => {
            let skills = client.list().await.map_err(api_exit)?;
            if json {
                print_json(&skills).map_err(|e| Exit(1, e))?;
            } else {
                println!(
                    "{:<24} {:<10} {:<8} {:<40} AGENTS",
                    "NAME", "VERSION", "SIGNED", "HTTP"
                );
                for s in &skills {
                    println!(
                        "{:<24} {:<10} {:<8} {:<40} {}",
                        s.name,
                        s.version,
                        if s.signed { "yes" } else { "no" },
                        s.http_allow.join(","),
                        s.agents.join(",")
                    );
                }
            }
        }
        SkillCmd::Rm { name } => client.remove(&name).await.map_err(api_exit)?,
        SkillCmd::Enable { name, agent } => client.enable(&name, &agent).await.map_err(api_exit)?,
        SkillCmd::Disable { name, agent } => {
            client.disable(&name, &agent).await.map_err(api_exit)?
        }
        SkillCmd::Sign { dir, key } => return sign(&dir, key, json),
        SkillCmd::Call { name, input } => {
            let input: serde_json::Value = serde_json::from_str(&input)
                .map_err(|e| Exit(2, anyhow!("--input is not JSON: {e}")))?;
            let r = client
                .call(&name, &CallSkill { input })
                .await
                .map_err(api_exit)?;
            if json {
                print_json(&r).map_err(|e| Exit(1, e))?;
            }
            match (r.output, r.error) {
                (Some(out), _) => {
                    if !json {
                        println!("{out}");
                    }
                }
                (None, e) => {
                    return Err(Exit(
                        1,
                        anyhow!("{}", e.unwrap_or_else(|| "the skill gave no answer".into())),
                    ));
                }
            }
        }
    }
    Ok(())
}
