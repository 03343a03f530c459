//! What every ClawOS REST API shares on the wire, so a server and its typed client
//! cannot drift apart:
//!
//! - [`Route`]: one route table entry (method + path template). The daemon's router
//!   mounts `route.path`, its client fills the same template with [`Route::path_with`];
//!   no path is typed twice.
//! - [`ErrorBody`]: the one error body of every API,
//!   `{"error": {"code": "...", "message": "...", "request_id": "..."}}`.
//! - [`code`]: the machine-readable error codes, and [`exit_code`], how the `clawos`
//!   command turns a code into its exit status.
//! - [`HttpClient`]: the base every typed client is built on (bearer credential, error
//!   decoding into [`ClientError`]).
//!
//! The agent-facing LLM endpoints of inference-proxy are not ClawOS APIs: they speak
//! Anthropic's and OpenAI's own error shapes, because agents use those vendors' SDKs.

use std::fmt::Write as _;
use std::time::Duration;

pub use reqwest::Method;
use serde::{Deserialize, Serialize};

/// Header carrying the id of one request, in both directions: a client may send one
/// (16–64 characters of `[A-Za-z0-9_-]`), otherwise the server makes one; the answer
/// always carries it, and so does every error body.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// One route of an API: its method and its path template, with `{name}` segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: RouteMethod,
    /// The template, e.g. `/v1/vms/{name}/stop` (axum's syntax, mounted as is).
    pub path: &'static str,
}

/// The methods ClawOS routes use (a `const`-friendly copy of [`Method`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMethod {
    Get,
    Post,
    Put,
    Delete,
}

impl RouteMethod {
    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Self::Get => Method::GET,
            Self::Post => Method::POST,
            Self::Put => Method::PUT,
            Self::Delete => Method::DELETE,
        }
    }
}

impl Route {
    pub const fn get(path: &'static str) -> Self {
        Self {
            method: RouteMethod::Get,
            path,
        }
    }
    pub const fn post(path: &'static str) -> Self {
        Self {
            method: RouteMethod::Post,
            path,
        }
    }
    pub const fn put(path: &'static str) -> Self {
        Self {
            method: RouteMethod::Put,
            path,
        }
    }
    pub const fn delete(path: &'static str) -> Self {
        Self {
            method: RouteMethod::Delete,
            path,
        }
    }

    /// The path with each `{…}` segment replaced, in order, by `args` (percent-encoded,
    /// so an argument can never add a segment or a query).
    ///
    /// # Panics
    /// Never on caller input; a route whose template has a different number of
    /// parameters than `args` is a programming error caught by every test that uses
    /// it, and yields a path the server answers with 404.
    pub fn path_with(&self, args: &[&str]) -> String {
        let mut out = String::with_capacity(self.path.len() + 16);
        let mut args = args.iter();
        let mut rest = self.path;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let Some(end) = rest[start..].find('}') else {
                break;
            };
            match args.next() {
                Some(a) => encode_segment(&mut out, a),
                None => out.push_str(&rest[start..start + end + 1]),
            }
            rest = &rest[start + end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_segment(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// The local operator's credential for a daemon: the file the environment variable
/// `path_env` names, else `default_path` (the daemon's `<state>/<daemon>/admin.token`).
/// The error names the file and why it could not be read.
pub fn local_token(path_env: &str, default_path: &std::path::Path) -> Result<String, String> {
    let path = std::env::var_os(path_env)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| default_path.to_owned());
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        Ok(_) => Err(format!("{} is empty", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Why `name` is not a name a ClawOS API takes (a VM, a snapshot tag, an image), or
/// `None` when it is one: a DNS label, `[a-z0-9-]`, 1–63 characters, not starting or
/// ending with `-`. Such a name can name a directory and is never a path.
pub fn label_problem(name: &str) -> Option<String> {
    const MAX: usize = 63;
    if name.is_empty() {
        return Some("empty".into());
    }
    if name.len() > MAX {
        return Some(format!(
            "{} characters, at most {MAX}",
            name.chars().count()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("only lowercase a-z, digits and '-' are allowed".into());
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("must not start or end with '-'".into());
    }
    None
}

/// The error body of every ClawOS API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Machine-readable kind, one of [`code`].
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The request's id ([`REQUEST_ID_HEADER`]), to find it in the daemon's log.
    #[serde(default)]
    pub request_id: String,
}

/// The machine-readable error codes. A daemon may add its own; clients treat an
/// unknown code by its HTTP status class.
pub mod code {
    /// The request is malformed or a value is out of range (400).
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// No credential, or a wrong one (401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The credential is valid but does not allow this (403).
    pub const FORBIDDEN: &str = "forbidden";
    /// No such thing (404).
    pub const NOT_FOUND: &str = "not_found";
    /// The thing's state does not allow the operation (409).
    pub const CONFLICT: &str = "conflict";
    /// Too many requests (429).
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The host side failed (500).
    pub const INTERNAL: &str = "internal";
    /// A service this one depends on is not there (502/503).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Image refused: no signature while one is required (422).
    pub const IMAGE_UNSIGNED: &str = "image_unsigned";
    /// Image refused: the signature does not verify, or is malformed (422).
    pub const IMAGE_BAD_SIGNATURE: &str = "image_bad_signature";
    /// Image refused: a file's sha256 differs from the manifest's (422).
    pub const IMAGE_HASH_MISMATCH: &str = "image_hash_mismatch";
    /// Image refused: the rootfs size differs from the manifest's (422).
    pub const IMAGE_SIZE_MISMATCH: &str = "image_size_mismatch";
    /// Image refused: the root hash is not the pinned one (422).
    pub const IMAGE_ROOT_HASH_MISMATCH: &str = "image_root_hash_mismatch";
    /// Image refused: the manifest is malformed, of another version, or a file is
    /// missing, or the backend cannot boot it (422).
    pub const IMAGE_INVALID: &str = "image_invalid";
}

/// Exit status of the `clawos` command for an API error code:
///
/// | status | meaning |
/// |---|---|
/// | 1 | any other failure: a request the service found invalid, internal, unknown code |
/// | 2 | the command line's own usage errors (clap) |
/// | 3 | not found |
/// | 4 | conflict: the state does not allow it |
/// | 5 | image refused (any `image_*` code) |
/// | 6 | (the CLI's own: the VM failed to boot) |
/// | 7 | a service is unreachable or unavailable |
/// | 8 | rate limited |
/// | 9 | unauthorized or forbidden: no credential, or a wrong one |
pub fn exit_code(code: &str) -> u8 {
    // A request the service refused as invalid stays 1, as it always was (scripts and
    // the end-to-end tests rely on it); 2 is left to clap's usage errors.
    match code {
        code::NOT_FOUND => 3,
        code::CONFLICT => 4,
        code::UNAUTHORIZED | code::FORBIDDEN => 9,
        code::UNAVAILABLE => 7,
        code::RATE_LIMITED => 8,
        c if c.starts_with("image_") => 5,
        _ => 1,
    }
}

/// Errors of every typed client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error body.
    #[error("{message} (HTTP {status}, {code}, request {request_id})")]
    Api {
        status: u16,
        code: String,
        message: String,
        request_id: String,
    },
    /// The service could not be reached, or its answer could not be read.
    #[error("cannot talk to {service} at {url}: {source}")]
    Transport {
        service: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Transport { .. } => None,
        }
    }

    /// The machine-readable code; `unavailable` when the service was not reached.
    pub fn code(&self) -> &str {
        match self {
            Self::Api { code, .. } => code,
            Self::Transport { .. } => code::UNAVAILABLE,
        }
    }

    /// The `clawos` exit status for this error ([`exit_code`]).
    pub fn exit_code(&self) -> u8 {
        exit_code(self.code())
    }
}

/// The base of every typed client: a base URL, an optional bearer credential, and the
/// decoding of [`ErrorBody`] answers.
#[derive(Debug, Clone)]
pub struct HttpClient {
    service: &'static str,
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl HttpClient {
    /// A client for `service` (named in errors) at `base`, e.g. `http://127.0.0.1:2080`.
    pub fn new(service: &'static str, base: &str) -> Self {
        // A fallback client would follow redirects (and take proxies from the
        // environment), so there is none: without a TLS backend and without proxies,
        // building cannot fail.
        #[allow(clippy::expect_used)]
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Credentials never follow a redirect to another host...
            .redirect(reqwest::redirect::Policy::none())
            // ...nor go through a proxy named by an environment variable.
            .no_proxy()
            .build()
            .expect("a reqwest client without TLS or proxies always builds");
        Self {
            service,
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            http,
        }
    }

    /// A client of `base` over `http`, a client the caller built (e.g. one that trusts
    /// a given certificate authority or pins a server certificate).
    pub fn with_http(service: &'static str, base: &str, http: reqwest::Client) -> Self {
        Self {
            service,
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            http,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer credential, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The full URL of a route.
    pub fn url(&self, route: Route, args: &[&str]) -> String {
        format!("{}{}", self.base, route.path_with(args))
    }

    /// The WebSocket URL (`ws://`/`wss://`) of a route.
    pub fn ws_url(&self, route: Route, args: &[&str]) -> String {
        self.url(route, args)
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
    }

    /// A request for `route`, with the credential attached.
    pub fn request(&self, route: Route, args: &[&str]) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(route.method.method(), self.url(route, args));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        ClientError::Transport {
            service: self.service,
            url: self.base.clone(),
            source,
        }
    }

    /// Sends a request; a non-2xx answer becomes [`ClientError::Api`].
    pub async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let header_id = resp
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = resp.bytes().await.map_err(|e| self.transport(e))?;
        Err(decode_error(status, &body, header_id))
    }

    /// Sends a request and decodes a JSON answer.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(req)
            .await?
            .json()
            .await
            .map_err(|e| self.transport(e))
    }

    /// Sends a request and returns the answer's bytes.
    pub async fn bytes(&self, req: reqwest::RequestBuilder) -> Result<Vec<u8>, ClientError> {
        let resp = self.send(req).await?;
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| self.transport(e))
    }
}

/// An [`ErrorBody`] (or, from something that is not a ClawOS API, its text) as a
/// [`ClientError::Api`]. Public so WebSocket clients can decode a refused upgrade.
pub fn decode_error(status: u16, body: &[u8], header_request_id: String) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => ClientError::Api {
            status,
            code: error.code,
            message: error.message,
            request_id: if error.request_id.is_empty() {
                header_request_id
            } else {
                error.request_id
            },
        },
        Err(_) => ClientError::Api {
            status,
            code: fallback_code(status).to_owned(),
            message: String::from_utf8_lossy(body).trim().to_owned(),
            request_id: header_request_id,
        },
    }
}

/// The code an answer without an [`ErrorBody`] is given, by its status.
fn fallback_code(status: u16) -> &'static str {
    match status {
        400 => code::INVALID_REQUEST,
        401 => code::UNAUTHORIZED,
        403 => code::FORBIDDEN,
        404 => code::NOT_FOUND,
        409 => code::CONFLICT,
        429 => code::RATE_LIMITED,
        502..=504 => code::UNAVAILABLE,
        _ => code::INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_filled_in_order_and_encoded() {
        let r = Route::delete("/v1/vms/{name}/snapshots/{tag}");
        assert_eq!(r.path_with(&["a", "t1"]), "/v1/vms/a/snapshots/t1");
        assert_eq!(
            r.path_with(&["../x", "a b?c"]),
            "/v1/vms/..%2Fx/snapshots/a%20b%3Fc",
            "an argument can add no segment and no query"
        );
        assert_eq!(Route::get("/v1/vms").path_with(&[]), "/v1/vms");
    }

    #[test]
    fn error_bodies_round_trip_and_foreign_bodies_get_a_code_by_status() {
        let body = br#"{"error":{"code":"image_hash_mismatch","message":"m","request_id":"r1"}}"#;
        let e = decode_error(422, body, String::new());
        assert_eq!(e.code(), "image_hash_mismatch");
        assert_eq!(e.exit_code(), 5);
        assert!(e.to_string().contains("request r1"));
        let e = decode_error(404, b"not json", "h1".into());
        assert_eq!(e.code(), code::NOT_FOUND);
        assert_eq!(e.exit_code(), 3);
        assert!(matches!(e, ClientError::Api { ref request_id, .. } if request_id == "h1"));
    }

    #[test]
    fn exit_codes_follow_the_error_code_not_the_status() {
        assert_eq!(exit_code(code::CONFLICT), 4);
        assert_eq!(exit_code(code::INVALID_REQUEST), 1);
        assert_eq!(exit_code(code::IMAGE_BAD_SIGNATURE), 5);
        assert_eq!(exit_code(code::UNAUTHORIZED), 9);
        assert_eq!(exit_code(code::UNAVAILABLE), 7);
        assert_eq!(exit_code("something_new"), 1);
    }
}
