//! `clawos skill`: skills on this host's skill-manager — install a bundle, list, remove,
//! enable or disable one for an agent, and call one as the operator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
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
    /// Install a skill bundle: a directory (skill.toml, skill.wasm, optional SKILL.md
    /// and skill.sig) or a file `clawos skill pack` made. The skill-manager checks the
    /// signature when it has a key.
    Install {
        /// The bundle directory or packed file.
        #[arg(value_name = "DIR|FILE")]
        bundle: PathBuf,
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
    /// Pack a bundle directory into one file to hand around (`<name>-<version>.skill`,
    /// a plain tar of its files; sign first, the signature goes in with them). Works
    /// on local files; needs no skill-manager.
    Pack {
        dir: PathBuf,
        /// Where to write it [default: `<name>-<version>.skill` here].
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Call a skill as the operator (audited as the operator's).
    Call {
        name: String,
        /// The tool's input, JSON.
        #[arg(long)]
        input: String,
    },
}

fn install_request(bundle: &Path, set: &[String]) -> Result<InstallSkill, Exit> {
    let usage = |e: clawos_skill_bundle::BundleError| Exit(2, e.into());
    let files = if bundle.is_dir() {
        clawos_skill_bundle::bundle::files(bundle).map_err(usage)?
    } else {
        clawos_skill_bundle::bundle::unpack(bundle).map_err(usage)?
    };
    let text = |what: &str, bytes: Vec<u8>| {
        String::from_utf8(bytes)
            .map_err(|_| Exit(2, anyhow!("{}: {what} is not UTF-8", bundle.display())))
    };
    let mut config = BTreeMap::new();
    for s in set {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| Exit(2, anyhow!("--set {s:?}: expected KEY=VALUE")))?;
        config.insert(k.to_owned(), v.to_owned());
    }
    Ok(InstallSkill {
        manifest: text("skill.toml", files.manifest)?,
        component_base64: base64::engine::general_purpose::STANDARD.encode(files.component),
        instructions: files
            .instructions
            .map(|b| text("SKILL.md", b))
            .transpose()?,
        signature: files.signature.map(|b| text("skill.sig", b)).transpose()?,
        config,
    })
}

impl SkillArgs {
    /// Whether the command works on local files only (signing).
    pub fn is_local_file_command(&self) -> bool {
        matches!(self.cmd, SkillCmd::Sign { .. } | SkillCmd::Pack { .. })
    }
}

/// `clawos skill sign`.
fn sign(dir: &Path, key: Option<PathBuf>, json: bool) -> Result<(), Exit> {
    let key_path = key.unwrap_or_else(|| crate::own_state_dir().join("signing.key"));
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

/// `clawos skill pack`.
fn pack(dir: &Path, output: Option<PathBuf>, json: bool) -> Result<(), Exit> {
    // The bundle is read and its manifest checked first: a bad bundle is the caller's
    // (exit 2), whether or not the output was named.
    let usage = |e: clawos_skill_bundle::BundleError| Exit(2, e.into());
    let f = clawos_skill_bundle::bundle::files(dir).map_err(usage)?;
    let manifest = std::str::from_utf8(&f.manifest)
        .map_err(|_| Exit(2, anyhow!("{}/skill.toml is not UTF-8", dir.display())))?;
    let m = clawos_skill_bundle::manifest::SkillManifest::parse(manifest).map_err(usage)?;
    let out = match output {
        Some(o) => o,
        None => {
            // Name and version are checked to be plain (no '/', no leading '.').
            let name = format!("{}-{}.skill", m.name, m.version);
            if Path::new(&name).file_name() != Some(std::ffi::OsStr::new(&name)) {
                return Err(Exit(
                    2,
                    anyhow!("{name:?} is not a file name: give --output"),
                ));
            }
            PathBuf::from(name)
        }
    };
    clawos_skill_bundle::bundle::pack(dir, &out).map_err(|e| Exit(1, e.into()))?;
    let signed = dir.join("skill.sig").is_file();
    if json {
        print_json(&serde_json::json!({"path": out, "signed": signed})).map_err(|e| Exit(1, e))?;
    } else {
        println!(
            "packed {} into {}{}",
            dir.display(),
            out.display(),
            if signed {
                ""
            } else {
                " (unsigned: `clawos skill sign` it first for a host with a signing key)"
            }
        );
    }
    Ok(())
}

/// Runs against the local skill-manager with its operator credential.
pub fn run_local(args: SkillArgs, json: bool) -> Result<(), Exit> {
    match args.cmd {
        SkillCmd::Sign { dir, key } => return sign(&dir, key, json),
        SkillCmd::Pack { dir, output } => return pack(&dir, output, json),
        _ => {}
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
        SkillCmd::Install { bundle, set } => {
            let req = install_request(&bundle, &set)?;
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
        SkillCmd::Pack { dir, output } => return pack(&dir, output, json),
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
