//! Operator login through a real SAML 2.0 identity provider: pysaml2 (Debian's
//! python3-pysaml2, signing through xmlsec1) in tests/e2e/saml/idp.py, driven like a
//! browser by tests/e2e/saml/login.py. The groups attribute maps to roles; an unsigned
//! assertion, a wrong audience, an expired assertion, a wrong recipient, an unsolicited
//! response, a signature by another key, a replayed response and XML signature
//! wrapping (a forged unsigned assertion beside, or instead of, the signed one) are all
//! refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clawos_e2e::stack::{ControlPlane, assert_logged_in};
use clawos_e2e::tls::openssl_cert;
use clawos_e2e::{KillOnDrop, port, show};
use serde_json::{Value, json};

struct Idp {
    ca: PathBuf,
    metadata: PathBuf,
    admin: u16,
    log: PathBuf,
    _child: KillOnDrop,
}

impl Idp {
    fn start(dir: &Path, sp_metadata: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = (dir.join("idp.crt"), dir.join("idp.key"));
        openssl_cert(dir, "idp-ca", &cert, &key, 21)?;
        let (sign_crt, sign_key) = (dir.join("sign.crt"), dir.join("sign.key"));
        let o = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=ClawOS test IdP signing",
            ])
            .arg("-keyout")
            .arg(&sign_key)
            .arg("-out")
            .arg(&sign_crt)
            .output()?;
        if !o.status.success() {
            bail!("openssl: {}", show(&o));
        }
        let users = dir.join("users.json");
        std::fs::write(
            &users,
            json!({
                "alice": {"password": "pw-alice", "groups": ["clawos-admins", "staff"]},
                "otto": {"password": "pw-otto", "groups": ["clawos-ops"]},
                "vera": {"password": "pw-vera", "groups": ["clawos-viewers"]},
                "mallory": {"password": "pw-mallory", "groups": ["marketing"]},
            })
            .to_string(),
        )?;
        let (p, admin) = (port(), port());
        let metadata = dir.join("idp-metadata.xml");
        let log = dir.join("idp.log");
        let child = Command::new("/usr/bin/python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/saml/idp.py"))
            .args(["--port", &p.to_string(), "--base", &format!("https://127.0.0.1:{p}")])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--sign-cert")
            .arg(&sign_crt)
            .arg("--sign-key")
            .arg(&sign_key)
            .arg("--sp-metadata")
            .arg(sp_metadata)
            .arg("--users")
            .arg(&users)
            .args(["--admin-port", &admin.to_string()])
            .arg("--metadata-out")
            .arg(&metadata)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("idp.stderr"))?)
            .spawn()
            .context("the pysaml2 IdP (/usr/bin/python3 with python3-pysaml2; scripts/test.sh installs it)")?;
        let child = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("saml-idp listening")
        {
            if Instant::now() > deadline {
                bail!(
                    "the SAML IdP did not start: {}",
                    std::fs::read_to_string(dir.join("idp.stderr")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            ca: dir.join("idp-ca.crt"),
            metadata,
            admin,
            log,
            _child: child,
        })
    }

    fn mode(&self, mode: &str) -> Result<()> {
        let o = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
            ])
            .arg(json!({"mode": mode}).to_string())
            .arg(format!("http://127.0.0.1:{}/mode", self.admin))
            .output()?;
        if !o.status.success() {
            bail!("mode {mode}: {}", show(&o));
        }
        Ok(())
    }
}

fn login(
    cp: &ControlPlane,
    idp: &Idp,
    user: &str,
    password: &str,
    extra: &[&str],
) -> Result<Value> {
    let o = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/saml/login.py"))
        .args(["--start", &format!("{}/api/v1/login/saml", cp.url)])
        .arg("--ca")
        .arg(cp.ca())
        .arg("--ca2")
        .arg(&idp.ca)
        .args([
            "--user",
            user,
            "--password",
            password,
            "--then",
            "/api/v1/whoami",
        ])
        .args(extra)
        .output()?;
    if !o.status.success() {
        bail!(
            "login.py as {user}: {}\nIdP log:\n{}\ncontrol-plane log:\n{}",
            show(&o),
            std::fs::read_to_string(&idp.log).unwrap_or_default(),
            cp.log()
        );
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

#[test]
fn saml_login_maps_groups_to_roles_and_refuses_forged_responses() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp_port = port();
    let acs = format!("https://127.0.0.1:{cp_port}/api/v1/login/saml/acs");
    // The SP's metadata first (the IdP is set up with it), from the daemon itself.
    let sp_md = dir.path().join("sp-metadata.xml");
    let o = Command::new(clawos_e2e::bin("control-plane"))
        .args(["--print-saml-sp-metadata", "--saml-acs-url", &acs])
        .output()?;
    assert!(o.status.success(), "{}", show(&o));
    std::fs::write(&sp_md, &o.stdout)?;
    let idp = Idp::start(&dir.path().join("idp"), &sp_md)?;

    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("launcher"))?;
    std::fs::write(state.join("launcher/admin.token"), "unused\n")?;
    let addr = format!("127.0.0.1:{cp_port}");
    let cp = ControlPlane::start(
        &state,
        "http://127.0.0.1:9",
        &[
            "--addr",
            &addr,
            "--saml-idp-metadata",
            idp.metadata.to_str().context("utf8")?,
            "--saml-acs-url",
            &acs,
            "--saml-role-map",
            "clawos-admins=admin,clawos-ops=operator,clawos-viewers=viewer",
        ],
    )?;
    let served = cp.call(None, "GET", "/api/v1/saml/metadata", None);
    assert_eq!(served.status, 200);
    assert_eq!(
        served.body.trim(),
        String::from_utf8_lossy(&o.stdout).trim(),
        "the served SP metadata"
    );

    for (user, pw, role) in [
        ("alice", "pw-alice", "admin"),
        ("otto", "pw-otto", "operator"),
        ("vera", "pw-vera", "viewer"),
    ] {
        let t = Instant::now();
        let r = login(&cp, &idp, user, pw, &[])?;
        assert_logged_in(&r, "acs", user, role, "saml");
        if user == "alice" {
            clawos_e2e::measured(&format!(
                "control-plane SAML: a whole browser login (AuthnRequest, IdP form, signed Response checked) {:?}",
                t.elapsed()
            ));
        }
    }
    let r = login(&cp, &idp, "mallory", "pw-mallory", &[])?;
    assert_eq!(r["acs_status"], 403, "no mapped group: {r}");
    assert_eq!(r["then_status"], 401);

    // Forged or misaddressed responses: refused, and no session (in particular not the
    // wrapped-in "mallory-admin").
    for mode in [
        "unsigned",
        "audience",
        "expired",
        "expired-subject",
        "recipient-only",
        "inresponseto",
        "wrongkey",
        "xsw",
        "xsw-extensions",
    ] {
        idp.mode(mode)?;
        let r = login(&cp, &idp, "vera", "pw-vera", &[])?;
        assert_eq!(
            r["acs_status"],
            401,
            "{mode} accepted: {r}\ncontrol-plane log:\n{}",
            cp.log()
        );
        assert!(
            r["body"]
                .as_str()
                .unwrap_or("")
                .contains("SAML response was refused"),
            "{mode}: {r}"
        );
        assert_eq!(r["then_status"], 401, "{mode}: a session was opened: {r}");
    }
    idp.mode("none")?;

    // The same signed response posted twice: the second is refused.
    let r = login(&cp, &idp, "otto", "pw-otto", &["--replay"])?;
    assert_eq!(r["acs_status"], 303, "{r}");
    assert_eq!(r["replay_status"], 401, "replayed response: {r}");

    let audit = cp.audit();
    let saml: Vec<(&str, &str)> = audit
        .iter()
        .filter(|r| r["action"] == "session.saml")
        .filter_map(|r| Some((r["operator"].as_str()?, r["result"].as_str()?)))
        .collect();
    assert!(saml.contains(&("alice", "ok")), "{saml:?}");
    assert!(
        !saml
            .iter()
            .any(|(op, res)| *op == "mallory-admin" && *res == "ok"),
        "{saml:?}"
    );
    assert!(
        saml.iter().filter(|(_, r)| *r == "refused").count() >= 11,
        "refusals audited: {saml:?}"
    );
    Ok(())
}
