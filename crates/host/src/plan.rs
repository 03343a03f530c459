//! What `clawos up` starts, in which order, with which arguments: a pure function of the
//! configuration and what was found on the machine, so the wiring is tested without
//! starting anything.

use std::path::{Path, PathBuf};

use crate::config::HostConfig;

/// The daemons of one host, in start order (each needs only those before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Daemon {
    Identity,
    Proxy,
    Skills,
    Monitor,
    Launcher,
    Orchestrator,
    ControlPlane,
}

impl Daemon {
    pub const ALL: [Daemon; 7] = [
        Daemon::Identity,
        Daemon::Proxy,
        Daemon::Skills,
        Daemon::Monitor,
        Daemon::Launcher,
        Daemon::Orchestrator,
        Daemon::ControlPlane,
    ];

    /// Its binary, and the name status tables, logs and pid files use.
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Identity => "identity-manager",
            Daemon::Proxy => "inference-proxy",
            Daemon::Skills => "skill-manager",
            Daemon::Monitor => "monitor-daemon",
            Daemon::Launcher => "vm-launcher",
            Daemon::Orchestrator => "orchestrator",
            Daemon::ControlPlane => "control-plane",
        }
    }
}

/// What the machine and the state directory said, gathered by the caller.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The image signing public key (hex), from the configuration or `signing.key`.
    pub signing_pubkey: Option<String>,
    /// The upstream API key for inference-proxy (from its key file or the caller's
    /// environment).
    pub anthropic_key: Option<String>,
    /// Why monitor-daemon cannot run here (no root, no BTF), if it cannot.
    pub monitor_unavailable: Option<String>,
}

/// How to tell a daemon is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `GET` of this URL answers 200.
    pub url: String,
    /// The CA its TLS certificate chains to (the control plane's self-signed one).
    pub ca: Option<PathBuf>,
}

/// One daemon to start.
#[derive(Clone, PartialEq, Eq)]
pub struct Launch {
    pub daemon: Daemon,
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// Secrets it alone gets, by environment (never on its command line, which every
    /// local user can read).
    pub secret_env: Vec<(String, String)>,
    pub addr: String,
    pub health: Health,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("daemon", &self.daemon)
            .field("binary", &self.binary)
            .field("args", &self.args)
            .field(
                "secret_env",
                &self.secret_env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("addr", &self.addr)
            .finish()
    }
}

/// The plan: what starts, and what does not and why.
#[derive(Debug, Clone)]
pub struct Plan {
    pub launches: Vec<Launch>,
    pub skipped: Vec<(Daemon, String)>,
}

/// Where a daemon's binary is: `bin_dir` if set, else beside `beside` (the running
/// `clawos`) when it is there, else its bare name (found on `PATH`).
pub fn binary(cfg: &HostConfig, beside: Option<&Path>, d: Daemon) -> PathBuf {
    if !cfg.bin_dir.as_os_str().is_empty() {
        return cfg.bin_dir.join(d.name());
    }
    if let Some(dir) = beside {
        let p = dir.join(d.name());
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(d.name())
}

fn http(addr: &str) -> String {
    format!("http://{addr}")
}

/// The control plane's address as a client on this machine reaches it.
fn local_addr(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        _ => addr.to_owned(),
    }
}

/// The launches of `cfg`, in start order.
pub fn plan(cfg: &HostConfig, found: &Found, beside: Option<&Path>) -> Plan {
    let state = cfg.state_dir.display().to_string();
    let mut launches = Vec::new();
    let mut skipped = Vec::new();
    let identity_url = http(&cfg.identity.addr);
    let mut add = |d: Daemon, addr: &str, mut args: Vec<String>, secret_env| {
        let mut all = vec![
            "--addr".to_owned(),
            addr.to_owned(),
            "--state-dir".into(),
            state.clone(),
        ];
        all.append(&mut args);
        launches.push(Launch {
            daemon: d,
            binary: binary(cfg, beside, d),
            args: all,
            secret_env,
            addr: addr.to_owned(),
            health: Health {
                url: format!("{}/healthz", http(addr)),
                ca: None,
            },
        });
    };
    add(
        Daemon::Identity,
        &cfg.identity.addr,
        vec!["--issuer".into(), identity_url.clone()],
        vec![],
    );
    add(
        Daemon::Proxy,
        &cfg.proxy.addr,
        vec![
            "--issuer".into(),
            identity_url.clone(),
            "--anthropic-url".into(),
            cfg.proxy.anthropic_url.clone(),
            "--rpm".into(),
            cfg.proxy.rpm.to_string(),
        ],
        found
            .anthropic_key
            .iter()
            .map(|k| ("ANTHROPIC_API_KEY".to_owned(), k.clone()))
            .collect(),
    );
    if cfg.skills.enabled {
        let mut args = vec![
            "--issuer".into(),
            identity_url.clone(),
            "--agent-calls-per-minute".into(),
            cfg.skills.agent_calls_per_minute.to_string(),
        ];
        if let Some(k) = &found.signing_pubkey {
            args.extend(["--signing-pubkey".into(), k.clone()]);
        }
        for r in &cfg.skills.resolve {
            args.extend(["--resolve".into(), r.clone()]);
        }
        add(Daemon::Skills, &cfg.skills.addr, args, vec![]);
    } else {
        skipped.push((Daemon::Skills, "skills.enabled = false".into()));
    }
    let monitor = match (&found.monitor_unavailable, cfg.monitor.enabled) {
        (_, false) => {
            skipped.push((Daemon::Monitor, "monitor.enabled = false".into()));
            false
        }
        (Some(why), true) => {
            skipped.push((Daemon::Monitor, why.clone()));
            false
        }
        (None, true) => {
            let mut args = Vec::new();
            for s in &cfg.monitor.syslog {
                args.extend(["--syslog".into(), s.clone()]);
            }
            add(Daemon::Monitor, &cfg.monitor.addr, args, vec![]);
            true
        }
    };
    let mut args = vec![
        "--identity-url".into(),
        identity_url.clone(),
        "--inference-proxy-url".into(),
        http(&cfg.proxy.addr),
        "--backend".into(),
        cfg.launcher.backend.clone(),
    ];
    let image = cfg.image();
    if image.join("manifest.json").is_file() {
        args.extend(["--image".into(), image.display().to_string()]);
    }
    if let Some(k) = &found.signing_pubkey {
        args.extend(["--signing-pubkey".into(), k.clone()]);
    }
    if cfg.skills.enabled {
        args.extend(["--skill-manager-url".into(), http(&cfg.skills.addr)]);
    }
    if monitor {
        args.extend(["--monitor-url".into(), http(&cfg.monitor.addr)]);
    }
    add(Daemon::Launcher, &cfg.launcher.addr, args, vec![]);
    if cfg.orchestrator.enabled {
        add(
            Daemon::Orchestrator,
            &cfg.orchestrator.addr,
            vec!["--launcher-url".into(), http(&cfg.launcher.addr)],
            vec![],
        );
    } else {
        skipped.push((Daemon::Orchestrator, "orchestrator.enabled = false".into()));
    }
    if cfg.control_plane.enabled {
        let mut args = vec![
            "--tls".into(),
            "self-signed".into(),
            "--tls-name".into(),
            cfg.control_plane.tls_names.join(","),
            "--launcher-url".into(),
            http(&cfg.launcher.addr),
            "--identity-url".into(),
            identity_url,
            "--proxy-url".into(),
            http(&cfg.proxy.addr),
        ];
        if monitor {
            args.extend(["--monitor-url".into(), http(&cfg.monitor.addr)]);
        }
        if cfg.orchestrator.enabled {
            args.extend(["--orchestrator-url".into(), http(&cfg.orchestrator.addr)]);
        }
        add(Daemon::ControlPlane, &cfg.control_plane.addr, args, vec![]);
        if let Some(l) = launches.last_mut() {
            l.health = Health {
                url: format!("https://{}/healthz", local_addr(&cfg.control_plane.addr)),
                ca: Some(cfg.state_dir.join("control-plane/tls/self-signed.crt")),
            };
        }
    } else {
        skipped.push((Daemon::ControlPlane, "control_plane.enabled = false".into()));
    }
    Plan { launches, skipped }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(file: &str) -> HostConfig {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, file).expect("write");
        HostConfig::load(Some(&p), &|_| None, Path::new("/s")).expect("config")
    }

    fn args_of(p: &Plan, d: Daemon) -> Vec<String> {
        p.launches
            .iter()
            .find(|l| l.daemon == d)
            .map(|l| l.args.clone())
            .unwrap_or_default()
    }

    fn has(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn daemons_are_wired_to_each_other_and_the_key_goes_to_the_proxy_alone() {
        let c = cfg(
            "[skills]\nresolve = [\"search.local=127.0.0.1\"]\n[control_plane]\nenabled = true\n",
        );
        let found = Found {
            signing_pubkey: Some("ab".repeat(32)),
            anthropic_key: Some("sk-ant-test".into()),
            monitor_unavailable: None,
        };
        let p = plan(&c, &found, None);
        let order: Vec<Daemon> = p.launches.iter().map(|l| l.daemon).collect();
        assert_eq!(order, Daemon::ALL, "every daemon, in dependency order");
        assert!(p.skipped.is_empty());
        for l in &p.launches {
            assert!(has(&l.args, "--state-dir", "/s"), "{l:?}");
            assert!(has(&l.args, "--addr", &l.addr), "{l:?}");
            assert!(!l.args.iter().any(|a| a.contains("sk-ant-test")), "{l:?}");
            let key = l.secret_env.iter().any(|(_, v)| v == "sk-ant-test");
            assert_eq!(key, l.daemon == Daemon::Proxy, "{l:?}");
            assert!(
                !format!("{l:?}").contains("sk-ant-test"),
                "Debug shows no secret"
            );
        }
        let launcher = args_of(&p, Daemon::Launcher);
        for (flag, value) in [
            ("--identity-url", "http://127.0.0.1:2082"),
            ("--inference-proxy-url", "http://127.0.0.1:11435"),
            ("--skill-manager-url", "http://127.0.0.1:2083"),
            ("--monitor-url", "http://127.0.0.1:2084"),
            ("--signing-pubkey", &"ab".repeat(32)),
        ] {
            assert!(has(&launcher, flag, value), "{flag} {value}: {launcher:?}");
        }
        assert!(has(
            &args_of(&p, Daemon::Skills),
            "--resolve",
            "search.local=127.0.0.1"
        ));
        assert!(has(
            &args_of(&p, Daemon::Orchestrator),
            "--launcher-url",
            "http://127.0.0.1:2080"
        ));
        let cp = p.launches.last().expect("control plane");
        assert_eq!(cp.health.url, "https://127.0.0.1:8080/healthz");
        assert_eq!(
            cp.health.ca.as_deref(),
            Some(Path::new("/s/control-plane/tls/self-signed.crt"))
        );
    }

    #[test]
    fn what_is_off_or_cannot_run_is_skipped_with_why_and_not_wired() {
        let c = cfg("[skills]\nenabled = false\n[orchestrator]\nenabled = false\n");
        let found = Found {
            monitor_unavailable: Some("needs root".into()),
            ..Found::default()
        };
        let p = plan(&c, &found, None);
        let order: Vec<Daemon> = p.launches.iter().map(|l| l.daemon).collect();
        assert_eq!(order, [Daemon::Identity, Daemon::Proxy, Daemon::Launcher]);
        let why: Vec<&str> = p.skipped.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            why,
            [
                "skills.enabled = false",
                "needs root",
                "orchestrator.enabled = false",
                "control_plane.enabled = false"
            ]
        );
        let launcher = args_of(&p, Daemon::Launcher);
        assert!(
            !launcher
                .iter()
                .any(|a| a == "--skill-manager-url" || a == "--monitor-url")
        );
        assert!(!launcher.iter().any(|a| a == "--signing-pubkey"));
    }
}
