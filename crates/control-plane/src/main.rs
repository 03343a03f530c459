//! `control-plane`: see the `clawos_control_plane` crate docs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use clawos_control_plane::{Config, DEFAULT_ADDR, TlsMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tls {
    /// A certificate made and kept by the daemon (names from --tls-name).
    SelfSigned,
    /// --tls-cert and --tls-key, re-read when they change.
    Files,
    /// Issued and renewed by an ACME CA (--acme-directory, --acme-domain).
    Acme,
    /// No TLS: refused off loopback unless --insecure-plain-http.
    Off,
}

/// The one HTTPS front door of a ClawOS host: operator login, roles, audit, /api/v1.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Listen address.
    #[arg(long, env = "CLAWOS_CONTROL_PLANE_ADDR", default_value = DEFAULT_ADDR)]
    addr: SocketAddr,
    /// State directory; operators, the audit trail and TLS material live in its
    /// control-plane/.
    #[arg(long, env = "CLAWOS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Where the certificate comes from.
    #[arg(
        long,
        env = "CLAWOS_CONTROL_PLANE_TLS",
        value_enum,
        default_value = "self-signed"
    )]
    tls: Tls,
    /// A DNS name or IP address the self-signed certificate covers (repeatable)
    /// [default: localhost, 127.0.0.1, ::1 and this host's name].
    #[arg(long = "tls-name", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// PEM certificate chain (--tls files).
    #[arg(long, env = "CLAWOS_CONTROL_PLANE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (--tls files).
    #[arg(long, env = "CLAWOS_CONTROL_PLANE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// ACME directory URL (--tls acme), e.g. Let's Encrypt's.
    #[arg(long, env = "CLAWOS_ACME_DIRECTORY")]
    acme_directory: Option<String>,
    /// A DNS name the ACME certificate is for (repeatable).
    #[arg(long = "acme-domain", value_delimiter = ',')]
    acme_domains: Vec<String>,
    /// Contact for the ACME account, e.g. mailto:ops@example.com.
    #[arg(long)]
    acme_contact: Option<String>,
    /// PEM root certificate to trust for the ACME directory's own HTTPS (a private CA).
    #[arg(long)]
    acme_ca_cert: Option<PathBuf>,
    /// Answer HTTP-01 challenges on this address (e.g. 0.0.0.0:80); without it the
    /// CA validates with TLS-ALPN-01 on --addr.
    #[arg(long)]
    acme_http01_addr: Option<SocketAddr>,
    /// Seconds between checks of --tls-cert/--tls-key for a change.
    #[arg(long, default_value_t = 2)]
    tls_reload_secs: u64,
    /// The operator audit trail moves to a new file past this size (MiB)...
    #[arg(long, default_value_t = 64)]
    audit_max_mib: u64,
    /// ...and keeps this many old files (audit.jsonl.1 …).
    #[arg(long, default_value_t = 8)]
    audit_keep: u32,
    /// Most connections one client (an IPv4 address, an IPv6 /64) holds at once; behind
    /// a proxy or NAT that every operator comes through, raise it (up to 1024).
    #[arg(long, default_value_t = clawos_control_plane::limits::CONNECTIONS_PER_CLIENT)]
    max_connections_per_client: usize,
    /// Serve plain HTTP on a non-loopback address (only behind something that
    /// terminates TLS).
    #[arg(long)]
    insecure_plain_http: bool,
    /// vm-launcher.
    #[arg(long, env = "CLAWOS_LAUNCHER_URL", default_value = clawos_vm_launcher_api::DEFAULT_URL)]
    launcher_url: String,
    /// vm-launcher's operator credential file [default: $STATE_DIR/launcher/admin.token].
    #[arg(long, env = "CLAWOS_LAUNCHER_TOKEN_PATH")]
    launcher_token: Option<PathBuf>,
    /// inference-proxy (usage) [default: its loopback URL; credential
    /// $STATE_DIR/proxy/admin.token].
    #[arg(long, env = "CLAWOS_PROXY_URL")]
    proxy_url: Option<String>,
    /// monitor-daemon (the syscall audit trail) [credential $STATE_DIR/monitor/admin.token].
    #[arg(long, env = "CLAWOS_MONITOR_URL")]
    monitor_url: Option<String>,
    /// orchestrator (workflows) [credential $STATE_DIR/orchestrator/admin.token].
    #[arg(long, env = "CLAWOS_ORCHESTRATOR_URL")]
    orchestrator_url: Option<String>,
    /// identity-manager (agent tokens) [credential $STATE_DIR/identity/service.token].
    #[arg(long, env = "CLAWOS_IDENTITY_URL")]
    identity_url: Option<String>,
    /// OpenID provider for operator login (issuer URL; discovery at
    /// <issuer>/.well-known/openid-configuration).
    #[arg(long, env = "CLAWOS_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// This control plane's client id at the provider.
    #[arg(long, env = "CLAWOS_OIDC_CLIENT_ID")]
    oidc_client_id: Option<String>,
    /// File holding the client secret (0600).
    #[arg(long, env = "CLAWOS_OIDC_CLIENT_SECRET_FILE")]
    oidc_client_secret_file: Option<PathBuf>,
    /// The callback URL registered at the provider:
    /// https://<this host>:8080/api/v1/login/oidc/callback.
    #[arg(long, env = "CLAWOS_OIDC_REDIRECT_URL")]
    oidc_redirect_url: Option<String>,
    /// The ID-token claim listing the user's groups.
    #[arg(long, default_value = "groups")]
    oidc_groups_claim: String,
    /// Group to role: group=viewer|operator|admin, comma-separated.
    #[arg(long, env = "CLAWOS_OIDC_ROLE_MAP")]
    oidc_role_map: Option<String>,
    /// PEM root certificate for the provider's HTTPS (a private CA).
    #[arg(long)]
    oidc_ca_cert: Option<PathBuf>,
    /// SAML identity provider's metadata (XML file) for operator login.
    #[arg(long, env = "CLAWOS_SAML_IDP_METADATA")]
    saml_idp_metadata: Option<PathBuf>,
    /// This service provider's entity id [default: <--saml-acs-url's origin>/api/v1/saml/metadata].
    #[arg(long)]
    saml_entity_id: Option<String>,
    /// The assertion consumer service URL the IdP posts to:
    /// https://<this host>:8080/api/v1/login/saml/acs.
    #[arg(long, env = "CLAWOS_SAML_ACS_URL")]
    saml_acs_url: Option<String>,
    /// The attribute listing the user's groups.
    #[arg(long, default_value = "groups")]
    saml_groups_attribute: String,
    /// Print this service provider's SAML metadata (from --saml-acs-url and
    /// --saml-entity-id; no IdP needed) for registering it at the IdP, and exit.
    #[arg(long)]
    print_saml_sp_metadata: bool,
    /// Group to role: group=viewer|operator|admin, comma-separated.
    #[arg(long, env = "CLAWOS_SAML_ROLE_MAP")]
    saml_role_map: Option<String>,
    /// An Origin allowed to call the API (repeatable; none by default).
    #[arg(
        long = "allow-origin",
        env = "CLAWOS_CONTROL_PLANE_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    #[command(flatten)]
    log: clawos_service::LogArgs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    clawos_service::init_tracing(a.log.format());
    let state_dir = a
        .state_dir
        .unwrap_or_else(clawos_service::default_state_dir);
    let tls = match a.tls {
        Tls::SelfSigned => TlsMode::SelfSigned {
            names: if a.tls_names.is_empty() {
                clawos_control_plane::default_names()
            } else {
                a.tls_names
            },
        },
        Tls::Files => TlsMode::Files {
            cert: a.tls_cert.context("--tls files needs --tls-cert")?,
            key: a.tls_key.context("--tls files needs --tls-key")?,
        },
        Tls::Acme => TlsMode::Acme(clawos_control_plane::acme::AcmeSettings {
            directory: a
                .acme_directory
                .context("--tls acme needs --acme-directory")?,
            domains: a.acme_domains,
            contact: a.acme_contact,
            ca_cert: a.acme_ca_cert,
            http01_addr: a.acme_http01_addr,
        }),
        Tls::Off => TlsMode::PlainHttp,
    };
    let mut upstreams = clawos_control_plane::upstreams::Upstreams::defaults(&state_dir);
    if let Some(u) = a.proxy_url {
        upstreams.proxy.url = u;
    }
    if let Some(u) = a.monitor_url {
        upstreams.monitor.url = u;
    }
    if let Some(u) = a.orchestrator_url {
        upstreams.orchestrator.url = u;
    }
    if let Some(u) = a.identity_url {
        upstreams.identity.url = u;
    }
    let oidc = match a.oidc_issuer {
        None => None,
        Some(issuer) => Some(clawos_control_plane::oidc::OidcSettings {
            issuer,
            client_id: a
                .oidc_client_id
                .context("--oidc-issuer needs --oidc-client-id")?,
            client_secret_file: a
                .oidc_client_secret_file
                .context("--oidc-issuer needs --oidc-client-secret-file")?,
            redirect_url: a
                .oidc_redirect_url
                .context("--oidc-issuer needs --oidc-redirect-url")?,
            groups_claim: a.oidc_groups_claim,
            role_map: clawos_control_plane::roles::parse_role_map(
                &a.oidc_role_map
                    .context("--oidc-issuer needs --oidc-role-map group=role,...")?,
            )
            .map_err(anyhow::Error::msg)?,
            ca_cert: a.oidc_ca_cert,
        }),
    };
    if a.print_saml_sp_metadata {
        let acs_url = a
            .saml_acs_url
            .as_deref()
            .context("--print-saml-sp-metadata needs --saml-acs-url")?;
        let origin = acs_url
            .strip_suffix(clawos_control_plane_api::routes::SAML_ACS.path)
            .unwrap_or(acs_url);
        let entity_id = a.saml_entity_id.clone().unwrap_or_else(|| {
            format!(
                "{origin}{}",
                clawos_control_plane_api::routes::SAML_METADATA.path
            )
        });
        let xml = clawos_control_plane::saml::sp_metadata(&entity_id, acs_url)
            .map_err(anyhow::Error::msg)?;
        println!("{xml}");
        return Ok(());
    }
    let saml = match a.saml_idp_metadata {
        None => None,
        Some(idp_metadata) => {
            let acs_url = a
                .saml_acs_url
                .context("--saml-idp-metadata needs --saml-acs-url")?;
            let origin = acs_url
                .strip_suffix(clawos_control_plane_api::routes::SAML_ACS.path)
                .unwrap_or(&acs_url)
                .to_owned();
            Some(clawos_control_plane::saml::SamlSettings {
                idp_metadata,
                entity_id: a.saml_entity_id.unwrap_or_else(|| {
                    format!(
                        "{origin}{}",
                        clawos_control_plane_api::routes::SAML_METADATA.path
                    )
                }),
                acs_url,
                groups_attribute: a.saml_groups_attribute,
                role_map: clawos_control_plane::roles::parse_role_map(
                    &a.saml_role_map
                        .context("--saml-idp-metadata needs --saml-role-map group=role,...")?,
                )
                .map_err(anyhow::Error::msg)?,
            })
        }
    };
    let cfg = Config {
        saml,
        oidc,
        upstreams,
        addr: a.addr,
        launcher_token_path: a.launcher_token.unwrap_or_else(|| {
            clawos_service::credential_path(
                "launcher-token",
                clawos_vm_launcher_api::token_path(&state_dir),
            )
        }),
        state_dir,
        tls,
        insecure_plain_http: a.insecure_plain_http,
        launcher_url: a.launcher_url,
        allowed_origins: a.allowed_origins,
        reload_every: Duration::from_secs(a.tls_reload_secs),
        connections_per_client: a.max_connections_per_client,
        audit_rotation: clawos_control_plane::audit::Rotation {
            max_bytes: a.audit_max_mib.saturating_mul(1 << 20),
            keep: a.audit_keep,
        },
    };
    cfg.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(clawos_control_plane::run(
            cfg,
            clawos_service::shutdown_signal(),
        ))
        .context("control-plane")
}
