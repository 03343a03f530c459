//! control-plane (port 8080): the one ClawOS listener meant for other machines. HTTPS
//! only (unless plain HTTP is asked for on loopback, or insisted on elsewhere), every
//! request authenticated (operator API tokens, [`operators`]), authorized by role and
//! recorded in the operator audit trail ([`audit`]), in front of the internal daemons
//! reached through their typed clients ([`http`]). The API is `clawos_control_plane_api`;
//! its OpenAPI document is generated from the same table the router uses ([`openapi`]).
//!
//! State in `<state>/control-plane/` (0700): `operators.db` (token hashes),
//! `admin.token` (the local admin's credential, 0600), `audit.jsonl`, `tls/`.

pub mod acme;
pub mod audit;
pub mod cli_login;
pub mod gate;
pub mod http;
pub mod limits;
pub mod oidc;
pub mod openapi;
pub mod operator_routes;
pub mod operators;
pub mod roles;
pub mod saml;
pub mod saml_routes;
pub mod server;
pub mod sessions;
pub mod tls;
pub mod upstreams;
pub mod vm_routes;
pub mod vm_streams;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clawos_vm_launcher_api::LauncherClient;

pub use clawos_control_plane_api::DEFAULT_ADDR;

/// Where the served certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Made and kept by the daemon for these DNS names and IP addresses.
    SelfSigned { names: Vec<String> },
    /// The operator's PEM files, re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// Issued and renewed by an ACME CA.
    Acme(acme::AcmeSettings),
    /// No TLS: loopback only, unless `insecure_plain_http`.
    PlainHttp,
}

/// Everything the daemon needs, checked by [`Config::validate`] before any socket
/// opens.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    pub tls: TlsMode,
    /// Allows [`TlsMode::PlainHttp`] on a non-loopback address.
    pub insecure_plain_http: bool,
    /// vm-launcher's URL and its operator credential file.
    pub launcher_url: String,
    pub launcher_token_path: PathBuf,
    /// `Origin`s allowed to call the API (none by default).
    pub allowed_origins: Vec<String>,
    /// inference-proxy, monitor-daemon, orchestrator.
    pub upstreams: upstreams::Upstreams,
    /// Operator login through an OpenID provider.
    pub oidc: Option<oidc::OidcSettings>,
    /// Operator login through a SAML 2.0 identity provider.
    pub saml: Option<saml::SamlSettings>,
    /// How often [`TlsMode::Files`] are checked for a change.
    pub reload_every: Duration,
    /// When the operator audit trail moves to a new file, and how many it keeps.
    pub audit_rotation: audit::Rotation,
    /// Most connections one client (an IPv4 address, an IPv6 /64) holds at once.
    pub connections_per_client: usize,
}

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A setting is wrong; the message says which and how to fix it.
    #[error("control-plane config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Operators(#[from] operators::OperatorError),
}

/// The names a self-signed certificate covers by default: loopback, and this host's
/// name.
pub fn default_names() -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim().to_ascii_lowercase();
        if !h.is_empty() && h != "localhost" && valid_dns_name(&h) {
            names.push(h);
        }
    }
    names
}

fn valid_dns_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Config {
    /// The daemon's own directory.
    pub fn dir(&self) -> PathBuf {
        clawos_control_plane_api::dir(&self.state_dir)
    }

    /// Checks what can be checked before any socket opens.
    pub fn validate(&self) -> Result<(), ControlPlaneError> {
        let bad = |m: String| Err(ControlPlaneError::Config(m));
        if !(1..=server::MAX_CONNECTIONS).contains(&self.connections_per_client) {
            return bad(format!(
                "--max-connections-per-client {}: 1 to {}",
                self.connections_per_client,
                server::MAX_CONNECTIONS
            ));
        }
        if self.audit_rotation.max_bytes < 1 << 20 || self.audit_rotation.keep == 0 {
            return bad(format!(
                "--audit-max-mib {} / --audit-keep {}: at least 1 MiB a file and 1 old file",
                self.audit_rotation.max_bytes >> 20,
                self.audit_rotation.keep
            ));
        }
        match &self.tls {
            TlsMode::PlainHttp if !self.addr.ip().is_loopback() && !self.insecure_plain_http => {
                return bad(format!(
                    "plain HTTP on {}, which is not loopback: operator credentials would cross the network in clear text; use --tls self-signed|files, or add --insecure-plain-http if something in front terminates TLS",
                    self.addr
                ));
            }
            TlsMode::SelfSigned { names } => {
                if names.is_empty() {
                    return bad("--tls self-signed needs at least one --tls-name".into());
                }
                for n in names {
                    if n.parse::<std::net::IpAddr>().is_err() && !valid_dns_name(n) {
                        return bad(format!(
                            "--tls-name {n:?} is neither a DNS name nor an IP address"
                        ));
                    }
                }
            }
            TlsMode::Files { cert, key } => {
                for (flag, p) in [("--tls-cert", cert), ("--tls-key", key)] {
                    if !p.is_file() {
                        return bad(format!("{flag} {}: no such file", p.display()));
                    }
                }
            }
            TlsMode::Acme(a) => {
                if !a.directory.starts_with("https://") {
                    return bad(format!(
                        "--acme-directory {:?} is not an https:// URL",
                        a.directory
                    ));
                }
                if a.domains.is_empty() {
                    return bad("--tls acme needs at least one --acme-domain".into());
                }
                for d in &a.domains {
                    if !valid_dns_name(d) {
                        return bad(format!("--acme-domain {d:?} is not a DNS name"));
                    }
                }
                if let Some(ca) = &a.ca_cert
                    && !ca.is_file()
                {
                    return bad(format!("--acme-ca-cert {}: no such file", ca.display()));
                }
            }
            TlsMode::PlainHttp => {}
        }
        if !(self.launcher_url.starts_with("http://") || self.launcher_url.starts_with("https://"))
        {
            return bad(format!(
                "launcher URL {:?} is not an http(s) URL",
                self.launcher_url
            ));
        }
        for (daemon, u) in [
            ("inference-proxy", &self.upstreams.proxy),
            ("monitor", &self.upstreams.monitor),
            ("orchestrator", &self.upstreams.orchestrator),
        ] {
            if !(u.url.starts_with("http://") || u.url.starts_with("https://")) {
                return bad(format!("{daemon} URL {:?} is not an http(s) URL", u.url));
            }
        }
        if let Some(o) = &self.oidc {
            if !o.issuer.starts_with("https://") {
                return bad(format!(
                    "--oidc-issuer {:?} is not an https:// URL",
                    o.issuer
                ));
            }
            if !o.redirect_url.starts_with("https://")
                && !o.redirect_url.starts_with("http://127.0.0.1")
            {
                return bad(format!(
                    "--oidc-redirect-url {:?} is not an https:// URL (the session cookie is Secure)",
                    o.redirect_url
                ));
            }
            if !o
                .redirect_url
                .ends_with(clawos_control_plane_api::routes::OIDC_CALLBACK.path)
            {
                return bad(format!(
                    "--oidc-redirect-url {:?} must end with {}",
                    o.redirect_url,
                    clawos_control_plane_api::routes::OIDC_CALLBACK.path
                ));
            }
            if o.role_map.is_empty() {
                return bad(
                    "--oidc-role-map is empty: no identity-provider user would get a role".into(),
                );
            }
        }
        if let Some(sm) = &self.saml {
            if !sm
                .acs_url
                .ends_with(clawos_control_plane_api::routes::SAML_ACS.path)
            {
                return bad(format!(
                    "--saml-acs-url {:?} must end with {}",
                    sm.acs_url,
                    clawos_control_plane_api::routes::SAML_ACS.path
                ));
            }
            if sm.role_map.is_empty() {
                return bad(
                    "--saml-role-map is empty: no identity-provider user would get a role".into(),
                );
            }
            if !sm.idp_metadata.is_file() {
                return bad(format!(
                    "--saml-idp-metadata {}: no such file",
                    sm.idp_metadata.display()
                ));
            }
        }
        if self.reload_every.is_zero() {
            return bad("the certificate reload interval must be above zero".into());
        }
        Ok(())
    }
}

/// Runs the daemon until `shutdown`.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControlPlaneError> {
    cfg.validate()?;
    // One crypto provider for every rustls user in the process (the ACME client builds
    // its TLS configuration from the default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = cfg.dir();
    let io = |path: PathBuf| move |source| ControlPlaneError::Io { path, source };
    clawos_service::create_private_dir(&dir).map_err(io(dir.clone()))?;
    let operators = operators::OperatorStore::open(&dir.join("operators.db"))?;
    operators.ensure_bootstrap(&clawos_control_plane_api::token_path(&cfg.state_dir))?;
    let audit_path = dir.join("audit.jsonl");
    let audit = audit::AuditTrail::with_rotation(&audit_path, cfg.audit_rotation)
        .map_err(io(audit_path))?;
    let launcher_token = std::fs::read_to_string(&cfg.launcher_token_path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| {
            ControlPlaneError::Config(format!(
                "vm-launcher's operator credential {}: {e} (start vm-launcher first, or point --launcher-token at it)",
                cfg.launcher_token_path.display()
            ))
        })?;
    let launcher = LauncherClient::new(&cfg.launcher_url).with_token(&launcher_token);

    let tls_dir = dir.join("tls");
    let mut background: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
        Vec::new();
    let per_client = cfg.connections_per_client;
    let (tls_config, reload) = match &cfg.tls {
        TlsMode::PlainHttp => (None, None),
        TlsMode::SelfSigned { names } => {
            let key = tls::self_signed(&tls_dir, names)?;
            let store = tls::CertStore::new(key);
            background.push(Box::pin(tls::renew_self_signed(
                Arc::clone(&store),
                tls_dir.clone(),
                names.clone(),
            )));
            (Some(store), None)
        }
        TlsMode::Acme(settings) => {
            let challenges = Arc::new(acme::Challenges::default());
            let acme_dir = tls_dir.join("acme");
            std::fs::create_dir_all(&acme_dir).map_err(io(acme_dir.clone()))?;
            // Until the CA's certificate arrives: a self-signed one for the same names.
            let placeholder = tls::self_signed(&tls_dir, &settings.domains)?;
            let store = tls::CertStore::with_acme(placeholder, Arc::clone(&challenges));
            let a = acme::Acme::new(
                settings.clone(),
                acme_dir,
                Arc::clone(&store),
                Arc::clone(&challenges),
            );
            let kept = a.kept();
            if let Some((key, validity)) = &kept {
                store.replace(Arc::clone(key));
                tracing::info!(not_after = ?validity.not_after, "serving the kept ACME certificate");
            } else {
                tracing::warn!(directory = %settings.directory, "no ACME certificate yet: serving a self-signed placeholder until the CA issues one");
            }
            if let Some(addr) = settings.http01_addr {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(io(PathBuf::from(addr.to_string())))?;
                tracing::info!(%addr, "answering ACME HTTP-01 challenges");
                let router = acme::http01_router(Arc::clone(&challenges));
                // The same accept loop as the API's: header timeout, connection caps
                // (per client too), so port 80 is no easier to tie up than 8080.
                background.push(Box::pin(async move {
                    let never = std::future::pending::<()>();
                    if let Err(e) =
                        server::serve(l, None, router, never, Duration::ZERO, per_client).await
                    {
                        tracing::error!(error = %e, "HTTP-01 responder stopped");
                    }
                }));
            }
            background.push(Box::pin(a.run(kept.map(|(_, v)| v))));
            (Some(store), None)
        }
        TlsMode::Files { cert, key } => {
            let k = tls::load_pem(cert, key)?;
            let store = tls::CertStore::new(k);
            let watch = tls::watch_files(
                Arc::clone(&store),
                cert.clone(),
                key.clone(),
                cfg.reload_every,
            );
            (Some(store), Some(watch))
        }
    };
    let server_tls = match &tls_config {
        Some(store) => Some(tls::server_config(Arc::clone(store))?),
        None => None,
    };
    let guard = clawos_service::guard::Guard::new()
        .listening_on(cfg.addr)
        .allow_origins(&cfg.allowed_origins)
        .body_type(
            axum::http::Method::PUT,
            clawos_vm_launcher_api::UPLOAD_CONTENT_TYPE,
        );
    let oidc = match &cfg.oidc {
        Some(o) => Some(Arc::new(
            oidc::Oidc::new(o.clone()).map_err(ControlPlaneError::Config)?,
        )),
        None => None,
    };
    let saml = match &cfg.saml {
        Some(sm) => Some(Arc::new(
            saml::Saml::new(sm.clone()).map_err(ControlPlaneError::Config)?,
        )),
        None => None,
    };
    let app = Arc::new(http::App::new(
        launcher,
        operators,
        audit,
        guard,
        cfg.upstreams.clone(),
        http::Logins { oidc, saml },
        server_tls.is_some(),
    ));
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(io(PathBuf::from(cfg.addr.to_string())))?;
    let scheme = if server_tls.is_some() {
        "https"
    } else {
        "http"
    };
    match &tls_config {
        Some(store) => tracing::info!(
            addr = %cfg.addr,
            fingerprint = %store.fingerprint(),
            "control-plane listening on {scheme}://{}; certificate SHA-256 fingerprint {}",
            cfg.addr,
            store.fingerprint()
        ),
        None => {
            tracing::warn!(addr = %cfg.addr, "control-plane listening on {scheme}://{} WITHOUT TLS", cfg.addr)
        }
    }
    let reloader = reload.map(tokio::spawn);
    let background: Vec<_> = background.into_iter().map(tokio::spawn).collect();
    let served = server::serve(
        listener,
        server_tls,
        http::router(app),
        shutdown,
        clawos_service::http::DRAIN_TIMEOUT,
        cfg.connections_per_client,
    )
    .await;
    if let Some(r) = reloader {
        r.abort();
    }
    for b in background {
        b.abort();
    }
    served.map_err(io("HTTP server".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(addr: &str, tls: TlsMode) -> Config {
        Config {
            addr: addr.parse().expect("addr"),
            state_dir: "/nonexistent".into(),
            tls,
            insecure_plain_http: false,
            launcher_url: "http://127.0.0.1:2080".into(),
            launcher_token_path: "/nonexistent".into(),
            allowed_origins: vec![],
            upstreams: upstreams::Upstreams::defaults(std::path::Path::new("/nonexistent")),
            oidc: None,
            saml: None,
            reload_every: Duration::from_secs(2),
            audit_rotation: audit::Rotation::default(),
            connections_per_client: limits::CONNECTIONS_PER_CLIENT,
        }
    }

    #[test]
    fn plain_http_off_loopback_needs_the_insecure_flag() {
        let e = cfg("0.0.0.0:8080", TlsMode::PlainHttp)
            .validate()
            .expect_err("refused");
        assert!(e.to_string().contains("--insecure-plain-http"), "{e}");
        cfg("127.0.0.1:8080", TlsMode::PlainHttp)
            .validate()
            .expect("loopback is allowed");
        let mut c = cfg("0.0.0.0:8080", TlsMode::PlainHttp);
        c.insecure_plain_http = true;
        c.validate().expect("insisted");
    }

    #[test]
    fn bad_certificate_names_and_missing_files_are_named() {
        let e = cfg(
            "0.0.0.0:8080",
            TlsMode::SelfSigned {
                names: vec!["a b".into()],
            },
        )
        .validate()
        .expect_err("bad name");
        assert!(e.to_string().contains("\"a b\""), "{e}");
        let e = cfg(
            "0.0.0.0:8080",
            TlsMode::Files {
                cert: "/nonexistent/c.pem".into(),
                key: "/nonexistent/k.pem".into(),
            },
        )
        .validate()
        .expect_err("missing");
        assert!(
            e.to_string().contains("--tls-cert /nonexistent/c.pem"),
            "{e}"
        );
    }
}
