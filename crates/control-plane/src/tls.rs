//! The certificate the control plane serves, and where it comes from:
//!
//! - **self-signed**: made with rcgen at the first start (ECDSA P-256, one year, the
//!   configured names as SANs) and kept in `<dir>/tls/` (key 0600); made anew when the
//!   names change or it has less than 30 days left. Its SHA-256 fingerprint is logged at
//!   every start so a client can pin it (`clawos --fingerprint`).
//! - **files**: a PEM chain and key given by the operator (another CA, a certificate
//!   issued elsewhere), re-read when either file changes; a pair that does not load is
//!   logged and the old certificate keeps serving.
//!
//! Either way the certificate sits in a [`CertStore`], which rustls asks at every
//! handshake ([`ResolvesServerCert`]): a new certificate is served to the next
//! handshake without a restart, and connections already open keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// Why a certificate could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the private key does not fit the certificate, or its type is not supported: {0}")]
    KeyMismatch(String),
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The certificate served now; replaced whole by [`CertStore::replace`].
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    /// TLS-ALPN-01 answers, when certificates come from ACME.
    acme: Option<Arc<crate::acme::Challenges>>,
}

impl CertStore {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(key),
            acme: None,
        })
    }

    /// A store that also answers TLS-ALPN-01 handshakes from `challenges`.
    pub fn with_acme(
        key: Arc<CertifiedKey>,
        challenges: Arc<crate::acme::Challenges>,
    ) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(key),
            acme: Some(challenges),
        })
    }

    /// Whether it answers TLS-ALPN-01.
    pub fn answers_acme(&self) -> bool {
        self.acme.is_some()
    }

    /// Serves `key` from the next handshake on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut g) => *g = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// SHA-256 of the served leaf certificate's DER, as `AB:CD:…`.
    pub fn fingerprint(&self) -> String {
        self.current()
            .cert
            .first()
            .map(|c| fingerprint(c.as_ref()))
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme_alpn = hello
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == crate::acme::ACME_TLS_ALPN));
        if acme_alpn {
            // A CA validating TLS-ALPN-01: its challenge certificate or nothing (RFC 8737
            // forbids answering acme-tls/1 with the ordinary certificate).
            let challenges = self.acme.as_ref()?;
            return challenges.alpn(hello.server_name()?);
        }
        Some(self.current())
    }
}

/// SHA-256 of `der` as upper-case hex pairs joined by `:` (what browsers and
/// `openssl x509 -fingerprint -sha256` show).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The rustls server configuration: TLS 1.2 and 1.3 only (rustls has nothing older),
/// HTTP/1.1, certificates from `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let store_answers_acme = store.answers_acme();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| TlsError::Generate(format!("TLS configuration: {e}")))?
    .with_no_client_auth()
    .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if store_answers_acme {
        cfg.alpn_protocols.push(crate::acme::ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(cfg))
}

/// Loads a PEM certificate chain and private key into a served key.
pub fn load_pem(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = std::fs::read(cert_path).map_err(io(cert_path))?;
    let key_pem = std::fs::read(key_path).map_err(io(key_path))?;
    certified_key(&cert_pem, &key_pem, cert_path, key_path)
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
    Ok(Arc::new(key))
}

/// How long a self-signed certificate is valid.
const SELF_SIGNED_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A self-signed certificate with less left than this is made anew (at start, and by
/// [`renew_self_signed`] while the daemon runs).
const SELF_SIGNED_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a running daemon looks at its self-signed certificate's end.
const SELF_SIGNED_CHECK: Duration = Duration::from_secs(12 * 3600);

/// Keeps a self-signed certificate served for as long as the daemon runs: twice a day
/// [`self_signed`] is asked again, and a new certificate (the old one near its end) is
/// served from the next handshake on; its fingerprint is logged, as at start, for
/// clients that pin it.
pub async fn renew_self_signed(store: Arc<CertStore>, dir: PathBuf, names: Vec<String>) {
    loop {
        tokio::time::sleep(SELF_SIGNED_CHECK).await;
        let (dir, names) = (dir.clone(), names.clone());
        match tokio::task::spawn_blocking(move || self_signed(&dir, &names)).await {
            Ok(Ok(key)) => {
                let same = key.cert.first().map(|c| c.as_ref().to_vec())
                    == store.current().cert.first().map(|c| c.as_ref().to_vec());
                if !same {
                    let fp = key
                        .cert
                        .first()
                        .map(|c| fingerprint(c.as_ref()))
                        .unwrap_or_default();
                    store.replace(key);
                    tracing::warn!(fingerprint = %fp, "self-signed certificate renewed (near its end); clients that pin the old fingerprint must take the new one");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot renew the self-signed certificate; still serving the current one")
            }
            Err(e) => tracing::error!(error = %e, "self-signed renewal task failed"),
        }
    }
}

/// The self-signed certificate for `names` in `dir` (`self-signed.crt`, `.key` 0600,
/// `.names`): the one kept there when it is for the same names and not near its end,
/// else a new one, written before it is served.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_path = dir.join("self-signed.crt");
    let key_path = dir.join("self-signed.key");
    let names_path = dir.join("self-signed.names");
    let wanted = names.join("\n");
    let kept_names = std::fs::read_to_string(&names_path).ok();
    let fresh_enough = std::fs::read_to_string(dir.join("self-signed.not-after"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|not_after| unix_now() + SELF_SIGNED_RENEW_BEFORE.as_secs() < not_after);
    if kept_names.as_deref() == Some(wanted.as_str()) && fresh_enough {
        match load_pem(&cert_path, &key_path) {
            Ok(k) => return Ok(k),
            Err(e) => {
                tracing::warn!(error = %e, "kept self-signed certificate does not load; making a new one")
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (cert_pem, key_pem, not_after) = generate(names)?;
    // Key first, 0600: a certificate on disk always has its key beside it.
    clawos_service::atomic_write(&key_path, key_pem.as_bytes(), 0o600).map_err(io(&key_path))?;
    clawos_service::atomic_write(&cert_path, cert_pem.as_bytes(), 0o644).map_err(io(&cert_path))?;
    let na = dir.join("self-signed.not-after");
    clawos_service::atomic_write(&na, not_after.to_string().as_bytes(), 0o644).map_err(io(&na))?;
    clawos_service::atomic_write(&names_path, wanted.as_bytes(), 0o644).map_err(io(&names_path))?;
    certified_key(
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        &cert_path,
        &key_path,
    )
}

/// A new self-signed certificate for `names`: (certificate PEM, key PEM, not-after).
fn generate(names: &[String]) -> Result<(String, String, u64), TlsError> {
    let err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    let now = SystemTime::now();
    // An hour back, for clients whose clocks run a little behind.
    params.not_before = (now - Duration::from_secs(3600)).into();
    let not_after = now + SELF_SIGNED_LIFETIME;
    params.not_after = not_after.into();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        "ClawOS control plane (self-signed)",
    );
    params.distinguished_name = dn;
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let not_after = not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Re-reads `cert` and `key` whenever either changes (checked every `every`) and serves
/// the new pair; a pair that does not load (a half-written renewal) is logged and the
/// old certificate keeps serving until a good pair appears.
pub async fn watch_files(store: Arc<CertStore>, cert: PathBuf, key: PathBuf, every: Duration) {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .map(|t| (t, std::fs::metadata(p).map_or(0, |m| m.len())))
    };
    let mut seen = (stamp(&cert), stamp(&key));
    let mut failed_for = None;
    loop {
        tokio::time::sleep(every).await;
        let now = (stamp(&cert), stamp(&key));
        if now == seen {
            continue;
        }
        match load_pem(&cert, &key) {
            Ok(k) => {
                let fp = k.cert.first().map(|c| fingerprint(c.as_ref()));
                store.replace(k);
                tracing::info!(cert = %cert.display(), fingerprint = fp.unwrap_or_default(), "certificate files changed: serving the new certificate");
                seen = now;
                failed_for = None;
            }
            Err(e) => {
                // Log once per change, not every tick.
                if failed_for != Some(now) {
                    tracing::error!(error = %e, "certificate files changed but do not load; still serving the previous certificate");
                    failed_for = Some(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_is_kept_for_the_same_names_and_made_anew_for_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let a = self_signed(dir.path(), &names).expect("made");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("self-signed.key"))
                .expect("key")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the key is the operator's alone");
        let b = self_signed(dir.path(), &names).expect("kept");
        assert_eq!(a.cert, b.cert, "same names: the kept certificate");
        let c = self_signed(dir.path(), &["cp.example.test".to_owned()]).expect("new");
        assert_ne!(a.cert, c.cert, "other names: a new certificate");
        // Near its end (what a daemon running for eleven months sees): made anew.
        let near = unix_now() + SELF_SIGNED_RENEW_BEFORE.as_secs() - 60;
        std::fs::write(dir.path().join("self-signed.not-after"), near.to_string()).expect("write");
        let d = self_signed(dir.path(), &["cp.example.test".to_owned()]).expect("renewed");
        assert_ne!(c.cert, d.cert, "a certificate near its end is replaced");
        let e = self_signed(dir.path(), &["cp.example.test".to_owned()]).expect("kept");
        assert_eq!(d.cert, e.cert, "the renewed one is then kept");
    }

    #[test]
    fn a_key_that_does_not_fit_its_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, _, _) = generate(&["a.test".to_owned()]).expect("a");
        let (_, other_key, _) = generate(&["b.test".to_owned()]).expect("b");
        std::fs::write(dir.path().join("c.pem"), cert).expect("write");
        std::fs::write(dir.path().join("k.pem"), other_key).expect("write");
        let err =
            load_pem(&dir.path().join("c.pem"), &dir.path().join("k.pem")).expect_err("mismatch");
        assert!(matches!(err, TlsError::KeyMismatch(_)), "{err}");
        std::fs::write(dir.path().join("k.pem"), "not a key").expect("write");
        let err =
            load_pem(&dir.path().join("c.pem"), &dir.path().join("k.pem")).expect_err("garbage");
        assert!(err.to_string().contains("k.pem"), "{err}");
    }
}
