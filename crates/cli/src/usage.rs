//! `clawos usage`: LLM usage per agent and model, from inference-proxy's ledger.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use clawos_inference_proxy_api::{ProxyAdminClient, UsageQuery};

use crate::exit::{Exit, api_exit};
use crate::output::print_json;
use crate::{block_on, state_dir};

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Window: the last N minutes [default: all].
    #[arg(long)]
    since_minutes: Option<u64>,
    /// inference-proxy URL.
    #[arg(long, env = "CLAWOS_PROXY_URL", default_value = clawos_inference_proxy_api::DEFAULT_URL)]
    proxy_url: String,
}

/// `--since-minutes` as the ledger's `since_ms`.
fn query(agent: Option<String>, since_minutes: Option<u64>) -> UsageQuery {
    let since_ms = since_minutes
        .map(|m| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now.saturating_sub(m.saturating_mul(60_000))
        })
        .unwrap_or(0);
    UsageQuery { since_ms, agent }
}

/// Asks the local proxy, with its operator credential.
pub fn run_local(args: UsageArgs, json: bool) -> Result<(), Exit> {
    let token_path = std::env::var_os("CLAWOS_PROXY_ADMIN_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir().join("proxy/admin.token"));
    let token = std::fs::read_to_string(&token_path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| {
            Exit(
                1,
                anyhow!("proxy operator credential {}: {e}", token_path.display()),
            )
        })?;
    let client = ProxyAdminClient::new(&args.proxy_url, &token);
    block_on(run(args, &client, json))
}

/// Asks `client`: the local proxy, or a control plane's usage route.
pub async fn run(args: UsageArgs, client: &ProxyAdminClient, json: bool) -> Result<(), Exit> {
    let UsageArgs {
        agent,
        since_minutes,
        proxy_url: _,
    } = args;
    let report = client
        .usage(&query(agent, since_minutes))
        .await
        .map_err(api_exit)?;
    if json {
        print_json(&report).map_err(|e| Exit(1, e))?;
    } else {
        println!(
            "{:<24} {:<28} {:>9} {:>12} {:>12}",
            "AGENT", "MODEL", "REQUESTS", "INPUT", "OUTPUT"
        );
        for r in &report.usage {
            println!(
                "{:<24} {:<28} {:>9} {:>12} {:>12}",
                r.agent,
                r.model,
                r.requests,
                r.all_input_tokens(),
                r.output_tokens
            );
        }
    }
    Ok(())
}
