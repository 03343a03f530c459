//! What every ClawOS daemon binary shares: where state lives by default, how logs are
//! set up, and how counters are exposed to Prometheus.

use std::path::PathBuf;

/// `~/.clawos`: the state directory when none is configured.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".clawos")
}

/// Diagnostic logs on stderr: `RUST_LOG` or `info`; JSON lines when `json`, colours
/// only on a terminal.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init();
    }
}

/// Prometheus text for counters: `(name, help, value)`.
pub fn render_counters(counters: &[(&str, &str, u64)]) -> String {
    let mut out = String::new();
    for (name, help, v) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    out
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
    fn counters_render_in_exposition_format() {
        assert_eq!(
            render_counters(&[("a_total", "A things.", 3)]),
            "# HELP a_total A things.\n# TYPE a_total counter\na_total 3\n"
        );
    }
}
