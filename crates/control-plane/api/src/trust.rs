//! How a client trusts a control plane's certificate: a CA (PEM: the self-signed
//! certificate itself, a private CA, or none for a publicly trusted one … which ClawOS
//! clients do not carry: they never talk to the public web), or the SHA-256
//! fingerprint of the exact certificate (`--fingerprint`, what the daemon logs at
//! start): pinned, whatever signed it, and only that certificate.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// What a client trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// PEM certificates (a CA, or the server's own self-signed certificate).
    Ca(Vec<u8>),
    /// SHA-256 of the server certificate's DER: 64 hex digits, `:` separators allowed.
    Fingerprint([u8; 32]),
}

impl ServerTrust {
    /// Parses a fingerprint as `openssl x509 -fingerprint -sha256` or the daemon's log
    /// print it (`AB:CD:…`), or as plain hex.
    pub fn fingerprint(s: &str) -> Result<Self, String> {
        let hex: String = s.chars().filter(|c| *c != ':').collect();
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|b| b.len() == 32 && hex.len() == 64)
            .ok_or_else(|| {
                format!("fingerprint {s:?}: not a SHA-256 fingerprint (64 hex digits, ':' allowed)")
            })?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(Self::Fingerprint(out))
    }

    /// The rustls client configuration for this trust (ring, TLS 1.2+).
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?;
        let cfg = match self {
            Self::Ca(pem) => {
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("CA file: {e}"))?;
                    roots.add(cert).map_err(|e| format!("CA file: {e}"))?;
                }
                if roots.is_empty() {
                    return Err("CA file: no PEM certificate in it".into());
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Self::Fingerprint(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    fingerprint: *fp,
                    provider,
                }))
                .with_no_client_auth(),
        };
        Ok(cfg)
    }

    /// A reqwest client with this trust (no proxies, no redirects, 5 s connect).
    pub fn http_client(&self) -> Result<reqwest::Client, String> {
        let mut cfg = self.rustls_config()?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .use_preconfigured_tls(cfg)
            .connect_timeout(std::time::Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("HTTPS client: {e}"))
    }
}

/// Accepts exactly the certificate with this SHA-256, and checks the handshake's
/// signatures against it as usual (so only the holder of its key can use it).
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {} , not the pinned one",
                got.iter()
                    .map(|b| format!("{b:02X}"))
                    .collect::<Vec<_>>()
                    .join(":")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons_and_bad_ones_are_named() {
        let hex = "AB".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(
            ServerTrust::fingerprint(&hex).expect("plain"),
            ServerTrust::fingerprint(&colons).expect("colons")
        );
        let e = ServerTrust::fingerprint("abc").expect_err("short");
        assert!(e.contains("64 hex digits"), "{e}");
        assert!(ServerTrust::fingerprint(&"zz".repeat(32)).is_err());
        let e = ServerTrust::Ca(b"nothing".to_vec())
            .rustls_config()
            .expect_err("no PEM");
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
