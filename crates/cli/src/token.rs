//! `clawos token issue|verify|revoke`: agent tokens from identity-manager.

use anyhow::anyhow;
use clap::Subcommand;
use clawos_identity_manager_api::{IdentityClient, IssueRequest, RevokeRequest};

use crate::exit::{Exit, api_exit};
use crate::identity;
use crate::output::print_json;

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token for an agent (prints the JWT).
    Issue {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        vm: String,
        #[arg(long, default_value = "inference-proxy")]
        audience: String,
        /// Lifetime in seconds (max 3600).
        #[arg(long)]
        ttl: Option<u64>,
        /// Verity root hash of the agent's image.
        #[arg(long, default_value = "")]
        root_hash: String,
        #[arg(long)]
        scope: Vec<String>,
    },
    /// Check a token (signature, expiry, revocation) via introspection.
    Verify { token: String },
    /// Revoke one token (by jti) or every token of an agent.
    Revoke {
        #[arg(long, conflicts_with = "agent", required_unless_present = "agent")]
        jti: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
}

/// Runs against the local identity-manager at `url`, with its service credential.
pub async fn run_local(cmd: TokenCmd, url: &str, json: bool) -> Result<(), Exit> {
    run(cmd, &identity::client(url)?, json).await
}

/// Runs against `client`: the local identity-manager, or a control plane's agent-token
/// routes.
pub async fn run(cmd: TokenCmd, client: &IdentityClient, json: bool) -> Result<(), Exit> {
    match cmd {
        TokenCmd::Issue {
            agent,
            vm,
            audience,
            ttl,
            root_hash,
            scope,
        } => {
            let issued = client
                .issue(&IssueRequest {
                    agent,
                    vm_id: vm,
                    image_root_hash: root_hash,
                    audience,
                    ttl_secs: ttl,
                    scopes: scope,
                })
                .await
                .map_err(api_exit)?;
            if json {
                print_json(&issued).map_err(|e| Exit(1, e))?;
            } else {
                println!("{}", issued.token);
            }
        }
        TokenCmd::Verify { token } => {
            let answer = client.introspect(&token).await.map_err(api_exit)?;
            print_json(&answer).map_err(|e| Exit(1, e))?;
            if !answer.active {
                return Err(Exit(1, anyhow!("token is not active")));
            }
        }
        TokenCmd::Revoke { jti, agent } => {
            let req = match (jti, agent) {
                (Some(j), _) => RevokeRequest::jti(&j),
                (None, Some(a)) => RevokeRequest::agent(&a),
                (None, None) => return Err(Exit(2, anyhow!("give --jti or --agent"))),
            };
            client.revoke(&req).await.map_err(api_exit)?;
            if !json {
                println!("revoked");
            }
        }
    }
    Ok(())
}
