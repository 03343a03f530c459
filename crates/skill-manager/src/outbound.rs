//! The host side of a skill's `wasi:http/outgoing-handler`: every request the
//! component makes arrives here, and only here can it leave the sandbox.
//!
//! - the destination (scheme, host, port of the URI) must equal one of the manifest's
//!   `http.allow` entries — names are compared as written, so an IP literal of an
//!   allowed name is refused, and a redirect is answered to the component as it is
//!   (never followed here): following it is a new request, checked again;
//! - the manifest's secrets are added as headers here, after the component let go of
//!   the request, so the component never holds them; a header of the same name the
//!   component set is replaced;
//! - the response body is read here up to the manifest's `response_kib` (more is an
//!   error for the component, never a truncated answer), and any secret value found in
//!   it or its headers is replaced by `[redacted]` before the component sees it;
//! - what was asked for, refused or answered is written to the call's record for the
//!   audit trail (destinations only; never headers or bodies).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clawos_service::error_chain;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use wasmtime_wasi_http::{Error as HttpError, WasiBody, WasiHttpHooks};

use crate::manifest::{Destination, Scheme};

/// Largest request body a skill may send.
pub const MAX_REQUEST_BODY: usize = 1 << 20;
/// Most requests one call may make.
pub const MAX_REQUESTS_PER_CALL: u32 = 32;
/// What replaces a secret found in a response.
const REDACTED: &[u8] = b"[redacted]";

/// A secret value on its way to a header; never printed.
#[derive(Clone)]
pub struct SecretHeader {
    pub name: String,
    pub header: HeaderName,
    pub value: HeaderValue,
    /// Where it is sent; every allowed destination when empty.
    pub to: Vec<Destination>,
}

impl SecretHeader {
    /// The header a manifest's grant asks for, with the host's `value`. `None` when the
    /// value cannot be a header value (the call then goes without it).
    pub fn for_grant(grant: &crate::manifest::SecretGrant, value: &str) -> Option<Self> {
        let mut v = HeaderValue::from_str(value).ok()?;
        v.set_sensitive(true);
        Some(Self {
            name: grant.name.clone(),
            header: HeaderName::from_bytes(grant.header.to_ascii_lowercase().as_bytes()).ok()?,
            value: v,
            // Fails closed: an entry that does not parse never widens to "everywhere".
            to: grant
                .to
                .iter()
                .map(|t| Destination::parse(t).ok())
                .collect::<Option<Vec<_>>>()?,
        })
    }
}

impl std::fmt::Debug for SecretHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretHeader")
            .field("name", &self.name)
            .field("header", &self.header)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// What one skill may reach, for one call.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    pub destinations: Vec<Destination>,
    pub secrets: Vec<SecretHeader>,
    pub response_max: usize,
}

/// One request a call made, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RequestRecord {
    /// `scheme://host:port` as asked for.
    pub destination: String,
    pub allowed: bool,
    /// Response status, when one came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Response body bytes handed to the component.
    pub bytes: u64,
    /// Why it failed or was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A request's `error` while it is out (still so in the record of a call given up
/// meanwhile).
pub const UNFINISHED: &str = "unfinished: the call ended before its answer";

/// The shared HTTP client skills' requests go out through.
#[derive(Debug, Clone)]
pub struct Outbound {
    client: reqwest::Client,
}

impl Outbound {
    /// `resolve` pins names to addresses (the offline demo and tests point an allowed
    /// name at a local server this way; a skill cannot change it).
    pub fn new(resolve: &HashMap<String, SocketAddr>) -> Result<Self, String> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(8);
        for (name, addr) in resolve {
            b = b.resolve(name, *addr);
        }
        Ok(Self {
            client: b.build().map_err(|e| e.to_string())?,
        })
    }
}

/// The hooks a call's store carries.
#[derive(Debug)]
pub struct CallHooks {
    pub outbound: Outbound,
    pub policy: OutboundPolicy,
    pub records: RequestLog,
    requests: u32,
}

/// The requests a call made so far, readable while it runs (and after it was dropped).
pub type RequestLog = Arc<Mutex<Vec<RequestRecord>>>;

impl CallHooks {
    pub fn new(outbound: Outbound, policy: OutboundPolicy) -> Self {
        Self::recording(outbound, policy, RequestLog::default())
    }

    /// Hooks that record the call's requests into `records`.
    pub fn recording(outbound: Outbound, policy: OutboundPolicy, records: RequestLog) -> Self {
        Self {
            outbound,
            policy,
            records,
            requests: 0,
        }
    }

    fn record(&self, r: RequestRecord) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r);
    }
}

/// The destination a request URI names.
fn destination_of(uri: &http::Uri) -> Option<Destination> {
    let scheme = match uri.scheme_str()? {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(match scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    });
    Some(Destination { scheme, host, port })
}

/// Replaces every occurrence of each secret in `bytes`.
fn redact(bytes: &[u8], secrets: &[SecretHeader]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for s in secrets {
        let needle = s.value.as_bytes();
        if needle.is_empty() {
            continue;
        }
        let hay = out.as_deref().unwrap_or(bytes);
        if !hay.windows(needle.len()).any(|w| w == needle) {
            continue;
        }
        let mut v = Vec::with_capacity(hay.len());
        let mut i = 0;
        while i < hay.len() {
            if hay[i..].starts_with(needle) {
                v.extend_from_slice(REDACTED);
                i += needle.len();
            } else {
                v.push(hay[i]);
                i += 1;
            }
        }
        out = Some(v);
    }
    out
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for CallHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>
    {
        let asked = destination_of(request.uri());
        let shown = asked
            .as_ref()
            .map_or_else(|| request.uri().to_string(), ToString::to_string);
        self.requests += 1;
        let allowed = asked
            .as_ref()
            .is_some_and(|d| self.policy.destinations.contains(d))
            && self.requests <= MAX_REQUESTS_PER_CALL;
        if !allowed {
            let why = if self.requests > MAX_REQUESTS_PER_CALL {
                format!("more than {MAX_REQUESTS_PER_CALL} requests in one call")
            } else {
                "not in the skill's http.allow".to_owned()
            };
            tracing::info!(destination = %shown, reason = %why, "skill request refused");
            self.record(RequestRecord {
                destination: shown,
                allowed: false,
                status: None,
                bytes: 0,
                error: Some(why),
            });
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let client = self.outbound.client.clone();
        let secrets = self.policy.secrets.clone();
        let dest = asked.clone();
        let max = self.policy.response_max;
        let records = Arc::clone(&self.records);
        // Recorded as soon as it is allowed, as unfinished, and completed when it ends:
        // a call given up while this request is out still shows where it went.
        let place = {
            let mut r = records.lock().unwrap_or_else(|p| p.into_inner());
            r.push(RequestRecord {
                destination: shown.clone(),
                allowed: true,
                status: None,
                bytes: 0,
                error: Some(UNFINISHED.into()),
            });
            r.len() - 1
        };
        Box::new(async move {
            let finish = |status: Option<u16>, bytes: u64, error: Option<String>| {
                if let Some(rec) = records
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(place)
                {
                    rec.status = status;
                    rec.bytes = bytes;
                    rec.error = error;
                }
            };
            let (parts, body) = request.into_parts();
            let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    finish(None, 0, Some("request body too large or broken".into()));
                    return Err(HttpError::HttpRequestBodySize(None));
                }
            };
            let mut headers = parts.headers;
            let sent_to = |s: &&SecretHeader| {
                s.to.is_empty() || dest.as_ref().is_some_and(|d| s.to.contains(d))
            };
            let mut carries_secret = false;
            for s in secrets.iter().filter(sent_to) {
                let mut v = s.value.clone();
                v.set_sensitive(true);
                headers.insert(s.header.clone(), v);
                carries_secret = true;
            }
            if carries_secret {
                // The answer must come back whole and plain, or redaction cannot see a
                // secret an upstream echoes (compressed, or a byte range at a time).
                headers.insert(
                    http::header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
                headers.remove(http::header::RANGE);
                headers.remove(http::header::IF_RANGE);
            }
            let sent = client
                .request(parts.method, parts.uri.to_string())
                .headers(headers)
                .body(body)
                .send()
                .await;
            let mut response = match sent {
                Ok(r) => r,
                Err(e) => {
                    let code = if e.is_timeout() {
                        HttpError::ConnectionTimeout
                    } else if e.is_connect() {
                        HttpError::ConnectionRefused
                    } else {
                        HttpError::HttpProtocolError
                    };
                    finish(None, 0, Some(error_chain(&e)));
                    return Err(code);
                }
            };
            let status = response.status();
            let encoded = response
                .headers()
                .get(http::header::CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            if carries_secret && encoded {
                finish(
                    Some(status.as_u16()),
                    0,
                    Some("an encoded answer to a request carrying a secret".into()),
                );
                return Err(HttpError::HttpResponseContentCoding(None));
            }
            let mut body = Vec::new();
            loop {
                match response.chunk().await {
                    Ok(Some(c)) => {
                        if body.len() + c.len() > max {
                            finish(
                                Some(status.as_u16()),
                                0,
                                Some(format!("response larger than {max} bytes")),
                            );
                            return Err(HttpError::HttpResponseBodySize(None));
                        }
                        body.extend_from_slice(&c);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        finish(Some(status.as_u16()), 0, Some(error_chain(&e)));
                        return Err(HttpError::HttpResponseIncomplete);
                    }
                }
            }
            let body = redact(&body, &secrets).unwrap_or(body);
            let mut out = http::Response::builder().status(status);
            for (name, value) in response.headers() {
                // The body is handed over whole; framing headers no longer apply.
                if name == http::header::TRANSFER_ENCODING || name == http::header::CONTENT_LENGTH {
                    continue;
                }
                let value = match redact(value.as_bytes(), &secrets) {
                    Some(v) => HeaderValue::from_bytes(&v).unwrap_or(HeaderValue::from_static("")),
                    None => value.clone(),
                };
                out = out.header(name, value);
            }
            finish(Some(status.as_u16()), body.len() as u64, None);
            let body = Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync();
            let response = out.body(body).map_err(|_| HttpError::HttpProtocolError)?;
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Destination {
        Destination::parse(s).expect("destination")
    }

    #[test]
    fn a_request_is_matched_by_scheme_host_and_port() {
        let of = |u: &str| destination_of(&u.parse().expect("uri"));
        assert_eq!(
            of("https://Search.Example/x?q=1"),
            Some(d("search.example:443"))
        );
        assert_eq!(
            of("http://127.0.0.1:8888/"),
            Some(d("http://127.0.0.1:8888"))
        );
        assert_eq!(of("https://[::1]:9/"), Some(d("[::1]:9")));
        assert_ne!(of("http://search.example/"), Some(d("search.example:443")));
        assert_ne!(
            of("https://search.example:444/"),
            Some(d("search.example:443"))
        );
        assert_eq!(of("ftp://x/"), None);
    }

    #[test]
    fn secrets_are_redacted_wherever_they_appear() {
        let s = SecretHeader {
            name: "K".into(),
            header: HeaderName::from_static("x-key"),
            value: HeaderValue::from_static("s3cr3t"),
            to: Vec::new(),
        };
        let out = redact(b"a s3cr3ts3cr3t b s3cr3", std::slice::from_ref(&s)).expect("changed");
        assert_eq!(out, b"a [redacted][redacted] b s3cr3");
        assert_eq!(redact(b"nothing here", &[s]), None);
    }
}
