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

pub fn run(args: UsageArgs, json: bool) -> Result<(), Exit> {
    let UsageArgs {
        agent,
        since_minutes,
        proxy_url,
    } = args;
    let since_ms = since_minutes
        .map(|m| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now.saturating_sub(m * 60_000)
        })
        .unwrap_or(0);
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
    let client = ProxyAdminClient::new(&proxy_url, &token);
    let report = block_on(async {
        client
            .usage(&UsageQuery { since_ms, agent })
            .await
            .map_err(api_exit)
    })?;
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
