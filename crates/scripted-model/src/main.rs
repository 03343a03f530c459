//! `clawos-scripted-model`: parse flags → load the script → listen → print the bound
//! address → serve until SIGTERM/SIGINT. What it serves is in the crate docs.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use clawos_scripted_model::{DEFAULT_SCRIPT, Script, ScriptedModel, default_script, serve};

/// A stand-in for the Anthropic Messages API that plays a script of turns. Not a model:
/// it answers the next scripted turn whatever is asked, in the real API's wire format
/// (JSON and SSE, tool_use blocks, usage), for tests and the offline demo.
#[derive(Debug, Parser)]
#[command(
    name = "clawos-scripted-model",
    version,
    after_help = "The turn answering a request is the number of assistant messages already in \
it, so every conversation plays the script from its start. On start, one line \
`listening on http://ADDR:PORT` is printed on stdout; logs go to stderr.\n\n\
Script format (see --print-default-script):\n  \
{\"turns\": [{\"tool_use\": [{\"name\": \"write_file\", \"input\": {...}}]}, {\"text\": \"Done.\", \"expect_tool_result\": true}],\n   \
\"repeat_last\": false}\n\
A turn has `text`, `tool_use` or both; optional `expect_tool_result` (400 unless the user turn \
since the last assistant message carries a tool_result) and `delay_ms`."
)]
struct Args {
    /// Address to listen on; port 0 picks a free one (the bound address is printed).
    #[arg(
        long,
        env = "CLAWOS_SCRIPTED_MODEL_ADDR",
        default_value = "127.0.0.1:0"
    )]
    addr: String,
    /// Script of turns (JSON) [default: the built-in demo script, see
    /// --print-default-script].
    #[arg(long, env = "CLAWOS_SCRIPT")]
    script: Option<PathBuf>,
    /// Accept only requests carrying this key (x-api-key, or `Authorization: Bearer`
    /// when x-api-key is absent), answering others 401 [default: accept any]. ANTHROPIC_API_KEY is deliberately not read: a real key
    /// has no business here.
    #[arg(long, env = "CLAWOS_SCRIPTED_MODEL_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Append one JSON line per request to this file (made 0600): the credential
    /// headers, model, stream, turn and message count that arrived.
    #[arg(long, env = "CLAWOS_SCRIPTED_MODEL_RECORD")]
    record: Option<PathBuf>,
    /// Print the built-in demo script and exit.
    #[arg(long)]
    print_default_script: bool,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

/// Logs on stderr, in the format asked for; `RUST_LOG` or `info`. Not
/// `clawos_service::init_tracing`: that writes to stdout, where this binary's only
/// output is the address line scripts parse.
fn init_tracing(format: clawos_service::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        clawos_service::LogFormat::Json => fmt.json().init(),
        clawos_service::LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if a.print_default_script {
        print!("{DEFAULT_SCRIPT}");
        return Ok(());
    }
    init_tracing(a.log.format());
    let script = match &a.script {
        Some(path) => Script::from_file(path)?,
        None => {
            tracing::info!("no --script: playing the built-in demo script");
            default_script()
        }
    };
    let turns = script.turns().len();
    let mut model = ScriptedModel::new(script);
    if let Some(key) = a.api_key {
        model = model.api_key(key)?;
    } else {
        tracing::info!("no --api-key: accepting any x-api-key");
    }
    if let Some(path) = &a.record {
        model = model.record_to(path)?;
    }
    let listener = tokio::net::TcpListener::bind(&a.addr)
        .await
        .with_context(|| format!("cannot listen on {}", a.addr))?;
    let local = listener.local_addr().context("bound address")?;
    if !local.ip().is_loopback() {
        tracing::warn!(%local, "listening beyond loopback: anyone who reaches it is answered");
    }
    tracing::info!(%local, turns, "serving the script (a stand-in, not a model)");
    // The one line on stdout, which tests and scripts parse for the port.
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{local}")
        .and_then(|()| out.flush())
        .context("stdout")?;
    drop(out);
    serve(listener, model, clawos_service::shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}
