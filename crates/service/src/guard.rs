//! Who may call a daemon's API, and from where: one [`Guard`] layer in front of every
//! route, so no handler can forget a check.
//!
//! In order, a request is refused when:
//! 1. its `Host` is not a loopback name or address (`127.0.0.1`, `[::1]`, `localhost`,
//!    any port) nor one the daemon allowed (its listen address): **403**. A web page
//!    that rebinds its own name to 127.0.0.1 still sends its own name as `Host`;
//! 2. it carries an `Origin` the daemon did not allow (none by default; `null` never):
//!    **403**. Browsers send `Origin` with every cross-origin request and every
//!    WebSocket handshake; the operator's own tools send none;
//! 3. the daemon requires a bearer credential and the request does not carry it
//!    (`Authorization: Bearer <token>`, compared in constant time), unless its path is
//!    one of the open ones (`/healthz`): **401**. WebSocket upgrades are requests like
//!    any other, so they need it too;
//! 4. it has a body (or a `Content-Type`) whose media type is not the one the daemon
//!    takes for its method (`application/json`; e.g. `application/octet-stream` for an
//!    upload `PUT`): **415**. A page can send `text/plain` or form bodies without a
//!    CORS preflight, never `application/json`.
//!
//! Refusals leave as the one error body ([`ErrorResponse`]); mount the guard inside
//! [`request_id`](crate::http::request_id) so they carry the request's id.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::http::ErrorResponse;

/// The media type a body must have when no other was set for its method.
pub const JSON: &str = "application/json";
/// The media type of raw uploads.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The checks in front of a daemon's routes (see the module documentation).
#[derive(Clone, Default)]
pub struct Guard(Arc<Policy>);

#[derive(Clone, Default)]
struct Policy {
    /// The bearer credential every request needs; `None`: the daemon checks its own.
    token: Option<String>,
    /// Where the operator finds the credential, for the 401 message.
    token_hint: String,
    /// Paths served without the credential (exact match).
    open_paths: Vec<String>,
    /// `Host` values allowed besides loopback ones (lowercase, exact).
    hosts: Vec<String>,
    /// Any `Host` passes (a daemon listening on every interface: see
    /// [`Guard::listening_on`]).
    any_host: bool,
    /// `Origin` values allowed (lowercase, exact).
    origins: Vec<String>,
    /// Media type of bodies per method, where not [`JSON`].
    body_types: Vec<(Method, &'static str)>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential itself.
        f.debug_struct("Guard")
            .field("bearer", &self.0.token.is_some())
            .field("open_paths", &self.0.open_paths)
            .field("hosts", &self.0.hosts)
            .field("any_host", &self.0.any_host)
            .field("origins", &self.0.origins)
            .field("body_types", &self.0.body_types)
            .finish()
    }
}

impl Guard {
    /// Host, Origin and body-type checks, no credential: for daemons that check their
    /// own (per route, or several kinds of caller).
    pub fn new() -> Self {
        Self::default()
    }

    fn edit(mut self, f: impl FnOnce(&mut Policy)) -> Self {
        f(Arc::make_mut(&mut self.0));
        self
    }

    /// Requires `Authorization: Bearer <token>` on every path but the open ones.
    /// `hint` says where the operator finds it (e.g. the file's path), in the 401
    /// message. An empty token matches nothing: every request is refused.
    #[must_use]
    pub fn bearer(self, token: &str, hint: &str) -> Self {
        let (token, hint) = (token.to_owned(), hint.to_owned());
        self.edit(|p| {
            p.token = Some(token);
            p.token_hint = hint;
        })
    }

    /// Serves `path` (exactly) without the credential, e.g. `/healthz`.
    #[must_use]
    pub fn open_path(self, path: &str) -> Self {
        let path = path.to_owned();
        self.edit(|p| p.open_paths.push(path))
    }

    /// Allows `host` (`name` or `name:port`, as a `Host` header carries it) besides the
    /// loopback ones, e.g. the daemon's own listen address.
    #[must_use]
    pub fn allow_host(self, host: &str) -> Self {
        let host = host.to_ascii_lowercase();
        self.edit(|p| p.hosts.push(host))
    }

    /// Allows the `Host` names a daemon listening on `addr` is reached by: none beyond
    /// loopback for a loopback address; `addr` itself for another one; any for a
    /// wildcard (`0.0.0.0`, `[::]`), whose name is not known here (such a daemon is
    /// reachable from the network anyway, and rests on its credential).
    #[must_use]
    pub fn listening_on(self, addr: std::net::SocketAddr) -> Self {
        if addr.ip().is_loopback() {
            self
        } else if addr.ip().is_unspecified() {
            self.edit(|p| p.any_host = true)
        } else {
            self.allow_host(&addr.to_string())
        }
    }

    /// Allows requests that carry one of these `Origin`s (`scheme://host[:port]`). A
    /// `null` origin is never allowed.
    #[must_use]
    pub fn allow_origins<I, O>(self, origins: I) -> Self
    where
        I: IntoIterator<Item = O>,
        O: AsRef<str>,
    {
        let origins: Vec<String> = origins
            .into_iter()
            .map(|o| o.as_ref().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| o != "null")
            .collect();
        self.edit(|p| p.origins.extend(origins))
    }

    /// Bodies of `method` requests must be `media_type` instead of [`JSON`]; given
    /// more than once for a method, any of the types given is taken.
    #[must_use]
    pub fn body_type(self, method: Method, media_type: &'static str) -> Self {
        self.edit(|p| p.body_types.push((method, media_type)))
    }

    /// `router` with this guard in front of every route, its fallback included.
    pub fn protect<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), guard))
    }

    /// Only the `Host` check of [`Guard::check`]: for a route that takes cross-site
    /// form posts by design (a SAML assertion consumer service), whose requests carry
    /// their own proof and no credential a page could ride on.
    pub fn check_host(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        check_host(&self.0, uri, headers)
    }

    /// Whether a request with this method, URI and headers may pass, and if not, the
    /// refusal.
    pub fn check(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        let p = &*self.0;
        check_host(p, uri, headers)?;
        check_origin(p, headers)?;
        check_credential(p, uri, headers)?;
        check_body_type(p, method, headers)
    }
}

/// Why a request was refused: the error body, plus `WWW-Authenticate` on a 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub ErrorResponse);

impl Refusal {
    fn forbidden(message: String) -> Self {
        Self(ErrorResponse::new(
            StatusCode::FORBIDDEN,
            clawos_api::code::FORBIDDEN,
            message,
        ))
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let unauthorized = self.0.status == StatusCode::UNAUTHORIZED;
        let mut resp = self.0.into_response();
        if unauthorized {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"clawos\""),
            );
        }
        resp
    }
}

async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    match g.check(req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::warn!(
                status = refusal.status().as_u16(),
                method = %req.method(),
                path = req.uri().path(),
                reason = %refusal.0.message,
                "request refused"
            );
            refusal.into_response()
        }
    }
}

/// The single value of header `name`: `Ok(None)` if absent, `Err` if repeated or not
/// visible ASCII.
fn single(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&str>, ()> {
    let mut values = headers.get_all(&name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(());
    }
    first.to_str().map(Some).map_err(drop)
}

/// Whether a `Host` value (`name[:port]`, `[v6][:port]`) names the loopback interface:
/// `localhost` or a loopback address, any port.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return false;
        }
        return v6
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|a| a.is_loopback());
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| IpAddr::V4(a).is_loopback())
}

fn is_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
}

fn check_host(p: &Policy, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
    let host = match single(headers, header::HOST) {
        Ok(Some(h)) => h.to_owned(),
        Ok(None) => match uri.authority() {
            Some(a) => a.as_str().to_owned(),
            None => {
                return Err(Refusal::forbidden(
                    "a request needs a Host header (HTTP/1.1)".into(),
                ));
            }
        },
        Err(()) => return Err(Refusal::forbidden("one Host header, please".into())),
    };
    if p.any_host
        || is_loopback_host(&host)
        || p.hosts.iter().any(|h| h.eq_ignore_ascii_case(&host))
    {
        return Ok(());
    }
    Err(Refusal::forbidden(format!(
        "Host {host:?} is not this daemon's address: it answers on loopback names only (DNS rebinding protection)"
    )))
}

fn check_origin(p: &Policy, headers: &HeaderMap) -> Result<(), Refusal> {
    match single(headers, header::ORIGIN) {
        Ok(None) => Ok(()),
        Ok(Some(o)) => {
            let o = o.trim_end_matches('/');
            if !o.eq_ignore_ascii_case("null")
                && p.origins.iter().any(|a| a.eq_ignore_ascii_case(o))
            {
                Ok(())
            } else {
                Err(Refusal::forbidden(format!(
                    "cross-origin requests are refused (Origin {o:?}): this API is for the operator's own tools, not web pages"
                )))
            }
        }
        Err(()) => Err(Refusal::forbidden("one Origin header, please".into())),
    }
}

fn check_credential(p: &Policy, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(token) = &p.token else {
        return Ok(());
    };
    if p.open_paths.iter().any(|o| o == uri.path()) {
        return Ok(());
    }
    let given = single(headers, header::AUTHORIZATION).unwrap_or(None);
    if crate::bearer_matches(given, token) {
        return Ok(());
    }
    let why = if given.is_some() {
        "wrong operator credential"
    } else {
        "needs the operator credential"
    };
    Err(Refusal(ErrorResponse::unauthorized(format!(
        "{why} (Authorization: Bearer <{}>)",
        p.token_hint
    ))))
}

fn check_body_type(p: &Policy, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
    let mut allowed: Vec<&str> = p
        .body_types
        .iter()
        .filter(|(m, _)| m == method)
        .map(|(_, t)| *t)
        .collect();
    if allowed.is_empty() {
        allowed.push(JSON);
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let given = match single(headers, header::CONTENT_TYPE) {
        Ok(Some(t)) => Some(t),
        Ok(None) if !has_body => return Ok(()),
        Ok(None) => None,
        Err(()) => None,
    };
    let essence = given.map(|t| t.split(';').next().unwrap_or("").trim());
    if essence.is_some_and(|e| allowed.iter().any(|w| e.eq_ignore_ascii_case(w))) {
        return Ok(());
    }
    let want = allowed.join(" or ");
    Err(Refusal(ErrorResponse::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        clawos_api::code::INVALID_REQUEST,
        format!(
            "{method} bodies must be Content-Type: {want} (got {})",
            given.map_or_else(|| "none".to_owned(), |t| format!("{t:?}"))
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        (method, uri.parse().expect("uri"), h)
    }

    fn status(g: &Guard, method: Method, uri: &str, headers: &[(&str, &str)]) -> u16 {
        let (m, u, h) = req(method, uri, headers);
        match g.check(&m, &u, &h) {
            Ok(()) => 200,
            Err(r) => r.status().as_u16(),
        }
    }

    #[test]
    fn loopback_hosts_are_names_and_addresses_of_loopback_only() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:2080",
            "127.1.2.3:80",
            "localhost",
            "LocalHost:2080",
            "[::1]",
            "[::1]:2080",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:2080",
            "localhost.evil.example",
            "127.0.0.1.nip.io:2080",
            "0.0.0.0:2080",
            "10.0.0.1",
            "[::]:2080",
            "[::ffff:127.0.0.1]:2080",
            "::1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:80:80",
            "[::1]x",
            "user@127.0.0.1",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn host_origin_credential_and_body_type_are_checked_in_that_order() {
        let g = Guard::new()
            .bearer("s3cret", "/state/token")
            .open_path("/healthz")
            .allow_host("10.0.0.5:2080")
            .allow_origins(["https://console.example/", "null"])
            .body_type(Method::PUT, OCTET_STREAM);
        let auth = ("authorization", "Bearer s3cret");
        let host = ("host", "127.0.0.1:2080");
        // The operator's own requests.
        assert_eq!(status(&g, Method::GET, "/v1/vms", &[host, auth]), 200);
        assert_eq!(
            status(
                &g,
                Method::GET,
                "/v1/vms",
                &[("host", "10.0.0.5:2080"), auth]
            ),
            200
        );
        let json = ("content-type", "application/json; charset=utf-8");
        let len = ("content-length", "12");
        assert_eq!(
            status(&g, Method::POST, "/v1/vms", &[host, auth, json, len]),
            200
        );
        assert_eq!(
            status(
                &g,
                Method::POST,
                "/v1/vms/x/stop",
                &[host, auth, ("content-length", "0")]
            ),
            200,
            "no body needs no type"
        );
        let octets = ("content-type", "application/octet-stream");
        assert_eq!(
            status(&g, Method::PUT, "/f", &[host, auth, octets, len]),
            200
        );
        assert_eq!(
            status(
                &g,
                Method::GET,
                "/x",
                &[host, auth, ("origin", "https://console.example")]
            ),
            200
        );
        // Open paths need no credential, but still a loopback Host.
        assert_eq!(status(&g, Method::GET, "/healthz", &[host]), 200);
        assert_eq!(status(&g, Method::GET, "/healthz/", &[host]), 401);
        assert_eq!(
            status(&g, Method::GET, "/healthz", &[("host", "evil.example")]),
            403
        );

        // 403: rebinding and cross-origin, before the credential is even looked at.
        for bad in [
            vec![("host", "evil.example:2080"), auth],
            vec![auth],
            vec![host, ("host", "127.0.0.1"), auth],
            vec![host, auth, ("origin", "http://evil.example")],
            vec![host, auth, ("origin", "null")],
            vec![host, auth, ("origin", "https://console.example.evil")],
            vec![("host", "evil.example")],
        ] {
            assert_eq!(status(&g, Method::GET, "/v1/vms", &bad), 403, "{bad:?}");
        }
        // 401: no credential, a wrong one, another scheme.
        for bad in [
            vec![host],
            vec![host, ("authorization", "Bearer s3cre")],
            vec![host, ("authorization", "Basic czNjcmV0")],
            vec![host, auth, ("authorization", "Bearer s3cret")],
        ] {
            assert_eq!(status(&g, Method::GET, "/v1/vms", &bad), 401, "{bad:?}");
        }
        // 415: simple-request bodies a page can send without a preflight.
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
        ] {
            let h = [host, auth, ("content-type", ct), len];
            assert_eq!(status(&g, Method::POST, "/v1/vms", &h), 415, "{ct}");
        }
        assert_eq!(status(&g, Method::POST, "/v1/vms", &[host, auth, len]), 415);
        assert_eq!(
            status(
                &g,
                Method::POST,
                "/v1/vms",
                &[host, auth, ("transfer-encoding", "chunked")]
            ),
            415
        );
        assert_eq!(status(&g, Method::PUT, "/f", &[host, auth, json, len]), 415);
        assert_eq!(
            status(&g, Method::POST, "/v1/vms", &[host, auth, octets, len]),
            415
        );
    }

    #[test]
    fn a_daemon_listening_elsewhere_is_reached_by_its_address() {
        let host = |g: &Guard, h: &str| status(g, Method::GET, "/", &[("host", h)]);
        let lo = Guard::new().listening_on("127.0.0.1:2084".parse().expect("addr"));
        assert_eq!(host(&lo, "10.0.0.5:2084"), 403);
        let one = Guard::new().listening_on("10.0.0.5:2084".parse().expect("addr"));
        assert_eq!(host(&one, "10.0.0.5:2084"), 200);
        assert_eq!(host(&one, "127.0.0.1:2084"), 200);
        assert_eq!(host(&one, "evil.example:2084"), 403);
        let v6 = Guard::new().listening_on("[fd00::5]:2084".parse().expect("addr"));
        assert_eq!(host(&v6, "[fd00::5]:2084"), 200);
        let any = Guard::new().listening_on("0.0.0.0:2084".parse().expect("addr"));
        assert_eq!(host(&any, "monitor.internal:2084"), 200);
        assert_eq!(
            status(
                &any,
                Method::GET,
                "/",
                &[("host", "x"), ("origin", "http://evil.example")]
            ),
            403,
            "origins are still checked"
        );
    }

    #[test]
    fn without_a_bearer_only_host_origin_and_body_type_are_checked() {
        let g = Guard::new();
        assert_eq!(
            status(&g, Method::GET, "/v1/x", &[("host", "localhost")]),
            200
        );
        assert_eq!(
            status(&g, Method::GET, "/v1/x", &[("host", "evil.example")]),
            403
        );
        assert_eq!(
            status(
                &g,
                Method::GET,
                "/v1/x",
                &[("host", "localhost"), ("origin", "http://localhost")]
            ),
            403
        );
        let empty = Guard::new().bearer("", "nowhere");
        assert_eq!(
            status(
                &empty,
                Method::GET,
                "/v1/x",
                &[("host", "localhost"), ("authorization", "Bearer ")]
            ),
            401,
            "an empty credential opens nothing"
        );
    }

    #[tokio::test]
    async fn refusals_leave_as_error_bodies_and_a_401_names_the_scheme() {
        use axum::body::Body;
        use tower::ServiceExt;
        let g = Guard::new().bearer("t", "/state/token");
        let app = g
            .protect(Router::new().route("/x", axum::routing::get(|| async { "ok" })))
            .layer(axum::middleware::from_fn(crate::http::request_id));
        let call = |headers: &[(&str, &str)]| {
            let mut r = Request::builder().uri("/x");
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            app.clone().oneshot(r.body(Body::empty()).expect("request"))
        };
        let resp = call(&[("host", "localhost")]).await.expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| v.as_bytes()),
            Some(&b"Bearer realm=\"clawos\""[..])
        );
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body");
        let e: clawos_api::ErrorBody = serde_json::from_slice(&body).expect("error body");
        assert_eq!(e.error.code, "unauthorized");
        assert!(
            e.error.message.contains("/state/token"),
            "{}",
            e.error.message
        );
        assert!(
            !e.error.message.contains("Bearer t>"),
            "never the credential"
        );
        assert_eq!(e.error.request_id.len(), 32);
        let resp = call(&[("host", "localhost"), ("authorization", "Bearer t")])
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
    }
}
