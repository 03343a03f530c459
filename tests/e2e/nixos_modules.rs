//! The flake and the NixOS modules (`flake.nix`, `nixos/modules/{host,agent}.nix`),
//! as far as this machine can take them: it reaches no Nix binary cache, so nothing is
//! built and no NixOS system is evaluated. Every file parses (`nix-instantiate
//! --parse`, Debian's nix-bin); the modules are evaluated through a stand-in for the
//! module system (`nixos/tests/module-standin.nix`), and what they produce is checked:
//! an option for every clawos.toml key, bad settings refused by option name, and every
//! command line a unit gets taken by the real daemon (or `clawos`) built here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use clawos_e2e::show;
use serde_json::{Value, json};

const TEST: &str = "nixos_modules";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `nix-instantiate` with `args`; an error when it cannot be started.
fn try_nix(args: &[&str]) -> std::io::Result<Output> {
    Command::new("nix-instantiate")
        // No build users on this machine, and nothing is built.
        .args(["--option", "build-users-group", ""])
        .args(args)
        .current_dir(repo())
        .output()
}

fn nix(args: &[&str]) -> Output {
    try_nix(args).expect("nix-instantiate")
}

/// Whether Nix is here; the first call also opens the Nix store, once, before any test
/// runs `nix-instantiate` on its own. On a fresh machine the first `nix-instantiate`
/// that opens the store creates `/nix/var/nix` (its database, `gcroots/profiles`…), and
/// two doing it at once race: one fails with "creating symlink … File exists". The
/// tests here run in parallel, so they would race without this.
fn have_nix() -> bool {
    static STORE_OPENED: OnceLock<bool> = OnceLock::new();
    *STORE_OPENED.get_or_init(|| {
        let Ok(o) = try_nix(&["--eval", "--expr", "1"]) else {
            clawos_test_skip::record(
                TEST,
                "nix-instantiate is not installed (scripts/setup.sh installs Debian's nix-bin)",
            );
            return false;
        };
        assert!(
            o.status.success(),
            "nix-instantiate is installed but cannot open its store: {}",
            show(&o)
        );
        true
    })
}

/// The modules' output for `settings` (under `services.clawos`), or the error.
fn eval(settings: Value) -> Result<Value, String> {
    let mut all = json!({"enable": true, "package": "/nix/store/clawos"});
    if let (Some(a), Some(s)) = (all.as_object_mut(), settings.as_object()) {
        a.extend(s.clone());
    }
    let arg = json!({"services": {"clawos": all}}).to_string();
    let o = nix(&[
        "--eval",
        "--strict",
        "--json",
        "nixos/tests/eval.nix",
        "--argstr",
        "settings",
        &arg,
    ]);
    if o.status.success() {
        Ok(serde_json::from_slice(&o.stdout).expect("JSON"))
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn every_nix_file_parses() {
    if !have_nix() {
        return;
    }
    let mut files = vec![repo().join("flake.nix")];
    for dir in ["nixos/modules", "nixos/tests"] {
        for e in std::fs::read_dir(repo().join(dir)).expect("dir").flatten() {
            files.push(e.path());
        }
    }
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let o = nix(&["--parse", f.to_str().expect("utf-8")]);
        assert!(o.status.success(), "{}: {}", f.display(), show(&o));
    }
}

#[test]
fn the_modules_mirror_clawos_toml_and_their_units_run_the_real_daemons() {
    if !have_nix() {
        return;
    }
    let out = eval(json!({
        "launcher": {"signingPubkey": "ab".repeat(32), "image": "/var/lib/clawos/images/research"},
        "skills": {"resolve": ["search.local=127.0.0.1"]},
        "monitor": {"syslog": ["tcp://127.0.0.1:514"]},
        "controlPlane": {"enable": true},
        "agents": {"researcher": {"model": "claude-sonnet-4-5", "mem": 768, "skills": ["web-search"]}},
    }))
    .expect("evaluates");

    // Every clawos.toml key has its option (camelCase; `enabled` is NixOS's `enable`),
    // but the three only `clawos up` uses: systemd starts, stops and finds the binaries.
    let options: Vec<String> = out["options"]
        .as_array()
        .expect("options")
        .iter()
        .filter_map(|o| o.as_str().map(str::to_owned))
        .collect();
    let defaults: toml::Table = toml::from_str(clawos_host::config::DEFAULTS).expect("clawos.toml");
    for (key, value) in &defaults {
        let paths: Vec<String> = match value.as_table() {
            Some(section) => section
                .keys()
                .map(|k| format!("{}.{}", camel(key), camel(k).replace("enabled", "enable")))
                .collect(),
            None if ["bin_dir", "start_timeout_secs", "stop_timeout_secs"]
                .contains(&key.as_str()) =>
            {
                continue;
            }
            None => vec![camel(key)],
        };
        for p in paths {
            let option = format!("services.clawos.{p}");
            assert!(
                options.contains(&option),
                "clawos.toml's {key}: no option {option}"
            );
        }
    }

    // Each unit the host module configures is one of the package's, and its command
    // line is taken by its daemon; the agent's steps by `clawos`.
    let services = out["services"].as_object().expect("services");
    let packaged: Vec<String> = std::fs::read_dir(repo().join("packaging/systemd"))
        .expect("units")
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".service")
                .map(str::to_owned)
        })
        .collect();
    for (name, unit) in services {
        assert_eq!(unit["enable"], true, "{name}");
        let commands: Vec<&str> = unit["execStart"]
            .as_array()
            .expect("ExecStart")
            .iter()
            .filter_map(Value::as_str)
            .filter(|c| !c.is_empty())
            .collect();
        assert!(!commands.is_empty(), "{name}");
        if !name.starts_with("clawos-agent-") {
            assert!(packaged.contains(name), "{name} is not a packaged unit");
            assert_eq!(
                unit["execStart"][0], "",
                "{name}: the packaged command line is reset"
            );
        }
        for c in commands {
            clawos_e2e::assert_command_line_taken(c, "/nix/store/clawos/bin/", name);
        }
    }
    let launcher = services["clawos-vm-launcher"]["execStart"][1]
        .as_str()
        .expect("launcher");
    for part in [
        "--skill-manager-url http://127.0.0.1:2083",
        "--monitor-url http://127.0.0.1:2084",
        "--image /var/lib/clawos/images/research",
        &format!("--signing-pubkey {}", "ab".repeat(32)),
    ] {
        assert!(launcher.contains(part), "{part}: {launcher}");
    }
    let agent = &services["clawos-agent-researcher"];
    assert_eq!(
        agent["execStart"],
        json!([
            "/nix/store/clawos/bin/clawos skill enable web-search researcher",
            "/nix/store/clawos/bin/clawos vm start researcher --model claude-sonnet-4-5 --mem 768"
        ])
    );
    assert!(
        agent["after"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("clawos-skill-manager.service")))
    );
    assert_eq!(
        out["users"],
        json!([
            "clawos-control-plane",
            "clawos-identity",
            "clawos-orchestrator",
            "clawos-proxy",
            "clawos-skills"
        ]),
        "a user per unprivileged daemon"
    );
    assert!(out["tmpfiles"].as_array().is_some_and(|t| {
        t.contains(&json!("d /var/lib/clawos 0755 root root -"))
            && t.contains(&json!(
                "d /var/lib/clawos/identity 0700 clawos-identity clawos -"
            ))
    }));

    // Off means off: the packaged unit masked (the package's target wants it), not
    // wired; another state directory is the one units may write and load from.
    let off = eval(json!({
        "skills": {"enable": false},
        "monitor": {"enable": false},
        "stateDir": "/srv/clawos",
        "proxy": {"anthropicUrl": "https://llm.example/a b%$x"},
    }))
    .expect("evaluates");
    let services = off["services"].as_object().expect("services");
    assert_eq!(services["clawos-skill-manager"]["enable"], false);
    assert_eq!(services["clawos-monitor"]["enable"], false);
    assert!(!services.contains_key("clawos-control-plane"));
    assert_eq!(
        services["clawos-orchestrator"]["readWritePaths"],
        json!(["", "/srv/clawos"])
    );
    assert_eq!(
        services["clawos-orchestrator"]["loadCredential"],
        json!(["", "launcher-token:/srv/clawos/launcher/admin.token"])
    );
    // A value with a space, `%` and `$` is one quoted word, as systemd reads it.
    let proxy = services["clawos-inference-proxy"]["execStart"][1]
        .as_str()
        .expect("proxy");
    assert!(
        proxy.contains(r#"--anthropic-url "https://llm.example/a b%%$$x""#),
        "{proxy}"
    );
    let launcher = services["clawos-vm-launcher"]["execStart"][1]
        .as_str()
        .expect("launcher");
    assert!(!launcher.contains("--skill-manager-url") && !launcher.contains("--monitor-url"));
}

#[test]
fn bad_settings_are_refused_by_option_name() {
    if !have_nix() {
        return;
    }
    for (settings, expect) in [
        (
            json!({"proxy": {"rpm": "fast"}}),
            "services.clawos.proxy.rpm' is not of type positive integer",
        ),
        (
            json!({"proxy": {"adr": "x"}}),
            "services.clawos.proxy.adr' does not exist",
        ),
        (
            json!({"launcher": {"backend": "kvmtool"}}),
            "services.clawos.launcher.backend' is not of type one of",
        ),
        (
            json!({"agents": {"a1": {"mem": 0}}}),
            "services.clawos.agents.a1.mem' is not of type positive integer",
        ),
        (
            json!({"agents": {"Bad_Name": {}}}),
            "services.clawos.agents.Bad_Name: a VM name is 1-63 of a-z",
        ),
        (
            json!({"skills": {"resolve": "search.local=127.0.0.1"}}),
            "services.clawos.skills.resolve' is not of type list of string",
        ),
    ] {
        let e = eval(settings.clone()).expect_err("refused");
        assert!(e.contains(expect), "{settings}: {e}");
    }
}
