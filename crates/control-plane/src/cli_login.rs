//! `clawos login --browser`: an operator logs the CLI in through the OpenID provider,
//! as a native app does (RFC 8252). The CLI listens on a loopback port and opens
//! `/api/v1/login/oidc?cli_port=…&cli_state=…&cli_challenge=…` in the browser; after
//! the provider's login (checked exactly as a browser login is) the control plane
//! sends the browser not to the console but to `http://127.0.0.1:{cli_port}/callback`
//! with a one-time code and the CLI's state. The CLI trades the code, with the
//! verifier whose SHA-256 is `cli_challenge`, for an operator API token
//! ([`CLI_TOKEN_TTL_SECS`], the role the provider's groups give). A code is good once,
//! for [`CODE_TTL`], and only with that verifier: one seen in a browser's history or
//! caught by another local program is worth nothing without it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use clawos_api::code;
use clawos_control_plane_api::{CLI_TOKEN_TTL_SECS, CliToken, CreateToken, Role};
use clawos_service::http::ErrorResponse;
use sha2::{Digest, Sha256};

use crate::http::{App, AuditTarget, Shared};
use crate::operators::Operator;

/// How long a one-time code waits for the CLI.
pub const CODE_TTL: Duration = Duration::from_secs(60);
/// Codes waiting at once; past it the oldest goes.
const MAX_CODES: usize = 256;

/// Where a CLI's login is handed off: its loopback port, its state, its challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliHandoff {
    pub port: u16,
    pub state: String,
    pub challenge: String,
}

/// The optional CLI part of the OIDC login's query.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartQuery {
    cli_port: Option<u16>,
    cli_state: Option<String>,
    cli_challenge: Option<String>,
    /// Only check that such a login could start (204), starting none.
    #[serde(default)]
    cli_check: bool,
}

impl StartQuery {
    /// Whether the CLI only asks if its login could start.
    pub fn check_only(&self) -> bool {
        self.cli_check
    }
}

fn url_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The CLI hand-off a login asks for: none (a browser login), or all three parts,
/// checked.
pub fn handoff(q: StartQuery) -> Result<Option<CliHandoff>, ErrorResponse> {
    if q.cli_check && q.cli_port.is_none() {
        return Err(ErrorResponse::invalid(
            "cli_check is for a CLI login's parameters",
        ));
    }
    match (q.cli_port, q.cli_state, q.cli_challenge) {
        (None, None, None) => Ok(None),
        (Some(port), Some(state), Some(challenge)) => {
            if port == 0 {
                return Err(ErrorResponse::invalid(
                    "cli_port 0: the CLI's loopback port",
                ));
            }
            if !(16..=128).contains(&state.len()) || !url_safe(&state) {
                return Err(ErrorResponse::invalid(
                    "cli_state: 16-128 characters of A-Z a-z 0-9 - _",
                ));
            }
            if challenge.len() != 43 || !url_safe(&challenge) {
                return Err(ErrorResponse::invalid(
                    "cli_challenge: BASE64URL(SHA-256(verifier)), 43 characters",
                ));
            }
            Ok(Some(CliHandoff {
                port,
                state,
                challenge,
            }))
        }
        _ => Err(ErrorResponse::invalid(
            "a CLI login needs cli_port, cli_state and cli_challenge together",
        )),
    }
}

struct Waiting {
    name: String,
    role: Role,
    challenge: String,
    created: Instant,
}

/// One-time codes waiting for their CLI, keyed by the SHA-256 of the code.
#[derive(Default)]
pub struct CliCodes {
    waiting: Mutex<HashMap<[u8; 32], Waiting>>,
}

impl std::fmt::Debug for CliCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CliCodes(..)")
    }
}

impl CliCodes {
    fn add(&self, code: &str, w: Waiting) {
        let mut m = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, w| w.created.elapsed() < CODE_TTL);
        if m.len() >= MAX_CODES
            && let Some(oldest) = m.iter().min_by_key(|(_, w)| w.created).map(|(k, _)| *k)
        {
            m.remove(&oldest);
        }
        m.insert(Sha256::digest(code.as_bytes()).into(), w);
    }

    /// Forgets every code waiting for `user` (their access was ended); how many.
    pub fn forget_user(&self, user: &str) -> usize {
        let mut m = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, w| w.created.elapsed() < CODE_TTL);
        let before = m.len();
        m.retain(|_, w| w.name != user);
        before - m.len()
    }

    /// The provider users with a live code whose token would be named `token_name`.
    pub fn users_named(&self, token_name_: &str) -> Vec<String> {
        let m = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .filter(|w| w.created.elapsed() < CODE_TTL && token_name(&w.name) == token_name_)
            .map(|w| w.name.clone())
            .collect()
    }

    /// The login `code` stands for, once: it is gone whatever the answer.
    fn take(&self, code: &str) -> Option<Waiting> {
        let key: [u8; 32] = Sha256::digest(code.as_bytes()).into();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
            .filter(|w| w.created.elapsed() < CODE_TTL)
    }
}

/// The end of a CLI's provider login: a one-time code for `name`, and the browser sent
/// to the CLI's loopback port with it.
pub(crate) fn redirect_to_cli(
    app: &App,
    name: String,
    role: Role,
    cli: &CliHandoff,
) -> Result<Response, ErrorResponse> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| ErrorResponse::internal(format!("no randomness: {e}")))?;
    let code = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    app.cli_codes.add(
        &code,
        Waiting {
            name: name.clone(),
            role,
            challenge: cli.challenge.clone(),
            created: Instant::now(),
        },
    );
    // Only ever this machine's loopback: the port is all the caller chose.
    let location = format!(
        "http://127.0.0.1:{}/callback?code={code}&state={}",
        cli.port, cli.state
    );
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location)
            .map_err(|e| ErrorResponse::internal(format!("redirect: {e}")))?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.extensions_mut().insert(AuditTarget(name.clone()));
    resp.extensions_mut().insert(Operator {
        name,
        role,
        via: "oidc",
        token_id: String::new(),
    });
    Ok(resp)
}

/// A token's name for an identity-provider user: their name as a label (`[a-z0-9-]`,
/// at most 63), `cli-` first so it reads as what it is.
fn token_name(user: &str) -> String {
    let mut s: String = user
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = format!("cli-{}", s.trim_matches('-'));
    let mut s: String = s.chars().take(63).collect();
    while s.ends_with('-') {
        s.pop();
    }
    s
}

/// `POST /api/v1/login/cli/token`.
pub(crate) async fn cli_token(
    State(app): Shared,
    b: Result<Json<CliToken>, JsonRejection>,
) -> Result<Response, ErrorResponse> {
    let Json(req) = b.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let refused = || {
        ErrorResponse::new(
            StatusCode::UNAUTHORIZED,
            code::UNAUTHORIZED,
            "unknown, used or expired login code, or the wrong verifier: log in again",
        )
    };
    let waiting = app.cli_codes.take(&req.code).ok_or_else(refused)?;
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(req.verifier.as_bytes()));
    if !crate::sessions::same(&digest, &waiting.challenge) {
        return Err(refused());
    }
    let req = CreateToken {
        name: token_name(&waiting.name),
        role: waiting.role,
        ttl_secs: CLI_TOKEN_TTL_SECS,
    };
    let by = format!("oidc:{}", waiting.name);
    let created = crate::operator_routes::store(&app, move |s| s.create(&req, &by))
        .await?
        .map_err(|e| ErrorResponse::internal(format!("operator store: {e}")))?;
    let mut resp = (StatusCode::CREATED, Json(&created)).into_response();
    resp.extensions_mut()
        .insert(AuditTarget(created.info.id.clone()));
    // The trail names the provider's user (the token's own name, `cli-…`, names it in
    // the records of what it then does).
    resp.extensions_mut().insert(Operator {
        name: waiting.name,
        role: waiting.role,
        via: "oidc",
        token_id: created.info.id.clone(),
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_names_are_labels() {
        assert_eq!(token_name("alice"), "cli-alice");
        assert_eq!(
            token_name("Bob.Smith@Example.COM"),
            "cli-bob-smith-example-com"
        );
        assert_eq!(token_name("--"), "cli");
        let long = token_name(&"x".repeat(200));
        assert!(long.len() <= 63 && clawos_api::label_problem(&long).is_none());
    }

    #[test]
    fn a_cli_login_needs_all_three_parts_checked() {
        let q = |p: Option<u16>, s: Option<&str>, c: Option<&str>| StartQuery {
            cli_port: p,
            cli_state: s.map(str::to_owned),
            cli_challenge: c.map(str::to_owned),
            cli_check: false,
        };
        let good_c = "a".repeat(43);
        assert_eq!(handoff(q(None, None, None)).ok(), Some(None));
        assert!(
            handoff(q(Some(5000), Some("0123456789abcdef"), Some(&good_c)))
                .is_ok_and(|h| h.is_some())
        );
        assert!(handoff(q(Some(5000), None, Some(&good_c))).is_err());
        assert!(handoff(q(Some(0), Some("0123456789abcdef"), Some(&good_c))).is_err());
        assert!(handoff(q(Some(5000), Some("short"), Some(&good_c))).is_err());
        assert!(handoff(q(Some(5000), Some("0123456789abcdef&x=y"), Some(&good_c))).is_err());
        assert!(handoff(q(Some(5000), Some("0123456789abcdef"), Some("abc"))).is_err());
    }

    #[test]
    fn a_code_is_good_once_and_not_after_its_time() {
        let codes = CliCodes::default();
        let w = |age: Duration| Waiting {
            name: "alice".into(),
            role: Role::Viewer,
            challenge: "c".into(),
            created: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        };
        codes.add("fresh", w(Duration::ZERO));
        codes.add("stale", w(CODE_TTL + Duration::from_secs(1)));
        assert_eq!(
            codes.users_named("cli-alice"),
            ["alice"],
            "only the live code"
        );
        assert!(codes.take("fresh").is_some());
        assert!(codes.take("fresh").is_none(), "a code is used once");
        assert!(codes.take("stale").is_none(), "an expired code");
        assert!(codes.take("never").is_none());
        // Forgetting a user counts only live codes, and only theirs.
        codes.add("a", w(Duration::ZERO));
        codes.add("old", w(CODE_TTL + Duration::from_secs(1)));
        assert_eq!(codes.forget_user("bob"), 0);
        assert_eq!(codes.forget_user("alice"), 1);
        assert_eq!(codes.forget_user("alice"), 0);
    }
}
