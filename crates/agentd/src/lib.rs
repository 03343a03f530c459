//! `clawos-agentd`, the built-in agent runtime of every ClawOS VM. It runs as the
//! unprivileged `agent` user (started and supervised by the guest agent) and:
//!
//! - serves the agent API of `clawos_agentd_api` (OpenAI-compatible chat completions,
//!   ClawOS tool events, sessions) on guest port 18789 ([`server`]);
//! - runs each request as a task: the Anthropic Messages API's tool-use loop
//!   ([`agent`]) against the guest's relay to the host's inference proxy ([`llm`]),
//!   with tools confined to the workspace ([`tools`]);
//! - keeps each session's transcript on the workspace disk, fsync'd message by
//!   message, so a session survives the runtime and the VM ([`session`]).
//!
//! The runtime holds no credential: the proxy on the host adds it. It logs one line
//! per event to stderr (ids, tool names, statuses, timings; never message contents).
//!
//! [`serve`] is the whole runtime on a listener; the binary adds flags and signals.

pub mod agent;
pub mod config;
pub mod llm;
pub mod mcp;
pub mod server;
pub mod session;
pub mod tools;

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use agent::{Agent, AgentError, TaskError};
pub use config::Config;

/// How long [`serve`] waits, once told to stop, for its tasks and connections to be
/// gone (they are stopped, not awaited to completion; this bounds their unwinding).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// One log line on stderr: `clawos-agentd: <UTC time> <event>`.
#[macro_export]
#[doc(hidden)]
macro_rules! log {
    ($($t:tt)*) => { $crate::log_line(format_args!($($t)*)) };
}

#[doc(hidden)]
pub fn log_line(args: std::fmt::Arguments<'_>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let line = format!("clawos-agentd: {} {args}\n", utc(now));
    // One write per line, so lines of concurrent tasks do not interleave; a closed
    // stderr is no reason to stop.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (civil-from-days, Howard Hinnant's algorithm).
fn utc(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `bytes` random bytes as lowercase hex (ids of sessions and tasks). The kernel's
/// generator; should it fail, the time and a counter still make the id unique.
pub fn random_hex(bytes: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut buf = vec![0u8; bytes];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(n).ok() != Some(buf.len()) {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mix = nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (mix >> ((i % 8) * 8)) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// At most `max` characters of `s`, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Why [`serve`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot read the listener's address: {0}")]
    Listener(#[source] std::io::Error),
}

/// Runs the runtime on `listener` until `shutdown` completes: then it stops accepting,
/// stops running tasks (their transcripts are already on disk; interrupted tool calls
/// are repaired when the session is next used) and returns once they are gone.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Listener)?;
    let agent = Agent::new(config)?;
    log!(
        "listening on {addr} workspace={} model={} llm={} skills={} max_steps={} max_task_secs={}",
        agent.config.workspace.display(),
        agent.config.model,
        agent.config.llm_url,
        agent.config.mcp_url.as_deref().unwrap_or("off"),
        agent.config.max_steps,
        agent.config.max_task.as_secs()
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let state = Arc::new(server::State {
        agent,
        shutdown: stop_rx.clone(),
        tasks_alive: alive_tx.clone(),
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    log!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let mut stop = stop_rx.clone();
        let alive = alive_tx.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, std::convert::Infallible>(server::handle(state, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r && !e.is_incomplete_message() {
                    log!("connection from {peer}: {e}");
                },
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
    log!("shutting down");
    let _ = stop_tx.send(true);
    drop(state);
    drop(alive_tx);
    // Every task and connection holds a sender; `recv` yields `None` once all are gone.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, alive_rx.recv()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats() {
        assert_eq!(utc(Duration::from_millis(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            utc(Duration::from_millis(1_709_210_096_789)),
            "2024-02-29T12:34:56.789Z"
        );
    }

    #[test]
    fn truncates_on_characters() {
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hi", 2), "hi");
    }

    #[test]
    fn random_ids_are_hex_and_differ() {
        let a = random_hex(8);
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(a, random_hex(8));
    }
}
