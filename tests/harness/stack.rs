//! The host services an agent VM talks to, as real daemons on loopback: identity-manager,
//! inference-proxy in front of `clawos-scripted-model` upstreams (the stand-in for the
//! hosted Anthropic API), and a recording forwarder tests put between the launcher's
//! relay and the proxy to see exactly what the relay sends.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{KillOnDrop, Launcher, bin, port, spawn_daemon};

/// The host's real (here: made-up) upstream API key: only the proxy holds it.
pub const HOST_KEY: &str = "sk-ant-host-only-3f9c1d2e7a";

/// A running `clawos-scripted-model`.
#[derive(Debug)]
pub struct ScriptedModel {
    pub url: String,
    /// One JSON line per request it received (`--record`).
    pub record: PathBuf,
    _child: KillOnDrop,
}

impl ScriptedModel {
    /// Starts one playing `script` (the JSON of a script file), requiring [`HOST_KEY`].
    pub fn start(dir: &Path, name: &str, script: &Value) -> Result<Self> {
        let script_path = dir.join(format!("{name}.script.json"));
        std::fs::write(&script_path, serde_json::to_vec_pretty(script)?)?;
        let record = dir.join(format!("{name}.requests.jsonl"));
        let (child, url) = crate::spawn_announced(
            Command::new(bin("clawos-scripted-model"))
                .arg("--addr")
                .arg("127.0.0.1:0")
                .arg("--script")
                .arg(&script_path)
                .arg("--api-key")
                .arg(HOST_KEY)
                .arg("--record")
                .arg(&record)
                .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?),
        )
        .context("start clawos-scripted-model")?;
        Ok(Self {
            url,
            record,
            _child: child,
        })
    }

    /// The requests it has received so far.
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// An Anthropic-API upstream of the proxy: name, model patterns, base URL.
#[derive(Debug, Clone)]
struct Upstream {
    name: String,
    models: Vec<String>,
    url: String,
}

/// identity-manager and inference-proxy sharing one state directory (the proxy trusts
/// identity-manager's JWKS; the launcher finds its service credential there).
#[derive(Debug)]
pub struct HostServices {
    pub identity_url: String,
    pub proxy_url: String,
    pub proxy_port: u16,
    pub state: PathBuf,
    _identity: Option<KillOnDrop>,
    proxy: Option<KillOnDrop>,
    upstreams: Vec<Upstream>,
    proxy_env: Vec<(String, String)>,
}

impl HostServices {
    /// Starts both; `upstreams` are (name, model patterns, base URL) of Anthropic-API
    /// upstreams, all keyed with [`HOST_KEY`]; `proxy_env` adds proxy settings.
    pub fn start(
        state: &Path,
        upstreams: &[(&str, &[&str], &str)],
        proxy_env: &[(&str, &str)],
    ) -> Result<Self> {
        std::fs::create_dir_all(state)?;
        let (identity, identity_url) =
            crate::start_identity_manager(state, &state.join("identity-manager.log"))?;
        let mut s = Self {
            identity_url,
            proxy_url: String::new(),
            proxy_port: port(),
            state: state.to_owned(),
            _identity: Some(identity),
            proxy: None,
            upstreams: upstreams
                .iter()
                .map(|(n, m, u)| Upstream {
                    name: (*n).to_owned(),
                    models: m.iter().map(|p| (*p).to_owned()).collect(),
                    url: (*u).to_owned(),
                })
                .collect(),
            proxy_env: proxy_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        s.proxy_url = format!("http://127.0.0.1:{}", s.proxy_port);
        s.start_proxy()?;
        Ok(s)
    }

    /// (Re)starts inference-proxy on its port.
    pub fn start_proxy(&mut self) -> Result<()> {
        self.proxy = None;
        let upstreams: Vec<Value> = self
            .upstreams
            .iter()
            .map(|u| {
                json!({"name": u.name, "api": "anthropic", "base_url": u.url,
                       "api_key_env": "ANTHROPIC_API_KEY", "models": u.models})
            })
            .collect();
        let file = self.state.join("upstreams.json");
        std::fs::write(&file, serde_json::to_vec(&upstreams)?)?;
        let file_s = file.to_str().context("utf8")?.to_owned();
        let mut env: Vec<(&str, &str)> = vec![
            ("ANTHROPIC_API_KEY", HOST_KEY),
            ("CLAWOS_PROXY_UPSTREAMS", &file_s),
            ("CLAWOS_IDENTITY_ISSUER", &self.identity_url),
        ];
        env.extend(self.proxy_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = spawn_daemon(
            "inference-proxy",
            &[
                "--addr",
                &format!("127.0.0.1:{}", self.proxy_port),
                "--state-dir",
                self.state.to_str().context("utf8")?,
            ],
            &env,
            &self.state.join("inference-proxy.log"),
            self.proxy_port,
        )?;
        self.proxy = Some(KillOnDrop(child));
        Ok(())
    }

    /// identity-manager's service credential.
    pub fn service_token(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.state.join("identity/service.token"))?
                .trim()
                .to_owned(),
        )
    }

    /// The proxy's ledger: (agent, vm_id, model, status) of every request, oldest first.
    /// Waits until it holds at least `at_least` rows (the ledger writes in batches).
    pub fn ledger(&self, at_least: usize) -> Vec<(String, String, String, u16)> {
        let db = self.state.join("proxy/ledger.db");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows: Vec<(String, String, String, u16)> = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .and_then(|c| {
                let mut st =
                    c.prepare("SELECT agent, vm_id, model, status FROM requests ORDER BY time_ms")?;
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect()
            })
            .unwrap_or_default();
            if rows.len() >= at_least || Instant::now() > deadline {
                return rows;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP forwarder that records the request head of every connection it carries (the
/// launcher's relay opens one connection per request).
#[derive(Debug, Clone)]
pub struct RecordingForwarder {
    pub port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RecordingForwarder {
    /// Forwards `127.0.0.1:<port>` to `target` (`host:port`).
    pub fn start(target: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (target, recorded) = (target.to_owned(), Arc::clone(&heads));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (target, recorded) = (target.clone(), Arc::clone(&recorded));
                std::thread::spawn(move || forward(conn, &target, &recorded));
            }
        });
        Ok(Self { port, heads })
    }

    /// Every request head seen so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// The bearer tokens the requests carried, in order.
    pub fn bearers(&self) -> Vec<String> {
        self.heads()
            .iter()
            .flat_map(|h| {
                h.lines()
                    .filter_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.eq_ignore_ascii_case("authorization"))
                            .then(|| v.trim().strip_prefix("Bearer ").map(str::to_owned))
                            .flatten()
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn forward(mut client: TcpStream, target: &str, recorded: &Mutex<Vec<String>>) {
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(head.len(), |i| i + 4);
    if let Ok(mut r) = recorded.lock() {
        r.push(String::from_utf8_lossy(&head[..end]).into_owned());
    }
    let Ok(mut upstream) = TcpStream::connect(target) else {
        return;
    };
    if upstream.write_all(&head).is_err() {
        return;
    }
    let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

/// The orchestrator daemon on its own port, sharing the launcher's state directory (it
/// reads the launcher's credential there, and keeps its journal in `orchestrator/`).
#[derive(Debug)]
pub struct Orchestrator {
    pub port: u16,
    state: PathBuf,
    launcher_url: String,
    child: Option<KillOnDrop>,
    /// Processes started so far (each logs to its own file).
    starts: u32,
}

impl Orchestrator {
    pub fn start(state: &Path, launcher_url: &str) -> Self {
        let mut o = Self {
            port: port(),
            state: state.to_owned(),
            launcher_url: launcher_url.to_owned(),
            child: None,
            starts: 0,
        };
        o.spawn();
        o
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = self.state.join(format!("orchestrator-{}.log", self.starts));
        let child = spawn_daemon(
            "orchestrator",
            &[
                "--addr",
                &format!("127.0.0.1:{}", self.port),
                "--state-dir",
                self.state.to_str().expect("utf8"),
                "--launcher-url",
                &self.launcher_url,
            ],
            &[],
            &log,
            self.port,
        )
        .expect("orchestrator");
        self.child = Some(KillOnDrop(child));
    }

    /// SIGKILL, then a new process on the same journal.
    pub fn kill9_and_restart(&mut self) {
        self.child = None;
        self.spawn();
    }

    pub fn clawos(&self, l: &Launcher, args: &[&str]) -> Output {
        let mut cmd = l.clawos_command(args);
        cmd.env(
            "CLAWOS_ORCHESTRATOR_URL",
            format!("http://127.0.0.1:{}", self.port),
        );
        crate::deadline::output_within(&mut cmd, None, crate::deadline::call_limit(), || {
            crate::deadline::state_logs(&l.state_dir)
        })
    }

    pub fn status(&self, l: &Launcher, run: &str) -> Value {
        let o = self.clawos(l, &["workflow", "status", run, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("status json")
    }

    pub fn events(&self, l: &Launcher, run: &str) -> Vec<Value> {
        let o = self.clawos(l, &["workflow", "logs", run, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls the run until `done` holds, or panics with its status after `limit`.
    pub fn wait_for(
        &self,
        l: &Launcher,
        run: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status(l, run);
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "run {run} after {limit:?}: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Everything a workflow needs, on loopback: a scripted model, identity-manager,
/// inference-proxy, vm-launcher (with the identity) and the orchestrator, sharing one
/// state directory.
#[derive(Debug)]
pub struct WorkflowStack {
    pub host: HostServices,
    pub launcher: Launcher,
    pub orchestrator: Orchestrator,
    _model: ScriptedModel,
    work: tempfile::TempDir,
}

impl WorkflowStack {
    /// Starts the stack with the model playing `script`.
    pub fn start(script: &Value) -> Result<Self> {
        let work = tempfile::tempdir()?;
        let state = work.path().join("state");
        std::fs::create_dir_all(&state)?;
        let model = ScriptedModel::start(work.path(), "model", script)?;
        let host = HostServices::start(&state, &[("anthropic", &["claude-*"], &model.url)], &[])?;
        let launcher = Launcher::start_with(
            &state,
            &[
                ("CLAWOS_INFERENCE_PROXY_URL", host.proxy_url.as_str()),
                ("CLAWOS_IDENTITY_URL", host.identity_url.as_str()),
            ],
        )?;
        let orchestrator = Orchestrator::start(&state, &launcher.url);
        Ok(Self {
            host,
            launcher,
            orchestrator,
            _model: model,
            work,
        })
    }

    /// A scratch directory of the test's own.
    pub fn dir(&self) -> &Path {
        self.work.path()
    }
}

/// A running `control-plane` over TLS on a loopback port, sharing the launcher's state
/// directory (it reads the launcher's credential there and keeps its own in
/// `control-plane/`), driven with the real `curl`.
#[derive(Debug)]
pub struct ControlPlane {
    pub port: u16,
    pub url: String,
    pub state: PathBuf,
    pub log: PathBuf,
    _child: KillOnDrop,
}

/// One answer as `curl` saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: String,
    pub body: String,
}

impl Answer {
    /// The JSON body.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.headers.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with(&prefix)
                .then(|| l[prefix.len()..].trim().to_owned())
        })
    }
}

impl ControlPlane {
    /// Starts one with `args` after the common ones (state dir, loopback address,
    /// launcher URL); without a `--tls` among them it serves a self-signed certificate
    /// for `localhost` and `127.0.0.1`.
    pub fn start(state: &Path, launcher_url: &str, args: &[&str]) -> Result<Self> {
        // An `--addr` among `args` is the one used (a test that must know the port
        // before the daemon starts); else a free loopback port.
        let given = args.iter().position(|a| *a == "--addr");
        let port = match given {
            Some(i) => args
                .get(i + 1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .context("--addr needs host:port")?,
            None => port(),
        };
        let log = state.join("control-plane.log");
        let addr = format!("127.0.0.1:{port}");
        let mut all = vec![];
        if given.is_none() {
            all.extend(["--addr", addr.as_str()]);
        }
        all.extend([
            "--state-dir",
            state.to_str().context("utf8 state dir")?,
            "--launcher-url",
            launcher_url,
        ]);
        if !args.contains(&"--tls") {
            all.extend(["--tls", "self-signed", "--tls-name", "localhost,127.0.0.1"]);
        }
        all.extend_from_slice(args);
        let child = spawn_daemon(
            "control-plane",
            &all,
            &[("RUST_LOG", "info,clawos_control_plane=debug")],
            &log,
            port,
        )?;
        Ok(Self {
            port,
            url: format!("https://127.0.0.1:{port}"),
            state: state.to_owned(),
            log,
            _child: KillOnDrop(child),
        })
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self._child.0.id()
    }

    /// The local admin's credential, made at the first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.state.join("control-plane/admin.token"))
            .expect("control-plane/admin.token")
            .trim()
            .to_owned()
    }

    /// The self-signed certificate it serves, for clients to trust.
    pub fn ca(&self) -> PathBuf {
        self.state.join("control-plane/tls/self-signed.crt")
    }

    /// Its diagnostic log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The operator audit trail so far, one value per record.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("control-plane/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit records are JSON lines"))
            .collect()
    }

    /// `curl` with `extra` arguments against `path`, trusting [`Self::ca`], sending
    /// `token` as the bearer credential when given.
    pub fn curl_with(&self, token: Option<&str>, extra: &[&str], path: &str) -> Answer {
        let dir = tempfile::tempdir().expect("tempdir");
        let head = dir.path().join("head");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "120", "--cacert"])
            .arg(self.ca())
            .arg("-D")
            .arg(&head)
            .args(["-o", "-", "-w", "\n%{http_code}"]);
        if let Some(t) = token {
            // From a file, so the secret is on no command line (`ps` shows those).
            let hdr = dir.path().join("auth");
            std::fs::write(&hdr, format!("Authorization: Bearer {t}\n")).expect("write");
            cmd.arg("-H").arg(format!("@{}", hdr.display()));
        }
        let out = cmd
            .args(extra)
            .arg(format!("{}{path}", self.url))
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "curl {path} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').expect("status line");
        Answer {
            status: status.trim().parse().expect("status"),
            headers: std::fs::read_to_string(&head).unwrap_or_default(),
            body: body.to_owned(),
        }
    }

    /// `curl` `method` `path` with an optional JSON body.
    pub fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Answer {
        let mut extra = vec!["-X", method];
        let body = body.map(|b| b.to_string());
        if let Some(b) = &body {
            extra.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        self.curl_with(token, &extra, path)
    }
}

/// Checks a browser login through an identity provider as the tests' login drivers
/// report it (JSON with `<step>_status` and a `then` request to `/api/v1/whoami`): the
/// provider's answer to `step` redirected with a session, and the session is `user`
/// with `role`, authenticated `via`.
pub fn assert_logged_in(r: &Value, step: &str, user: &str, role: &str, via: &str) {
    assert_eq!(r[format!("{step}_status")], 303, "{user}: {r}");
    assert_eq!(r["then_status"], 200, "{user}'s session: {r}");
    let me: Value = serde_json::from_str(r["then_body"].as_str().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("whoami answer ({e}): {r}"));
    assert_eq!(
        (
            me["operator"].as_str(),
            me["role"].as_str(),
            me["via"].as_str()
        ),
        (Some(user), Some(role), Some(via)),
        "{me}"
    );
}
