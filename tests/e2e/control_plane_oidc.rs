//! Operator login through a real OpenID provider: the certified `oidc-provider`
//! library (tests/e2e/oidc/provider.mjs) over HTTPS, driven like a browser by
//! tests/e2e/oidc/login.py. The groups claim maps to roles; a tampered ID token (bad
//! signature), a wrong audience, a wrong nonce, a wrong issuer, an expired token and
//! a replayed callback are each refused; a user whose groups map to no role gets no
//! session.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clawos_e2e::stack::{ControlPlane, assert_logged_in};
use clawos_e2e::tls::openssl_cert;
use clawos_e2e::{KillOnDrop, port, show};
use serde_json::{Value, json};

const CLIENT_ID: &str = "clawos-control-plane";
const CLIENT_SECRET: &str = "cp-secret-4b1d0c9e7f2a";

struct Provider {
    issuer: String,
    ca: PathBuf,
    admin: u16,
    child: KillOnDrop,
    log: PathBuf,
    dir: PathBuf,
    port: u16,
    redirect_uri: String,
}

impl Provider {
    fn start(dir: &Path, redirect_uri: &str) -> Result<Self> {
        let oidc_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/oidc");
        assert!(
            oidc_dir.join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed: run `npm ci` in {} (scripts/test.sh does)",
            oidc_dir.display()
        );
        std::fs::create_dir_all(dir)?;
        let (cert, key) = (dir.join("op.crt"), dir.join("op.key"));
        openssl_cert(dir, "op-ca", &cert, &key, 11)?;
        signing_key(dir, "test-key-1")?;
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
        let issuer = format!("https://127.0.0.1:{p}");
        let log = dir.join("provider.log");
        let child = spawn_provider(dir, p, &issuer, admin, redirect_uri, &log)?;
        Ok(Self {
            issuer,
            ca: dir.join("op-ca.crt"),
            admin,
            child,
            log,
            dir: dir.to_owned(),
            port: p,
            redirect_uri: redirect_uri.to_owned(),
        })
    }

    /// The provider restarted (same address, users and certificate) signing with a new
    /// key, `kid`: a key rotation.
    fn rotate_key(&mut self, kid: &str) -> Result<()> {
        signing_key(&self.dir, kid)?;
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let log = self.dir.join(format!("provider-{kid}.log"));
        self.child = spawn_provider(
            &self.dir,
            self.port,
            &self.issuer,
            self.admin,
            &self.redirect_uri,
            &log,
        )?;
        self.log = log;
        Ok(())
    }

    fn tamper(&self, mode: &str) -> Result<()> {
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
            .arg(format!("http://127.0.0.1:{}/tamper", self.admin))
            .output()?;
        if !o.status.success() {
            bail!("tamper {mode}: {}", show(&o));
        }
        Ok(())
    }
}

/// A new RSA signing key in `dir` (`signing.pem`, and `jwks.json` naming it `kid`):
/// made here, so the provider's tamper switch can re-sign tokens with it (valid
/// signatures, wrong claims).
fn signing_key(dir: &Path, kid: &str) -> Result<()> {
    let rsa = dir.join("signing.pem");
    let o = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa)
        .output()?;
    if !o.status.success() {
        bail!("openssl genpkey: {}", show(&o));
    }
    let jwks = dir.join("jwks.json");
    let o = Command::new("node")
        .arg("-e")
        .arg("const c=require('crypto'),fs=require('fs');const k=c.createPrivateKey(fs.readFileSync(process.argv[1])).export({format:'jwk'});k.kid=process.argv[3];k.alg='RS256';k.use='sig';fs.writeFileSync(process.argv[2],JSON.stringify({keys:[k]}));")
        .arg(&rsa)
        .arg(&jwks)
        .arg(kid)
        .output()?;
    if !o.status.success() {
        bail!("JWK export: {}", show(&o));
    }
    Ok(())
}

/// Starts provider.mjs with what `dir` holds, and waits until it listens.
fn spawn_provider(
    dir: &Path,
    p: u16,
    issuer: &str,
    admin: u16,
    redirect_uri: &str,
    log: &Path,
) -> Result<KillOnDrop> {
    let oidc_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/oidc");
    let child = Command::new("node")
        .arg(oidc_dir.join("provider.mjs"))
        .args(["--port", &p.to_string(), "--issuer", issuer])
        .arg("--cert")
        .arg(dir.join("op.crt"))
        .arg("--key")
        .arg(dir.join("op.key"))
        .arg("--jwks")
        .arg(dir.join("jwks.json"))
        .args(["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET])
        .args(["--redirect-uri", redirect_uri])
        .arg("--users")
        .arg(dir.join("users.json"))
        .args(["--admin-port", &admin.to_string()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::null())
        .spawn()
        .context("node provider.mjs")?;
    let child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("oidc-provider listening")
    {
        if Instant::now() > deadline {
            bail!(
                "the OpenID provider did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// One browser login as `user`: login.py's JSON.
fn login(
    cp: &ControlPlane,
    op: &Provider,
    user: &str,
    password: &str,
    extra: &[&str],
) -> Result<Value> {
    let start = format!("{}/api/v1/login/oidc", cp.url);
    login_at(cp, op, &start, user, password, extra)
}

/// One browser login as `user` starting at `start`.
fn login_at(
    cp: &ControlPlane,
    op: &Provider,
    start: &str,
    user: &str,
    password: &str,
    extra: &[&str],
) -> Result<Value> {
    let o = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/oidc/login.py"))
        .args(["--start", start])
        .arg("--ca")
        .arg(cp.ca())
        .arg("--ca2")
        .arg(&op.ca)
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
            "login.py as {user}: {}\nprovider log:\n{}\ncontrol-plane log:\n{}",
            show(&o),
            std::fs::read_to_string(&op.log).unwrap_or_default(),
            cp.log()
        );
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// A control plane whose operators log in through a fresh provider.
fn control_plane_with_provider(dir: &Path) -> Result<(ControlPlane, Provider, PathBuf)> {
    let cp_port = port();
    let redirect = format!("https://127.0.0.1:{cp_port}/api/v1/login/oidc/callback");
    let op = Provider::start(&dir.join("op"), &redirect)?;
    let state = dir.join("state");
    std::fs::create_dir_all(state.join("launcher"))?;
    std::fs::write(state.join("launcher/admin.token"), "unused\n")?;
    let secret = dir.join("client.secret");
    std::fs::write(&secret, CLIENT_SECRET)?;
    let addr = format!("127.0.0.1:{cp_port}");
    let cp = ControlPlane::start(
        &state,
        "http://127.0.0.1:9",
        &[
            "--addr",
            &addr,
            "--oidc-issuer",
            &op.issuer,
            "--oidc-client-id",
            CLIENT_ID,
            "--oidc-client-secret-file",
            secret.to_str().context("utf8")?,
            "--oidc-redirect-url",
            &redirect,
            "--oidc-role-map",
            "clawos-admins=admin,clawos-ops=operator,clawos-viewers=viewer",
            "--oidc-ca-cert",
            op.ca.to_str().context("utf8")?,
        ],
    )?;
    Ok((cp, op, state))
}

#[test]
fn oidc_login_maps_groups_to_roles_and_refuses_every_bad_token() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cp, mut op, state) = control_plane_with_provider(dir.path())?;

    // Each group gets its role, and the session works for the API.
    for (user, pw, role) in [
        ("alice", "pw-alice", "admin"),
        ("otto", "pw-otto", "operator"),
        ("vera", "pw-vera", "viewer"),
    ] {
        let t = Instant::now();
        let r = login(&cp, &op, user, pw, &[])?;
        assert_logged_in(&r, "callback", user, role, "oidc");
        assert_eq!(r["callback_location"], "/");
        assert!(
            r["cookies_set"]
                .as_array()
                .is_some_and(|c| c.iter().any(|n| n == "__Host-clawos_session")),
            "{r}"
        );
        if user == "alice" {
            clawos_e2e::measured(&format!(
                "control-plane OIDC: a whole browser login (discovery, code, token, checks) {:?}",
                t.elapsed()
            ));
        }
    }
    // No mapped group: no session.
    let r = login(&cp, &op, "mallory", "pw-mallory", &[])?;
    assert_eq!(r["callback_status"], 403, "{r}");
    assert!(
        r["body"].as_str().unwrap_or("").contains("no ClawOS role"),
        "{r}"
    );
    assert_eq!(r["then_status"], 401, "mallory has no session: {r}");

    // Every altered ID token is refused; the provider's own is accepted again after.
    for (mode, why) in [
        ("signature", "signature"),
        ("audience", "audience"),
        ("nonce", "nonce"),
        ("expired", "expired"),
        ("issuer", "issuer"),
    ] {
        op.tamper(mode)?;
        let r = login(&cp, &op, "alice", "pw-alice", &[])?;
        assert_eq!(
            r["callback_status"], 401,
            "tampered ({mode}) token accepted: {r}"
        );
        let body = r["body"].as_str().unwrap_or("").to_ascii_lowercase();
        assert!(
            body.contains("id token was refused") && body.contains(why),
            "{mode}: {body}"
        );
        assert_eq!(r["then_status"], 401, "{mode}: no session");
    }
    op.tamper("none")?;

    // A replayed callback (same code, same state) is refused.
    let r = login(&cp, &op, "otto", "pw-otto", &["--replay"])?;
    assert_eq!(r["callback_status"], 303, "{r}");
    assert_eq!(r["replay_status"], 401, "{r}");
    assert!(
        r["replay_body"]
            .as_str()
            .unwrap_or("")
            .contains("already used"),
        "{r}"
    );

    // A callback this browser did not start (no state cookie): login CSRF, refused.
    let forged = cp.call(
        None,
        "GET",
        "/api/v1/login/oidc/callback?code=abc&state=def",
        None,
    );
    assert_eq!(forged.status, 401, "{}", forged.body);

    // The provider rotates its signing key (restarted with a new one): the next login
    // works, the control plane fetching the new keys when a token names one it lacks.
    op.rotate_key("test-key-2")?;
    let r = login(&cp, &op, "alice", "pw-alice", &[])?;
    assert_logged_in(&r, "callback", "alice", "admin", "oidc");
    assert!(
        cp.log().contains("fetching the provider's keys again"),
        "{}",
        cp.log()
    );

    // The trail: who logged in with which role, and each refusal.
    let audit = cp.audit();
    let logins: Vec<(String, String, String)> = audit
        .iter()
        .filter(|r| r["action"] == "session.oidc")
        .map(|r| {
            (
                r["operator"].as_str().unwrap_or("").to_owned(),
                r["role"].as_str().unwrap_or("").to_owned(),
                r["result"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        logins.contains(&("alice".into(), "admin".into(), "ok".into())),
        "{logins:?}"
    );
    assert!(
        logins.iter().filter(|l| l.2 == "refused").count() >= 7,
        "refusals audited: {logins:?}"
    );
    // The client secret is in no log or record.
    for f in [
        cp.log(),
        std::fs::read_to_string(state.join("control-plane/audit.jsonl"))?,
    ] {
        assert!(!f.contains(CLIENT_SECRET), "the client secret leaked");
    }
    Ok(())
}

/// `clawos login --browser`: the CLI waits on a loopback port, the browser logs in at
/// the provider and comes back there with a one-time code, the CLI trades it (with its
/// verifier) for an API token with the user's role. The code is worth nothing twice,
/// or with another verifier.
#[test]
fn the_cli_logs_in_through_the_browser() -> Result<()> {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir()?;
    let (cp, op, _state) = control_plane_with_provider(dir.path())?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    let cli = |args: &[&str]| {
        let mut c = Command::new(clawos_e2e::bin("clawos"));
        c.arg("--server")
            .arg(&cp.url)
            .arg("--ca")
            .arg(cp.ca())
            .args(args)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("CLAWOS_OPERATOR_TOKEN");
        c
    };
    let t = Instant::now();
    let mut login = KillOnDrop(
        cli(&["login", "--browser", "--no-open"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let stderr = login.0.stderr.take().context("stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let url = loop {
        let line = lines.next().context("the CLI ended without a URL")??;
        if line.starts_with("https://") {
            break line;
        }
    };
    assert!(
        url.contains("cli_port=") && url.contains("cli_challenge="),
        "{url}"
    );
    // The browser: the provider's login, the control plane's callback, and back to the
    // CLI's loopback port.
    let r = login_at(&cp, &op, &url, "otto", "pw-otto", &[])?;
    assert_eq!(r["callback_status"], 303, "{r}");
    let back = r["callback_location"].as_str().unwrap_or("");
    assert!(back.starts_with("http://127.0.0.1:"), "{r}");
    assert_eq!(r["final_status"], 200, "the CLI answered the browser: {r}");
    let status = login.0.wait()?;
    let mut said = String::new();
    std::io::Read::read_to_string(&mut login.0.stdout.take().context("stdout")?, &mut said)?;
    assert!(status.success(), "{status}: {said}");
    assert!(said.contains("as cli-otto (operator)"), "{said}");
    clawos_e2e::measured(&format!(
        "control-plane OIDC: `clawos login --browser` end to end {:?}",
        t.elapsed()
    ));
    let me = cli(&["--json", "operator", "whoami"]).output()?;
    assert!(me.status.success(), "{}", show(&me));
    let me: Value = serde_json::from_slice(&me.stdout)?;
    assert_eq!(
        (me["operator"].as_str(), me["role"].as_str()),
        (Some("cli-otto"), Some("operator"))
    );
    let creds = home.join(".config/clawos/credentials.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&creds)?.permissions());
    assert_eq!(mode & 0o777, 0o600);

    // The code the browser carried is spent.
    let code = back
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("code="))
        .context("a code")?;
    let again = cp.call(
        None,
        "POST",
        "/api/v1/login/cli/token",
        Some(&json!({"code": code, "verifier": "x".repeat(43)})),
    );
    assert_eq!(again.status, 401, "{}", again.body);

    // A login started by hand (no CLI listening): its code, tried with a wrong
    // verifier, is refused — and then refused with the right one too.
    let verifier = "v".repeat(43);
    let challenge = python_s256(&verifier)?;
    let start = format!(
        "{}/api/v1/login/oidc?cli_port=9&cli_state=0123456789abcdef&cli_challenge={challenge}",
        cp.url
    );
    let r = login_at(&cp, &op, &start, "vera", "pw-vera", &["--no-follow-final"])?;
    let back = r["callback_location"].as_str().unwrap_or("");
    assert!(back.starts_with("http://127.0.0.1:9/callback?"), "{r}");
    assert!(back.ends_with("&state=0123456789abcdef"), "{r}");
    let code = back
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("code="))
        .context("a code")?;
    let wrong = cp.call(
        None,
        "POST",
        "/api/v1/login/cli/token",
        Some(&json!({"code": code, "verifier": "w".repeat(43)})),
    );
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let right = cp.call(
        None,
        "POST",
        "/api/v1/login/cli/token",
        Some(&json!({"code": code, "verifier": verifier})),
    );
    assert_eq!(right.status, 401, "a code is tried once: {}", right.body);
    // Bad hand-off parameters never reach the provider.
    for q in [
        "cli_port=9",
        "cli_port=9&cli_state=short&cli_challenge=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "cli_port=0&cli_state=0123456789abcdef&cli_challenge=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        let a = cp.call(None, "GET", &format!("/api/v1/login/oidc?{q}"), None);
        assert_eq!(a.status, 400, "{q}: {}", a.body);
    }
    // The user leaves: the admin ends their access by the name the CLI token shows,
    // and the token with it.
    let ended = cp.call(
        Some(&cp.admin_token()),
        "DELETE",
        "/api/v1/operators/sessions?operator=cli-otto",
        None,
    );
    assert_eq!(ended.status, 200, "{}", ended.body);
    assert_eq!(
        ended.json()["operator"],
        "otto",
        "resolved to the provider's user: {}",
        ended.body
    );
    assert_eq!(
        ended.json()["tokens_revoked"].as_array().map(Vec::len),
        Some(1),
        "{}",
        ended.body
    );
    let gone = cli(&["operator", "whoami"]).output()?;
    assert_eq!(gone.status.code(), Some(9), "{}", show(&gone));
    // Nothing left to end: said so (404), not a quiet success.
    let again = cp.call(
        Some(&cp.admin_token()),
        "DELETE",
        "/api/v1/operators/sessions?operator=otto",
        None,
    );
    assert_eq!(again.status, 404, "{}", again.body);
    assert_eq!(again.json()["error"]["code"], "not_found", "{}", again.body);
    let trail = cp.audit();
    assert!(
        trail.iter().any(|r| r["action"] == "operator.access.end"
            && r["target"] == "otto"
            && r["result"] == "ok"),
        "ending access is audited"
    );
    assert!(
        trail.iter().any(|r| r["action"] == "session.cli_token"
            && r["operator"] == "otto"
            && r["result"] == "ok"),
        "the token hand-off is audited under the provider's user"
    );
    assert_eq!(
        trail
            .iter()
            .filter(|r| r["action"] == "session.cli_token" && r["result"] == "refused")
            .count(),
        3,
        "each refused hand-off is audited"
    );
    Ok(())
}

/// BASE64URL(SHA-256(s)), computed by Python's standard library (an oracle that is not
/// the code under test).
fn python_s256(s: &str) -> Result<String> {
    let o = Command::new("python3")
        .args([
            "-c",
            "import base64,hashlib,sys; print(base64.urlsafe_b64encode(hashlib.sha256(sys.argv[1].encode()).digest()).decode().rstrip('='))",
            s,
        ])
        .output()?;
    anyhow::ensure!(o.status.success(), "{}", show(&o));
    Ok(String::from_utf8(o.stdout)?.trim().to_owned())
}
