//! `vm exec` and `vm port-forward`: the launcher API crate's WebSocket clients, wired
//! to this process's stdio and a local listener.

use anyhow::anyhow;
use clawos_vm_launcher_api::{ExecStart, ExecStatus, LauncherClient, VmState};

use crate::exit::{Exit, api_exit};
use crate::terminal::{SafeWriter, neutralise};

/// What `vm exec` was asked to run, and how.
#[derive(Debug)]
pub struct ExecArgs {
    /// Forward stdin.
    pub interactive: bool,
    /// Output to a terminal unchanged (escape sequences included).
    pub raw: bool,
    pub timeout: Option<f64>,
    pub cwd: Option<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    pub command: Vec<String>,
}

/// Runs a command in the guest, streaming its output (neutralised on a terminal unless
/// `raw`: see [`crate::terminal`]). `Ok` carries the command's own exit status, as
/// ssh and docker exec do; stdout and stderr are flushed before this returns,
/// whatever it returns.
pub async fn exec(client: &LauncherClient, name: &str, args: ExecArgs) -> Result<u8, Exit> {
    let ExecArgs {
        interactive,
        raw,
        timeout,
        cwd,
        env,
        command,
    } = args;
    let env = env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Exit(2, anyhow!("--env {kv:?} is not KEY=VALUE")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let start = ExecStart {
        argv: command,
        env,
        cwd,
        stdin: interactive,
        timeout_ms: timeout.map(|s| (s * 1000.0) as u64),
    };
    // Tokio writes stdout and stderr from a blocking thread, and the runtime is shut
    // down without waiting for it: `exec` flushes both before it returns, so everything
    // the command printed goes out before `main` prints an error or exits.
    let mut stdout = SafeWriter::new(tokio::io::stdout(), neutralise(&std::io::stdout(), raw));
    let mut stderr = SafeWriter::new(tokio::io::stderr(), neutralise(&std::io::stderr(), raw));
    let status = client
        .exec(
            name,
            &start,
            interactive.then(tokio::io::stdin),
            &mut stdout,
            &mut stderr,
        )
        .await;
    // Shows a character the output ended in the middle of, and flushes.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stdout).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stderr).await;
    let status = status.map_err(|e| Exit(e.exit_code(), e.into()))?;
    match status {
        ExecStatus::Exited(_) => Ok(status.exit_code()),
        ExecStatus::TimedOut => Err(Exit(
            status.exit_code(),
            anyhow!("command timed out and was killed"),
        )),
        ExecStatus::Killed { signal } => Err(Exit(
            status.exit_code(),
            anyhow!("command killed by signal {}", signal.unwrap_or(0)),
        )),
    }
}

/// Listens locally; each accepted connection is tunnelled to the guest gateway through
/// its own WebSocket to the launcher.
pub async fn port_forward(client: &LauncherClient, name: &str, listen: &str) -> Result<(), Exit> {
    // Fail early, with the launcher's words, if the VM cannot be reached.
    let vm = client.get(name).await.map_err(api_exit)?;
    if vm.state != VmState::Running {
        return Err(Exit(4, anyhow!("VM {name} is {}", vm.state)));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Exit(1, anyhow!("listen on {listen}: {e}")))?;
    let local = listener.local_addr().map_err(|e| Exit(1, e.into()))?;
    eprintln!("forwarding {local} -> {name}:18789 (Ctrl-C to stop)");
    client
        .forward_gateway(name, listener, |peer, e| eprintln!("{peer}: {e}"))
        .await
        .map_err(|e| Exit(e.exit_code(), e.into()))
}
