//! What every ClawOS daemon binary shares: where state lives by default, how logs are
//! set up ([`LogArgs`]), how it stops ([`shutdown_signal`]), how files are replaced
//! ([`atomic_write`]), how operators authenticate ([`operator_token`],
//! [`bearer_matches`]); [`metrics`] is the one Prometheus registry, and [`http`] the
//! server side of the API conventions in `clawos_api`.

pub mod http;
pub mod metrics;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use metrics::Metrics;

/// Resolves at the first SIGTERM (a service manager's stop) or SIGINT (Ctrl-C), so a
/// daemon drains the same way whichever it gets.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            // Without handlers the default action (exit) would skip the drain; say so
            // and fall back to Ctrl-C, the one that may still work.
            tracing::error!(error = %e, "cannot install SIGTERM/SIGINT handlers");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `~/.clawos`: the state directory when none is configured.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".clawos")
}

/// How diagnostic logs are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The logging flags every daemon flattens into its arguments
/// (`#[command(flatten)] log: LogArgs`).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr; `RUST_LOG` sets the level (default `info`).
    #[arg(long, env = "CLAWOS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Same as `--log-format json`: the older spelling, kept so existing unit files
    /// and scripts keep working.
    #[arg(long, env = "CLAWOS_LOG_JSON", hide = true)]
    pub log_json: bool,
}

impl LogArgs {
    /// The format asked for.
    pub fn format(&self) -> LogFormat {
        if self.log_json {
            LogFormat::Json
        } else {
            self.log_format
        }
    }
}

/// Diagnostic logs on stderr: `RUST_LOG` or `info`; colours only on a terminal.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init(),
    }
}

/// Replaces `path` with `bytes` so that readers, and the disk after a crash, see the
/// old content or the new, never a mix: a new temporary file in the same directory
/// (created with `mode`, less the umask), written and fsynced, renamed over `path`,
/// then the directory fsynced so the rename itself is durable. On an error before the
/// rename, `path` is untouched and the temporary file is removed.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let (tmp, mut file) = create_temp(dir, name, mode)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// A new file `.<name>.<pid>.<n>.tmp` in `dir`, never one that exists, so two writers
/// of the same path (or the leftover of a crash) cannot share it.
fn create_temp(
    dir: &Path,
    name: &std::ffi::OsStr,
    mode: u32,
) -> io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads an operator credential file, or creates it (0600, 32 random bytes as hex).
/// A file others can read is refused: the error says how to fix it.
pub fn operator_token(path: &std::path::Path) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{} must be readable by its owner only (chmod 600)",
                path.display()
            ));
        }
        return std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("no OS randomness: {e}"))?;
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(token.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token)
}

/// Whether an `Authorization` header value is `Bearer <token>`, compared in constant
/// time. An empty expected token never matches.
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let given = header.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    let (a, b) = (given.as_bytes(), token.as_bytes());
    !b.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_must_match_exactly() {
        assert!(bearer_matches(Some("Bearer abc"), "abc"));
        for bad in [
            None,
            Some("abc"),
            Some("Bearer ab"),
            Some("Bearer abcd"),
            Some("bearer abc"),
        ] {
            assert!(!bearer_matches(bad, "abc"), "{bad:?}");
        }
        assert!(
            !bearer_matches(Some("Bearer "), ""),
            "an empty token never matches"
        );
    }

    #[test]
    fn atomic_writes_replace_whole_files_with_the_mode_and_leave_nothing_behind() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("state.json");
        atomic_write(&p, b"first", 0o600).expect("create");
        atomic_write(&p, b"second", 0o600).expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"second");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A target that cannot be replaced (a directory) fails and leaves no temp file.
        std::fs::create_dir(d.path().join("dir")).expect("dir");
        atomic_write(&d.path().join("dir"), b"x", 0o600).expect_err("onto a directory");
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["dir", "state.json"]);
        atomic_write(Path::new("/"), b"x", 0o600).expect_err("no file name");
    }

    #[test]
    fn log_format_is_a_flag_and_the_older_json_switch_still_works() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Args {
            #[command(flatten)]
            log: LogArgs,
        }
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("daemon").chain(args.iter().copied()))
                .map(|a| a.log.format())
        };
        assert_eq!(parse(&["--log-format", "json"]).ok(), Some(LogFormat::Json));
        assert_eq!(parse(&["--log-format", "text"]).ok(), Some(LogFormat::Text));
        assert_eq!(parse(&["--log-json"]).ok(), Some(LogFormat::Json));
        assert!(parse(&["--log-format", "yaml"]).is_err());
    }
}
