//! `clawos-search-standin`: parse flags → listen → print the bound address → serve until
//! SIGTERM/SIGINT. What it serves is in the crate docs.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use clawos_search_standin::{Document, StandIn, builtin_corpus, router};

/// A stand-in web search backend (SearXNG's and Brave's JSON APIs over a small corpus)
/// for the web-search skill in tests and the offline demo. Not a search engine.
#[derive(Debug, Parser)]
#[command(
    name = "clawos-search-standin",
    version,
    after_help = "Routes: GET /search?q=...&format=json (SearXNG), GET /res/v1/web/search?q=...&count=N \
(Brave), GET /healthz. On start, one line `listening on http://ADDR:PORT` is printed on stdout.\n\n\
Corpus file: a JSON array of {\"title\", \"url\", \"snippet\"}."
)]
struct Args {
    /// Address to listen on; port 0 picks a free one (the bound address is printed).
    #[arg(
        long,
        env = "CLAWOS_SEARCH_STANDIN_ADDR",
        default_value = "127.0.0.1:8888"
    )]
    addr: String,
    /// Documents to search (JSON array of {title, url, snippet}) [default: a built-in
    /// corpus about what ClawOS is built from].
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Require this X-Subscription-Token on Brave's route (401 without it).
    #[arg(long, env = "CLAWOS_SEARCH_STANDIN_BRAVE_KEY", hide_env_values = true)]
    brave_key: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    let corpus: Vec<Document> = match &a.corpus {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the corpus {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "the corpus {} is not a JSON array of {{title, url, snippet}}",
                    path.display()
                )
            })?
        }
        None => builtin_corpus(),
    };
    let listener = tokio::net::TcpListener::bind(&a.addr)
        .await
        .with_context(|| format!("cannot listen on {}", a.addr))?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on http://{addr}")?;
    out.flush()?;
    eprintln!(
        "clawos-search-standin: {} documents; a stand-in, not a search engine",
        corpus.len()
    );
    let app = router(StandIn {
        corpus,
        brave_key: a.brave_key,
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
