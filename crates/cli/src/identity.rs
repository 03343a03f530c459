//! `clawos identity ...`, and the identity-manager client it and `clawos token` share.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Subcommand;
use clawos_identity_manager_api::IdentityClient;

use crate::exit::{Exit, api_exit};
use crate::{block_on, state_dir};

#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// Rotate the token signing keys (next → active → retired).
    RotateKeys,
    /// Re-seal every stored private key under a new master key (identity-manager
    /// must be stopped; crash-safe).
    RotateMasterKey {
        /// Master key file [default: $CLAWOS_STATE_DIR/identity/master.key].
        #[arg(long, env = "CLAWOS_MASTER_KEY_PATH")]
        master_key_path: Option<PathBuf>,
    },
}

/// The service credential identity-manager created in the state directory.
fn credential() -> Result<String, Exit> {
    let path = std::env::var_os("CLAWOS_IDENTITY_SERVICE_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir().join("identity/service.token"));
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| {
            Exit(
                1,
                anyhow!("identity service credential {}: {e}", path.display()),
            )
        })
}

/// A client of identity-manager at `url` presenting the service credential.
pub fn client(url: &str) -> Result<IdentityClient, Exit> {
    Ok(IdentityClient::with_service_token(url, &credential()?))
}

/// Runs against the local identity-manager at `url`, or (`remote`, a control plane's
/// agent-token routes) a remote host's; the master key only on the host.
pub fn run(cmd: IdentityCmd, url: &str, remote: Option<IdentityClient>) -> Result<(), Exit> {
    match cmd {
        IdentityCmd::RotateKeys => {
            let client = match remote {
                Some(c) => c,
                None => client(url)?,
            };
            let rotated = block_on(async { client.rotate_keys().await.map_err(api_exit) })?;
            println!("active signing key: {}", rotated.active_kid);
            Ok(())
        }
        IdentityCmd::RotateMasterKey { .. } if remote.is_some() => {
            Err(crate::remote::not_remote("identity rotate-master-key"))
        }
        IdentityCmd::RotateMasterKey { master_key_path } => rotate_master_key(master_key_path),
    }
}

/// The rotation works on the key store itself, offline, so it is the service's own
/// binary that does it: this process becomes `identity-manager rotate-master-key`
/// (same pid, so whoever waits for or signals `clawos` reaches the rotation).
fn rotate_master_key(master_key_path: Option<PathBuf>) -> Result<(), Exit> {
    use std::os::unix::process::CommandExt;
    let next_to_us = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("identity-manager")))
        .filter(|p| p.is_file());
    let bin = next_to_us.unwrap_or_else(|| PathBuf::from("identity-manager"));
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("rotate-master-key")
        .arg("--state-dir")
        .arg(crate::own_state_dir());
    if let Some(p) = master_key_path {
        cmd.arg("--master-key-path").arg(p);
    }
    let e = cmd.exec();
    Err(Exit(1, anyhow!("cannot run {}: {e}", bin.display())))
}
