//! Remote mode: `clawos --server https://host:8080 …` drives a ClawOS host through its
//! control plane instead of the local daemons. `clawos login` checks an operator
//! token against the server and keeps it, with how the server's certificate is
//! trusted (`--ca FILE` or `--fingerprint SHA256`), in
//! `$XDG_CONFIG_HOME/clawos/credentials.json` (else `~/.config/clawos/`), 0600 in a
//! 0700 directory. `clawos operator …` also works locally: it then talks to the
//! control plane on this host as the local admin.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Args, Subcommand};
use clawos_control_plane_api::{ControlPlaneClient, CreateToken, Role, ServerTrust};
use serde::{Deserialize, Serialize};

use crate::exit::{Exit, api_exit};
use crate::output::print_json;

/// How to reach and trust a control plane (the global `--server`, `--ca`,
/// `--fingerprint`).
#[derive(Debug, Clone, Default)]
pub struct ServerArgs {
    pub server: Option<String>,
    pub ca: Option<PathBuf>,
    pub fingerprint: Option<String>,
}

/// One server's kept login.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Login {
    token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Credentials {
    servers: BTreeMap<String, Login>,
}

fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".config")
        })
        .join("clawos")
}

fn credentials_path() -> PathBuf {
    config_dir().join("credentials.json")
}

fn load() -> Result<Credentials, Exit> {
    let path = credentials_path();
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Exit(
                1,
                anyhow!("{}: not a credentials file: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Credentials::default()),
        Err(e) => Err(Exit(1, anyhow!("{}: {e}", path.display()))),
    }
}

fn save(c: &Credentials) -> Result<(), Exit> {
    let dir = config_dir();
    clawos_service::create_private_dir(&dir)
        .map_err(|e| Exit(1, anyhow!("{}: {e}", dir.display())))?;
    let path = credentials_path();
    let bytes = serde_json::to_vec_pretty(c).map_err(|e| Exit(1, e.into()))?;
    clawos_service::atomic_write(&path, &bytes, 0o600)
        .map_err(|e| Exit(1, anyhow!("{}: {e}", path.display())))
}

fn normalise(server: &str) -> String {
    server.trim_end_matches('/').to_owned()
}

/// The trust given on the command line, if any.
fn trust_from_flags(a: &ServerArgs) -> Result<Option<ServerTrust>, Exit> {
    match (&a.ca, &a.fingerprint) {
        (Some(_), Some(_)) => Err(Exit(2, anyhow!("give --ca or --fingerprint, not both"))),
        (Some(ca), None) => std::fs::read(ca)
            .map(|pem| Some(ServerTrust::Ca(pem)))
            .map_err(|e| Exit(1, anyhow!("--ca {}: {e}", ca.display()))),
        (None, Some(fp)) => ServerTrust::fingerprint(fp)
            .map(Some)
            .map_err(|e| Exit(2, anyhow!("--fingerprint: {e}"))),
        (None, None) => Ok(None),
    }
}

/// A client of the control plane `a.server` names, with the kept login (or
/// `CLAWOS_OPERATOR_TOKEN`) and the trust given or kept.
pub fn client(a: &ServerArgs) -> Result<ControlPlaneClient, Exit> {
    let server = normalise(a.server.as_deref().unwrap_or_default());
    let kept = load()?.servers.get(&server).cloned();
    let token = match std::env::var("CLAWOS_OPERATOR_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => kept.as_ref().map(|l| l.token.clone()).ok_or_else(|| {
            Exit(
                9,
                anyhow!("not logged in to {server}: run `clawos login --server {server}` (or set CLAWOS_OPERATOR_TOKEN)"),
            )
        })?,
    };
    let trust = match trust_from_flags(a)? {
        Some(t) => t,
        None => match kept {
            Some(Login {
                ca_pem: Some(pem), ..
            }) => ServerTrust::Ca(pem.into_bytes()),
            Some(Login {
                fingerprint: Some(fp),
                ..
            }) => ServerTrust::fingerprint(&fp).map_err(|e| Exit(1, anyhow!(e)))?,
            _ => {
                return Err(Exit(
                    2,
                    anyhow!(
                        "how to trust {server}'s certificate is unknown: give --ca FILE or --fingerprint SHA256"
                    ),
                ));
            }
        },
    };
    ControlPlaneClient::connect(&server, &trust, &token).map_err(|e| Exit(2, anyhow!(e)))
}

/// The control plane on this host, as its local admin: `CLAWOS_CONTROL_PLANE_URL`
/// (default https://127.0.0.1:8080), trusting its self-signed certificate.
pub fn local_client(a: &ServerArgs) -> Result<ControlPlaneClient, Exit> {
    let state = crate::state_dir();
    let server = std::env::var("CLAWOS_CONTROL_PLANE_URL")
        .unwrap_or_else(|_| "https://127.0.0.1:8080".to_owned());
    let token = clawos_control_plane_api::local_token(&state).map_err(|why| {
        Exit(
            9,
            anyhow!("no control-plane admin credential: {why} (run as the control plane's user, or use --server with a login)"),
        )
    })?;
    let trust = match trust_from_flags(a)? {
        Some(t) => t,
        None => {
            let ca = clawos_control_plane_api::self_signed_cert_path(&state);
            let pem = std::fs::read(&ca).map_err(|e| {
                Exit(
                    1,
                    anyhow!("{}: {e} (the control plane serves another certificate? give --ca or --fingerprint)", ca.display()),
                )
            })?;
            ServerTrust::Ca(pem)
        }
    };
    ControlPlaneClient::connect(&server, &trust, &token).map_err(|e| Exit(2, anyhow!(e)))
}

/// `clawos login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Read the operator API token from this file instead of standard input.
    #[arg(long, conflicts_with = "browser")]
    token_file: Option<PathBuf>,
    /// Log in through the control plane's OpenID provider in a browser: the CLI
    /// waits on a loopback port for the browser to come back, then keeps a 12-hour
    /// API token with the role the provider's groups give.
    #[arg(long)]
    browser: bool,
    /// With --browser: only print the URL to open (on a machine without a browser, open
    /// it on one whose 127.0.0.1:PORT reaches this one, e.g. through
    /// `ssh -L PORT:127.0.0.1:PORT`).
    #[arg(long, requires = "browser")]
    no_open: bool,
}

/// How long `login --browser` waits for the browser to come back.
const BROWSER_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

fn random_url_safe(bytes: usize) -> Result<String, Exit> {
    use base64::Engine as _;
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| Exit(1, anyhow!("no randomness: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// The browser login (see `clawos_control_plane::cli_login`): the API token it ends
/// with.
async fn browser_login(server: &str, trust: &ServerTrust, open: bool) -> Result<String, Exit> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| {
            Exit(
                1,
                anyhow!("a loopback port for the browser to come back to: {e}"),
            )
        })?;
    let port = listener.local_addr().map_err(|e| Exit(1, e.into()))?.port();
    let state = random_url_safe(24)?;
    let verifier = random_url_safe(32)?;
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    let url = format!(
        "{server}{}?cli_port={port}&cli_state={state}&cli_challenge={challenge}",
        clawos_control_plane_api::routes::LOGIN_OIDC.path
    );
    let client = ControlPlaneClient::connect(server, trust, "").map_err(|e| Exit(2, anyhow!(e)))?;
    // The server is asked first, so one without a provider says so now, not after
    // the wait.
    client.check_oidc_login(&url).await.map_err(api_exit)?;
    eprintln!(
        "Log in to {server} in a browser (waiting {} s):\n{url}",
        BROWSER_WAIT.as_secs()
    );
    if open {
        // Best effort: the URL above works whether or not a browser starts.
        let _ = std::process::Command::new("xdg-open")
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let code = tokio::time::timeout(BROWSER_WAIT, wait_for_code(&listener, &state))
        .await
        .map_err(|_| {
            Exit(
                1,
                anyhow!(
                    "the browser did not come back within {} s",
                    BROWSER_WAIT.as_secs()
                ),
            )
        })??;
    let created = client
        .cli_token(&clawos_control_plane_api::CliToken { code, verifier })
        .await
        .map_err(api_exit)?;
    Ok(created.token)
}

/// Answers the browser's requests on the loopback port until one brings a code with
/// our state; anything else is answered and ignored. Each connection is served on its
/// own, so one that stalls (another local program) holds up nothing.
async fn wait_for_code(listener: &tokio::net::TcpListener, state: &str) -> Result<String, Exit> {
    let (found_tx, mut found) = tokio::sync::mpsc::channel::<String>(1);
    // A bounded number at once: another local program cannot use up our descriptors
    // and keep the browser's own request out.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        tokio::select! {
            code = found.recv() => {
                if let Some(code) = code {
                    return Ok(code);
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let Ok(slot) = std::sync::Arc::clone(&slots).try_acquire_owned() else {
                        drop(conn);
                        continue;
                    };
                    let (tx, state) = (found_tx.clone(), state.to_owned());
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Some(code) = answer_browser(conn, &state).await {
                            let _ = tx.send(code).await;
                        }
                    });
                }
                // Out of descriptors and the like: wait a little rather than spin.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            },
        }
    }
}

/// Reads one request on the loopback port (its head, within 10 s) and answers it: the
/// code it brings when it carries our `state`.
async fn answer_browser(mut conn: tokio::net::TcpStream, state: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    let line = String::from_utf8_lossy(&head);
    let target = line
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or("");
    let query = target.strip_prefix("/callback?").unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let (status, page, code) = match (param("code"), param("state")) {
        (Some(code), Some(s)) if s == state => (
            "200 OK",
            "Logged in: the ClawOS CLI has its credential. You may close this tab.",
            Some(code),
        ),
        _ => (
            "400 Bad Request",
            "Not a ClawOS login for this CLI (start again with `clawos login --browser`).",
            None,
        ),
    };
    let body =
        format!("<!doctype html><meta charset=utf-8><title>ClawOS login</title><p>{page}</p>\n");
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes()).await;
    let _ = conn.shutdown().await;
    code
}

/// Checks the token (read from stdin, or a prompt on a terminal) against the server
/// and keeps it with the trust.
pub async fn login(a: &ServerArgs, args: LoginArgs, json: bool) -> Result<(), Exit> {
    let Some(server) = a.server.as_deref().map(normalise) else {
        return Err(Exit(
            2,
            anyhow!("clawos login needs --server https://host:8080"),
        ));
    };
    let trust = trust_from_flags(a)?.ok_or_else(|| {
        Exit(
            2,
            anyhow!("give --ca FILE (the server's CA or self-signed certificate) or --fingerprint SHA256 (printed in the control plane's log at start)"),
        )
    })?;
    let token = match &args.token_file {
        _ if args.browser => browser_login(&server, &trust, !args.no_open).await?,
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| Exit(1, anyhow!("--token-file {}: {e}", p.display())))?,
        // On a terminal the token is read without echo: it is a credential.
        None if std::io::stdin().is_terminal() => {
            rpassword::prompt_password(format!("operator API token for {server}: "))
                .map_err(|e| Exit(1, anyhow!("reading the token: {e}")))?
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| Exit(1, anyhow!("reading the token: {e}")))?;
            line
        }
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(Exit(2, anyhow!("no token given")));
    }
    let client =
        ControlPlaneClient::connect(&server, &trust, &token).map_err(|e| Exit(2, anyhow!(e)))?;
    let me = client.whoami().await.map_err(api_exit)?;
    let mut creds = load()?;
    creds.servers.insert(
        server.clone(),
        Login {
            token,
            ca_pem: match &trust {
                ServerTrust::Ca(pem) => Some(String::from_utf8_lossy(pem).into_owned()),
                ServerTrust::Fingerprint(_) => None,
            },
            fingerprint: a.fingerprint.clone(),
        },
    );
    save(&creds)?;
    if json {
        print_json(&me).map_err(|e| Exit(1, e))?;
    } else {
        println!("logged in to {server} as {} ({})", me.operator, me.role);
    }
    Ok(())
}

/// Forgets the login for `--server`.
pub fn logout(a: &ServerArgs) -> Result<(), Exit> {
    let Some(server) = a.server.as_deref().map(normalise) else {
        return Err(Exit(2, anyhow!("clawos logout needs --server")));
    };
    let mut creds = load()?;
    if creds.servers.remove(&server).is_none() {
        return Err(Exit(3, anyhow!("not logged in to {server}")));
    }
    save(&creds)?;
    println!("logged out of {server}");
    Ok(())
}

/// `clawos operator …`: the control plane's operators.
#[derive(Debug, Subcommand)]
pub enum OperatorCmd {
    /// Who this CLI is to the control plane.
    Whoami,
    /// Operator API tokens.
    #[command(subcommand)]
    Token(OperatorTokenCmd),
    /// End an identity-provider user's access now: their browser sessions (and the
    /// streams opened through them), the tokens their `login --browser` made and any
    /// such login still waiting. For a user who left, after removing them at the
    /// provider. API tokens an admin made are revoked by id (`operator token revoke`).
    EndAccess {
        /// Their user name at the provider (`otto`), or their CLI token's (`cli-otto`).
        operator: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperatorTokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// Who holds it: [a-z0-9-], 1-63 characters.
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Lifetime: seconds, or a number with s, m, h or d (e.g. 12h, 30d).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

/// `90`, `90s`, `15m`, `12h`, `30d` → seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("ttl {s:?}: a number of seconds, or with s, m, h or d"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        other => return Err(format!("ttl {s:?}: unknown unit {other:?} (s, m, h or d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("ttl {s:?}: too long"))
}

pub async fn operator(
    client: &ControlPlaneClient,
    cmd: OperatorCmd,
    json: bool,
) -> Result<(), Exit> {
    let out = |e: anyhow::Error| Exit(1, e);
    match cmd {
        OperatorCmd::Whoami => {
            let me = client.whoami().await.map_err(api_exit)?;
            if json {
                print_json(&me).map_err(out)?;
            } else {
                println!("{} ({}) at {}", me.operator, me.role, client.server());
            }
        }
        OperatorCmd::EndAccess { operator } => {
            let ended = client.end_access(&operator).await.map_err(api_exit)?;
            if json {
                print_json(&ended).map_err(out)?;
            } else {
                println!(
                    "{}: {} session(s) ended, {} token(s) revoked",
                    ended.operator,
                    ended.sessions_ended,
                    ended.tokens_revoked.len()
                );
            }
        }
        OperatorCmd::Token(OperatorTokenCmd::Create { name, role, ttl }) => {
            let ttl_secs = parse_ttl(&ttl).map_err(|e| Exit(2, anyhow!(e)))?;
            let created = client
                .create_token(&CreateToken {
                    name,
                    role,
                    ttl_secs,
                })
                .await
                .map_err(api_exit)?;
            if json {
                print_json(&created).map_err(out)?;
            } else {
                eprintln!(
                    "created token {} for {} ({}), valid {}s; its secret is shown this once:",
                    created.info.id, created.info.name, created.info.role, ttl_secs
                );
                println!("{}", created.token);
            }
        }
        OperatorCmd::Token(OperatorTokenCmd::List) => {
            let tokens = client.list_tokens().await.map_err(api_exit)?;
            if json {
                print_json(&tokens).map_err(out)?;
            } else {
                println!(
                    "{:<16} {:<24} {:<9} {:>12} {:<8} CREATED BY",
                    "ID", "NAME", "ROLE", "EXPIRES", "STATE"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                for t in tokens {
                    let state = if t.revoked_at.is_some() {
                        "revoked"
                    } else if t.expires_at <= now {
                        "expired"
                    } else {
                        "active"
                    };
                    let left = t.expires_at.saturating_sub(now);
                    println!(
                        "{:<16} {:<24} {:<9} {:>11}h {:<8} {}",
                        t.id,
                        t.name,
                        t.role.to_string(),
                        left / 3600,
                        state,
                        t.created_by
                    );
                }
            }
        }
        OperatorCmd::Token(OperatorTokenCmd::Revoke { id }) => {
            client.revoke_token(&id).await.map_err(api_exit)?;
            if !json {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}

/// A command that has no remote form yet.
pub fn not_remote(what: &str) -> Exit {
    Exit(
        2,
        anyhow!(
            "`clawos {what}` works on the host's own files (its image store, its keys), not through --server: run it on the host"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_read_with_units_and_bad_ones_are_named() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("12h"), Ok(43200));
        assert_eq!(parse_ttl("30d"), Ok(2_592_000));
        assert!(parse_ttl("3w").expect_err("unit").contains("unknown unit"));
        assert!(parse_ttl("h").is_err());
    }
}
