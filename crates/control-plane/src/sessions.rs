//! Browser sessions: what an operator's login (an API token pasted into the console,
//! later OIDC or SAML) turns into. A session is a random id in a cookie that is
//! `Secure`, `HttpOnly` and `SameSite=Strict` (`__Host-` prefixed, so no subdomain can
//! set or read it), plus a CSRF token the page must echo in `x-csrf-token` on every
//! state-changing request. Sessions end after [`IDLE`] without a request, at
//! [`ABSOLUTE`] after login whatever happens, at logout, and when the token they came
//! from is revoked (checked on every request). They live in memory: a restart of the
//! daemon logs every browser out, which is the safe direction.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::operators::Operator;

/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after login, used or not.
pub const ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// The cookie's name (over TLS).
pub const COOKIE: &str = "__Host-clawos_session";
/// The cookie's name over plain HTTP on loopback (the `__Host-` prefix needs `Secure`).
pub const COOKIE_PLAIN: &str = "clawos_session";
/// The header a page echoes the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Most sessions held at once; the oldest is dropped past it.
const MAX_SESSIONS: usize = 10_000;
/// Most sessions one operator holds at once.
const MAX_PER_OPERATOR: usize = 32;

#[derive(Debug, Clone)]
struct Session {
    operator: Operator,
    csrf: String,
    created: Instant,
    last_seen: Instant,
}

/// A new session as the login answers it.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The cookie's value.
    pub id: String,
    pub csrf: String,
}

/// A session a request carried, still valid.
#[derive(Debug, Clone)]
pub struct Found {
    pub operator: Operator,
    pub csrf: String,
}

/// The live sessions, keyed by the SHA-256 of their id (a memory dump shows no
/// usable cookie).
#[derive(Debug, Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_token() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for `operator`.
    pub fn create(&self, operator: Operator) -> Result<NewSession, getrandom::Error> {
        let id = random_token()?;
        let csrf = random_token()?;
        let now = Instant::now();
        let mut map = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| alive(s, now));
        // One operator holds at most MAX_PER_OPERATOR sessions: logging in again and
        // again ends their own oldest, never someone else's.
        let mine: Vec<([u8; 32], Instant)> = map
            .iter()
            .filter(|(_, s)| s.operator.name == operator.name && s.operator.via == operator.via)
            .map(|(k, s)| (*k, s.created))
            .collect();
        if mine.len() >= MAX_PER_OPERATOR
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, c)| *c)
        {
            map.remove(oldest);
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            key(&id),
            Session {
                operator,
                csrf: csrf.clone(),
                created: now,
                last_seen: now,
            },
        );
        Ok(NewSession { id, csrf })
    }

    /// The session `id` names, if it is alive; counts as use (resets the idle clock).
    pub fn find(&self, id: &str) -> Option<Found> {
        let now = Instant::now();
        let mut map = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(id);
        let s = map.get_mut(&k)?;
        if !alive(s, now) {
            map.remove(&k);
            return None;
        }
        s.last_seen = now;
        Some(Found {
            operator: s.operator.clone(),
            csrf: s.csrf.clone(),
        })
    }

    /// Ends session `id` (logout).
    pub fn end(&self, id: &str) {
        self.by_hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(id));
    }

    /// Ends every identity-provider session (OIDC, SAML) of user `name`; how many.
    /// Sessions opened with an API token end with their token instead.
    pub fn end_for_operator(&self, name: &str) -> usize {
        let mut map = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|_, s| !(s.operator.name == name && s.operator.token_id.is_empty()));
        before - map.len()
    }

    /// Ends every session that came from token `token_id` (it was revoked).
    pub fn end_for_token(&self, token_id: &str) {
        self.by_hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| s.operator.token_id != token_id);
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last_seen) < IDLE && now.duration_since(s.created) < ABSOLUTE
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie_in<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| cookie(h, name))
}

/// Whether `a` and `b` are equal, in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawos_control_plane_api::Role;

    fn op(token_id: &str) -> Operator {
        Operator {
            name: "alice".into(),
            role: Role::Operator,
            via: "session",
            token_id: token_id.into(),
        }
    }

    #[test]
    fn a_session_is_found_by_its_id_until_logout_or_revocation() {
        let s = Sessions::default();
        let a = s.create(op("t1")).expect("random");
        let b = s.create(op("t2")).expect("random");
        assert_ne!(a.id, a.csrf);
        assert_eq!(s.find(&a.id).expect("alive").csrf, a.csrf);
        assert!(s.find("not-a-session").is_none());
        s.end(&a.id);
        assert!(s.find(&a.id).is_none(), "logged out");
        s.end_for_token("t2");
        assert!(s.find(&b.id).is_none(), "its token was revoked");
    }

    #[test]
    fn logging_in_again_and_again_ends_only_ones_own_oldest_session() {
        let s = Sessions::default();
        let other = s
            .create(Operator {
                name: "bob".into(),
                ..op("t9")
            })
            .expect("random");
        let first = s.create(op("t1")).expect("random");
        for _ in 0..MAX_PER_OPERATOR {
            s.create(op("t1")).expect("random");
        }
        assert!(s.find(&first.id).is_none(), "alice's oldest made room");
        assert!(s.find(&other.id).is_some(), "bob's session is untouched");
    }

    #[test]
    fn cookies_are_read_by_exact_name() {
        let h = "a=1; __Host-clawos_session=xyz; clawos_session_x=no";
        assert_eq!(cookie(h, COOKIE), Some("xyz"));
        assert_eq!(cookie(h, "clawos_session"), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    #[test]
    fn an_operators_sessions_end_together_and_no_one_elses() {
        let s = Sessions::default();
        let op = |name: &str, via: &'static str| Operator {
            name: name.into(),
            role: clawos_control_plane_api::Role::Viewer,
            via,
            token_id: String::new(),
        };
        let a1 = s.create(op("alice@example.com", "oidc")).expect("a1");
        let a2 = s.create(op("alice@example.com", "saml")).expect("a2");
        let b = s.create(op("bob", "oidc")).expect("b");
        // An API token that happens to bear the same name: it ends with its token.
        let t = s
            .create(Operator {
                token_id: "0123456789abcdef".into(),
                ..op("alice@example.com", "token")
            })
            .expect("t");
        assert_eq!(s.end_for_operator("alice@example.com"), 2);
        assert!(
            s.find(&t.id).is_some(),
            "a token's session ends with its token"
        );
        assert!(s.find(&a1.id).is_none() && s.find(&a2.id).is_none());
        assert!(
            s.find(&b.id).is_some(),
            "another operator's session survives"
        );
        assert_eq!(s.end_for_operator("alice@example.com"), 0);
    }
}
