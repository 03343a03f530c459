//! `clawos-agentd`: the ClawOS agent runtime (see the library's docs and `--help`).
//! One thread: a single-threaded Tokio runtime keeps the resident size small, and the
//! work is waiting on the model and on tools.

use std::process::ExitCode;

use clawos_agentd::config::{Command, USAGE, parse_args};
use clawos_agentd::{log, serve};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    let command = match parse_args(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clawos-agentd: {e}");
            return ExitCode::from(2);
        }
    };
    let (listen, config) = match command {
        Command::Help => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("clawos-agentd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Run { listen, config } => (listen, config),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // File tools run on the blocking pool; they are short and one at a time.
        .max_blocking_threads(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clawos-agentd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => log!("SIGTERM"),
                _ = int.recv() => log!("SIGINT"),
            }
        };
        serve(listener, config, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    // Tasks still unwinding (a blocking file operation) are not waited for: every
    // acknowledged message is already on disk.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clawos-agentd: {e}");
            ExitCode::FAILURE
        }
    }
}
