//! The control plane's ACME certificates from **pebble** (Let's Encrypt's test CA,
//! Debian's package), started here with `pebble-challtestsrv` as its DNS (every name is
//! 127.0.0.1): a real RFC 8555 CA that really validates HTTP-01 and TLS-ALPN-01
//! against the control plane, issues short-lived certificates (60 s here), and can be
//! stopped to make a renewal fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clawos_e2e::stack::ControlPlane;
use clawos_e2e::tls::{HeldConnection, openssl_cert, serial_served, wait_for_serial};
use clawos_e2e::{KillOnDrop, port, show, skip};

/// The name the certificates are for (resolved to 127.0.0.1 by challtestsrv).
const DOMAIN: &str = "cp.clawos.test";

/// A running pebble with its DNS, and the root it issues under.
struct Pebble {
    directory: String,
    /// The CA certificate of pebble's own HTTPS listener (for the ACME client).
    listener_ca: PathBuf,
    /// The root pebble issues certificates under (for TLS clients of the control plane).
    issuing_root: PathBuf,
    pebble: Option<KillOnDrop>,
    _dns: KillOnDrop,
}

impl Pebble {
    /// Starts one that validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`.
    fn start(dir: &Path, http_port: u16, tls_port: u16) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = (dir.join("listener.crt"), dir.join("listener.key"));
        openssl_cert(dir, "pebble-ca", &cert, &key, 7)?;
        let dns_port = port();
        let dns = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", port())])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(std::fs::File::create(dir.join("challtestsrv.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("pebble-challtestsrv")?;
        let dns = KillOnDrop(dns);
        let (api, mgmt) = (port(), port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
            "certificateValidityPeriod": 60,
        }});
        let cfg = dir.join("pebble.json");
        std::fs::write(&cfg, config.to_string())?;
        let log = std::fs::File::create(dir.join("pebble.log"))?;
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&cfg)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            // Validate at once, and accept every nonce (pebble rejects 5% by default
            // to exercise clients' retries, which only slows this test).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("pebble")?;
        let pebble = KillOnDrop(pebble);
        let listener_ca = dir.join("pebble-ca.crt");
        // The issuing root is made at each start; fetch it once pebble answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        let issuing_root = dir.join("issuing-root.pem");
        loop {
            let o = Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(&listener_ca)
                .arg("-o")
                .arg(&issuing_root)
                .arg(format!("https://127.0.0.1:{mgmt}/roots/0"))
                .output()?;
            if o.status.success() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "pebble did not come up: {}\n{}",
                    show(&o),
                    std::fs::read_to_string(dir.join("pebble.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Self {
            directory: format!("https://127.0.0.1:{api}/dir"),
            listener_ca,
            issuing_root,
            pebble: Some(pebble),
            _dns: dns,
        })
    }

    fn stop(&mut self) {
        self.pebble = None;
    }
}

fn tools_present(test: &str) -> bool {
    for tool in ["pebble", "pebble-challtestsrv"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            skip(
                test,
                &format!("no {tool} on PATH (Debian package pebble; scripts/setup.sh installs it)"),
            );
            return false;
        }
    }
    true
}

fn start_cp(state: &Path, pebble: &Pebble, cp_port_args: &[&str]) -> Result<ControlPlane> {
    std::fs::create_dir_all(state.join("launcher"))?;
    std::fs::write(state.join("launcher/admin.token"), "unused\n")?;
    let mut args = vec![
        "--tls",
        "acme",
        "--acme-directory",
        &pebble.directory,
        "--acme-domain",
        DOMAIN,
        "--acme-contact",
        "mailto:ops@clawos.test",
        "--acme-ca-cert",
        pebble.listener_ca.to_str().context("utf8")?,
    ];
    args.extend_from_slice(cp_port_args);
    ControlPlane::start(state, "http://127.0.0.1:9", &args)
}

#[test]
fn acme_http01_issues_renews_under_a_held_connection_and_survives_a_failed_renewal() -> Result<()> {
    let test = "acme_http01_issues_renews_under_a_held_connection_and_survives_a_failed_renewal";
    if !tools_present(test) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let http01 = port();
    // TLS-ALPN-01 is not used here: point it where nothing listens.
    let mut pebble = Pebble::start(&dir.path().join("pebble"), http01, port())?;
    let http01_addr = format!("127.0.0.1:{http01}");
    let state = dir.path().join("state");
    let t0 = Instant::now();
    let cp = start_cp(&state, &pebble, &["--acme-http01-addr", &http01_addr])?;
    let root = &pebble.issuing_root.clone();
    let first = wait_for_serial(
        cp.port,
        root,
        DOMAIN,
        Duration::from_secs(60),
        |_| true,
        || cp.log(),
    )?;
    clawos_e2e::measured(&format!(
        "control-plane ACME: first certificate (HTTP-01, pebble) served {:?} after start",
        t0.elapsed()
    ));
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("control-plane/tls/acme/key.pem"))?.permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(
        state.join("control-plane/tls/acme/account.json").is_file(),
        "the account key is kept"
    );

    // Renewal at two thirds of 60 s, while a client holds a connection open.
    let mut held = HeldConnection::open(cp.port, root, DOMAIN)?;
    assert_eq!(held.ask()?, format!("200 {first}"));
    // The client keeps using its connection (an idle one is closed after 10 s) while
    // new connections are watched for the renewed certificate.
    let deadline = Instant::now() + Duration::from_secs(90);
    let second = loop {
        assert_eq!(
            held.ask()?,
            format!("200 {first}"),
            "the held connection goes on with its certificate"
        );
        let now = serial_served(cp.port, root, DOMAIN)?;
        if now != first {
            break now;
        }
        if Instant::now() > deadline {
            bail!("not renewed within 90 s:\n{}", cp.log());
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    clawos_e2e::measured(&format!(
        "control-plane ACME: renewed (60 s certificates) {:?} after start",
        t0.elapsed()
    ));

    // The CA gone: the next renewal (40 s after the second issuance) fails, is logged,
    // and the second certificate, still valid, keeps serving.
    pebble.stop();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cp
        .log()
        .contains("ACME renewal failed; still serving the current certificate")
    {
        if Instant::now() > deadline {
            bail!("the failed renewal was not logged:\n{}", cp.log());
        }
        held.ask()?;
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(serial_served(cp.port, root, DOMAIN)?, second);
    assert_eq!(held.ask()?, format!("200 {first}"));
    Ok(())
}

#[test]
fn acme_tls_alpn01_issues_on_the_control_planes_own_port() -> Result<()> {
    let test = "acme_tls_alpn01_issues_on_the_control_planes_own_port";
    if !tools_present(test) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // The control plane's port must be known before pebble starts: pebble connects
    // there for TLS-ALPN-01. Reserve it, start pebble, then the control plane on it.
    let cp_port = port();
    let pebble = Pebble::start(&dir.path().join("pebble"), port(), cp_port)?;
    let state = dir.path().join("state");
    let addr = format!("127.0.0.1:{cp_port}");
    let cp = start_cp(&state, &pebble, &["--addr", &addr])?;
    assert_eq!(cp.port, cp_port, "the harness honours --addr");
    // Before issuance a client that trusts only pebble's root is refused (the
    // placeholder is self-signed); after it, the same client connects.
    wait_for_serial(
        cp_port,
        &pebble.issuing_root,
        DOMAIN,
        Duration::from_secs(60),
        |_| true,
        || cp.log(),
    )?;
    assert!(
        cp.log().contains("answered a TLS-ALPN-01 validation"),
        "{}",
        cp.log()
    );
    Ok(())
}
