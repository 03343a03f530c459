//! What every ClawOS daemon binary shares: where state lives by default, how logs are
//! set up ([`LogArgs`]), how it stops ([`shutdown_signal`]), how files are replaced
//! ([`atomic_write`], [`AtomicFile`]), how operators authenticate ([`operator_token`],
//! [`bearer_matches`]); [`metrics`] is the one Prometheus registry, [`limits`] the
//! per-caller rate and in-flight limits, [`http`] the
//! server side of the API conventions in `clawos_api`, and [`guard`] the layer that
//! decides who may call a daemon's API and from where (credential, `Host`, `Origin`,
//! body type).

pub mod guard;
pub mod http;
pub mod limits;
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
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
    }
}

/// Makes `path` and its missing parents, the last one 0700 (less the umask): a daemon's
/// own directory under the state directory.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Replaces `path` with `bytes` so that readers, and the disk after a crash, see the
/// old content or the new, never a mix: a new temporary file in the same directory
/// (created with `mode`, less the umask), written and fsynced, renamed over `path`,
/// then the directory fsynced so the rename itself is durable. On an error before the
/// rename, `path` is untouched and the temporary file is removed.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let f = AtomicFile::create(path, mode)?;
    f.file().write_all(bytes)?;
    f.commit()
}

/// A file that replaces `path` only when [`commit`](AtomicFile::commit)ted, for
/// writers that stream (a download): it is written as a new temporary file in the
/// same directory; `commit` fsyncs it, renames it over `path` and fsyncs the
/// directory. Dropped without a commit (an error, a size cap, a panic), it is removed:
/// `path` keeps its old content, or stays absent.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    file: std::fs::File,
    committed: bool,
}

impl AtomicFile {
    /// Starts replacing `path`; the temporary file is created with `mode` (less the
    /// umask).
    pub fn create(path: &Path, mode: u32) -> io::Result<Self> {
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
        let (tmp, file) = create_temp(dir, name, mode)?;
        Ok(Self {
            tmp,
            path: path.to_owned(),
            dir: dir.to_owned(),
            file,
            committed: false,
        })
    }

    /// The temporary file, to write to (`&File` implements `Write`).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Makes the written bytes the content of `path`, durably.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
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
/// Refused, with an error that says how to fix it: a file others can read, a file
/// another uid owns (someone else chose it), a symlink or other non-regular file, an
/// empty one (it would open nothing, and look like it opened everything).
pub fn operator_token(path: &std::path::Path) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_file() {
                return Err(format!("{shown} must be a regular file, not a symlink"));
            }
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if meta.uid() != euid {
                return Err(format!(
                    "{shown} belongs to uid {}, not to this daemon's uid {euid}: remove it (a new one is made) or chown it",
                    meta.uid()
                ));
            }
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(format!(
                    "{shown} must be readable by its owner only (chmod 600)"
                ));
            }
            let mut text = String::new();
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .and_then(|f| f.take(4096).read_to_string(&mut text))
                .map_err(|e| format!("{shown}: {e}"))?;
            let token = text.trim();
            if token.is_empty() {
                return Err(format!(
                    "{shown} is empty: remove it and a new credential is made"
                ));
            }
            return Ok(token.to_owned());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{shown}: {e}")),
    }
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("no OS randomness: {e}"))?;
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("{shown}: {e}"))?;
    f.write_all(token.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{shown}: {e}"))?;
    Ok(token)
}

/// Where a daemon finds a credential another daemon made: the file systemd handed over
/// as `$CREDENTIALS_DIRECTORY/<name>` (`LoadCredential=`), when there is one, else
/// `fallback` (the file in the state directory). An unprivileged daemon thus reads a
/// root daemon's 0600 token without the token's mode being widened.
pub fn credential_path(name: &str, fallback: PathBuf) -> PathBuf {
    credential_path_in(
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        name,
        fallback,
    )
}

fn credential_path_in(dir: Option<PathBuf>, name: &str, fallback: PathBuf) -> PathBuf {
    dir.map(|d| d.join(name))
        .filter(|p| p.is_file())
        .unwrap_or(fallback)
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

/// An error and its causes on one line (`outer: cause: root cause`), for logs and
/// messages where only `Display` would drop the reason.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_systemd_handed_over_wins_over_the_state_directorys_file() {
        let d = tempfile::tempdir().expect("tmp");
        let fallback = d.path().join("state/monitor/admin.token");
        std::fs::write(d.path().join("monitor-token"), "t").expect("write");
        let dir = Some(d.path().to_owned());
        assert_eq!(
            credential_path_in(dir.clone(), "monitor-token", fallback.clone()),
            d.path().join("monitor-token")
        );
        assert_eq!(
            credential_path_in(dir, "proxy-token", fallback.clone()),
            fallback,
            "not handed over: the state directory's"
        );
        assert_eq!(
            credential_path_in(None, "monitor-token", fallback.clone()),
            fallback
        );
    }

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
    fn operator_tokens_are_made_private_and_refused_when_others_could_have_chosen_them() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("admin.token");
        let made = operator_token(&p).expect("created");
        assert_eq!(made.len(), 64);
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(operator_token(&p).expect("read back"), made);

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = operator_token(&p).expect_err("group-readable");
        assert!(e.contains("chmod 600"), "{e}");

        let empty = d.path().join("empty.token");
        std::fs::write(&empty, "\n").expect("write");
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = operator_token(&empty).expect_err("empty");
        assert!(e.contains("empty"), "{e}");

        let link = d.path().join("link.token");
        std::os::unix::fs::symlink(&empty, &link).expect("symlink");
        let e = operator_token(&link).expect_err("symlink");
        assert!(e.contains("regular file"), "{e}");
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
    fn two_writers_of_one_file_at_once_each_commit_whole() {
        use std::io::Write as _;
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("component.cwasm");
        let a = AtomicFile::create(&p, 0o600).expect("first writer");
        let b = AtomicFile::create(&p, 0o600).expect("second writer");
        a.file().write_all(b"from a").expect("write a");
        b.file().write_all(b"from b").expect("write b");
        a.commit().expect("first commit");
        assert_eq!(std::fs::read(&p).expect("read"), b"from a");
        b.commit().expect("second commit");
        assert_eq!(std::fs::read(&p).expect("read"), b"from b");
        assert_eq!(std::fs::read_dir(d.path()).expect("list").count(), 1);
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
