//! Certificates from an ACME CA (Let's Encrypt, or any RFC 8555 server) with
//! `instant-acme`: the account key is kept (`<dir>/acme/account.json`, 0600), the
//! certificate and its key too (`cert.pem`, `key.pem` 0600), and a certificate is
//! renewed at two thirds of its lifetime and served from the next handshake on, without
//! a restart. A renewal that fails is logged and retried with a backoff while the
//! current certificate keeps serving; only an expired certificate stops being useful,
//! and the log says so before it happens.
//!
//! Challenges: **HTTP-01** when an HTTP responder address is given (the CA fetches
//! `http://<domain>/.well-known/acme-challenge/<token>` there: port 80 in production),
//! else **TLS-ALPN-01** on the control plane's own TLS port (the CA connects with ALPN
//! `acme-tls/1` and is shown a certificate carrying the key authorization's digest;
//! such a connection never reaches HTTP).
//!
//! Until the first certificate arrives the listener serves a self-signed one, so
//! TLS-ALPN-01 can be answered at all and the API is reachable (with a warning) from the
//! first second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;

use crate::tls::{CertStore, fingerprint};

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// What the operator configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The CA's directory URL.
    pub directory: String,
    /// The names the certificate is for.
    pub domains: Vec<String>,
    /// A contact for the account (`mailto:…`).
    pub contact: Option<String>,
    /// PEM root to trust for the directory's own HTTPS (a private or test CA); the
    /// system's roots otherwise.
    pub ca_cert: Option<PathBuf>,
    /// Where to answer HTTP-01 (e.g. `0.0.0.0:80`); TLS-ALPN-01 when absent.
    pub http01_addr: Option<SocketAddr>,
}

/// Why getting a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("ACME: {0}")]
    Other(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Challenge answers in flight, read by the TLS resolver and the HTTP-01 responder.
#[derive(Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization.
    http: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: domain → the challenge certificate.
    alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The key authorization for an HTTP-01 token.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// The TLS-ALPN-01 certificate for `domain`.
    pub fn alpn(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&domain.to_ascii_lowercase())
            .cloned()
    }

    fn clear(&self) {
        self.http.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.alpn.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A certificate's validity window, read from its DER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Of the leaf certificate of `key`.
    pub fn of(key: &CertifiedKey) -> Option<Self> {
        use x509_cert::der::Decode;
        let leaf = key.cert.first()?;
        let cert = x509_cert::Certificate::from_der(leaf.as_ref()).ok()?;
        let v = &cert.tbs_certificate.validity;
        Some(Self {
            not_before: v.not_before.to_system_time(),
            not_after: v.not_after.to_system_time(),
        })
    }

    /// When to renew: two thirds into the lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }
}

/// Makes the TLS-ALPN-01 certificate for `domain` (RFC 8737: self-signed, the one SAN,
/// the critical acmeIdentifier extension holding SHA-256 of the key authorization).
pub fn alpn_certificate(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let err = |e: rcgen::Error| AcmeError::Other(format!("TLS-ALPN-01 certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()]).map_err(err)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Not `CertifiedKey::from_der`: its consistency check parses the certificate with
    // webpki, which (rightly, for ordinary use) refuses the critical acmeIdentifier
    // extension this certificate exists to carry. The key is the one just made for it.
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| AcmeError::Other(format!("TLS-ALPN-01 certificate key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

/// Gets and renews the certificate the [`CertStore`] serves.
#[derive(Debug)]
pub struct Acme {
    settings: AcmeSettings,
    dir: PathBuf,
    store: Arc<CertStore>,
    challenges: Arc<Challenges>,
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    clawos_service::atomic_write(path, bytes, 0o600).map_err(|source| AcmeError::Io {
        path: path.to_owned(),
        source,
    })
}

impl Acme {
    /// `dir` is `<state>/control-plane/tls/acme`.
    pub fn new(
        settings: AcmeSettings,
        dir: PathBuf,
        store: Arc<CertStore>,
        challenges: Arc<Challenges>,
    ) -> Self {
        Self {
            settings,
            dir,
            store,
            challenges,
        }
    }

    /// The certificate kept from an earlier run, if it is for the configured names and
    /// not expired.
    pub fn kept(&self) -> Option<(Arc<CertifiedKey>, Validity)> {
        let names = std::fs::read_to_string(self.dir.join("names")).ok()?;
        if names != self.settings.domains.join("\n") {
            return None;
        }
        let key =
            crate::tls::load_pem(&self.dir.join("cert.pem"), &self.dir.join("key.pem")).ok()?;
        let validity = Validity::of(&key)?;
        (SystemTime::now() < validity.not_after).then_some((key, validity))
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let builder = match &self.settings.ca_cert {
            Some(ca) => Account::builder_with_root(ca)?,
            None => Account::builder()?,
        };
        let path = self.dir.join("account.json");
        if let Ok(bytes) = std::fs::read(&path)
            && let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&bytes)
        {
            return Ok(builder.from_credentials(creds).await?);
        }
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let (account, creds) = builder
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                None,
            )
            .await?;
        let json = serde_json::to_vec(&creds)
            .map_err(|e| AcmeError::Other(format!("account credentials: {e}")))?;
        write_private(&path, &json)?;
        tracing::info!(directory = %self.settings.directory, "ACME account created; its key is kept in {}", path.display());
        Ok(account)
    }

    /// Runs one order to the end: (certificate chain PEM, key PEM).
    pub async fn issue(&self) -> Result<(String, String), AcmeError> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let kind = if self.settings.http01_addr.is_some() {
            ChallengeType::Http01
        } else {
            ChallengeType::TlsAlpn01
        };
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::Other(format!(
                            "an authorization is {other:?}, cannot go on"
                        )));
                    }
                }
                let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                    AcmeError::Other(format!("the CA offers no {kind:?} challenge"))
                })?;
                let key_auth = challenge.key_authorization();
                let domain = challenge.identifier().to_string();
                match kind {
                    ChallengeType::Http01 => {
                        self.challenges
                            .http
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(challenge.token.clone(), key_auth.as_str().to_owned());
                    }
                    _ => {
                        let cert = alpn_certificate(&domain, key_auth.digest().as_ref())?;
                        self.challenges
                            .alpn
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(domain.to_ascii_lowercase(), cert);
                    }
                }
                challenge.set_ready().await?;
            }
            let retry = RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .timeout(Duration::from_secs(90));
            let status = order.poll_ready(&retry).await?;
            if status != OrderStatus::Ready {
                return Err(AcmeError::Other(format!(
                    "order is {status:?}, not ready: a challenge failed (is {} reachable for the CA?)",
                    self.settings
                        .http01_addr
                        .map_or("the TLS port".to_owned(), |a| a.to_string())
                )));
            }
            let key_pem = order.finalize().await?;
            let chain_pem = order.poll_certificate(&retry).await?;
            Ok((chain_pem, key_pem))
        }
        .await;
        self.challenges.clear();
        result
    }

    /// Issues a certificate, stores it (0600 key) and serves it.
    async fn renew_once(&self) -> Result<Validity, AcmeError> {
        let (chain, key) = self.issue().await?;
        std::fs::create_dir_all(&self.dir).map_err(|source| AcmeError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let (cert_path, key_path) = (self.dir.join("cert.pem"), self.dir.join("key.pem"));
        write_private(&key_path, key.as_bytes())?;
        write_private(&cert_path, chain.as_bytes())?;
        write_private(
            &self.dir.join("names"),
            self.settings.domains.join("\n").as_bytes(),
        )?;
        let served = crate::tls::load_pem(&cert_path, &key_path)
            .map_err(|e| AcmeError::Other(format!("the issued certificate does not load: {e}")))?;
        let validity = Validity::of(&served).ok_or_else(|| {
            AcmeError::Other("the issued certificate has no readable validity".into())
        })?;
        let fp = served.cert.first().map(|c| fingerprint(c.as_ref()));
        self.store.replace(served);
        tracing::info!(
            domains = ?self.settings.domains,
            fingerprint = fp.unwrap_or_default(),
            not_after = ?validity.not_after,
            "ACME certificate issued and now served"
        );
        Ok(validity)
    }

    /// Keeps a valid certificate served for as long as the daemon runs.
    pub async fn run(self, mut current: Option<Validity>) {
        let mut failures: u32 = 0;
        let mut retry_now = false;
        loop {
            let wait = if std::mem::take(&mut retry_now) {
                Duration::ZERO
            } else {
                current
                    .map(|v| v.renew_at())
                    .and_then(|at| at.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default()
            };
            if !wait.is_zero() {
                tracing::info!(
                    renew_in_secs = wait.as_secs(),
                    "ACME certificate valid; renewal scheduled at two thirds of its lifetime"
                );
                tokio::time::sleep(wait).await;
            }
            match self.renew_once().await {
                Ok(v) => {
                    current = Some(v);
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    let left =
                        current.and_then(|v| v.not_after.duration_since(SystemTime::now()).ok());
                    // Retry sooner than the end of the current certificate, never
                    // faster than every 5 s, never slower than hourly.
                    let backoff = Duration::from_secs(5u64.saturating_mul(1 << failures.min(10)))
                        .min(Duration::from_secs(3600))
                        .min(left.map_or(Duration::from_secs(3600), |l| {
                            (l / 4).max(Duration::from_secs(5))
                        }));
                    match left {
                        Some(l) => {
                            tracing::error!(error = %e, attempt = failures, retry_in_secs = backoff.as_secs(), expires_in_secs = l.as_secs(), "ACME renewal failed; still serving the current certificate")
                        }
                        None => {
                            tracing::error!(error = %e, attempt = failures, retry_in_secs = backoff.as_secs(), "ACME issuance failed; serving the self-signed placeholder")
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    // Then straight to the next attempt (the loop's wait is for a
                    // renewal not yet due), keeping the real validity for the log.
                    retry_now = true;
                }
            }
        }
    }
}

/// The HTTP-01 responder: answers `/.well-known/acme-challenge/<token>` with the key
/// authorization, everything else with 404. Plain HTTP, no credential: it holds
/// nothing secret (a key authorization is public by design).
pub fn http01_router(challenges: Arc<Challenges>) -> axum::Router {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    async fn answer(
        State(c): State<Arc<Challenges>>,
        UrlPath(token): UrlPath<String>,
    ) -> axum::response::Response {
        match c.http01(&token) {
            Some(k) => k.into_response(),
            None => (StatusCode::NOT_FOUND, "no such challenge\n").into_response(),
        }
    }
    axum::Router::new()
        .route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(answer),
        )
        .with_state(challenges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v = Validity {
            not_before: t0,
            not_after: t0 + Duration::from_secs(90 * 24 * 3600),
        };
        assert_eq!(v.renew_at(), t0 + Duration::from_secs(60 * 24 * 3600));
    }

    #[test]
    fn the_alpn_certificate_carries_the_digest_and_the_validity_is_read_back() {
        let digest = [7u8; 32];
        let c = alpn_certificate("cp.clawos.test", &digest).expect("made");
        let der = c.cert[0].as_ref();
        // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), then the OCTET STRING of the digest.
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        assert!(
            der.windows(oid.len()).any(|w| w == oid),
            "no acmeIdentifier"
        );
        assert!(der.windows(32).any(|w| w == digest), "no digest");
        let v = Validity::of(&c).expect("validity");
        assert!(v.not_before < v.not_after);
    }
}
