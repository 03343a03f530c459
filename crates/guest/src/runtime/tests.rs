//! Tests of the agent runtime's choice, environment, supervision and status.

use super::*;
use std::collections::BTreeMap;

fn uid() -> u32 {
    // SAFETY: getuid/getgid have no preconditions.
    unsafe { libc::getuid() }
}

fn gid() -> u32 {
    // SAFETY: as above.
    unsafe { libc::getgid() }
}

fn openclaw() -> RuntimeDescriptor {
    RuntimeDescriptor {
        name: "openclaw".into(),
        version: "2026.9.6".into(),
        argv: vec![
            "/opt/node/bin/node".into(),
            "/opt/openclaw/node_modules/openclaw/openclaw.mjs".into(),
            "gateway".into(),
            "run".into(),
        ],
        env: BTreeMap::from([
            ("OPENCLAW_STATE_DIR".into(), "/workspace/.openclaw".into()),
            (
                "OPENCLAW_CONFIG_PATH".into(),
                "/etc/openclaw/openclaw.json".into(),
            ),
        ]),
        model_env: Some("CLAWOS_MODEL".into()),
        default_model: Some("claude-sonnet-4-5".into()),
        gateway_token_env: Some("OPENCLAW_GATEWAY_TOKEN".into()),
        home: "/workspace/.openclaw/home".into(),
        workspace_dirs: vec![".openclaw".into()],
        ready_timeout_secs: 600,
        skills_env: BTreeMap::from([(
            "OPENCLAW_CONFIG_PATH".into(),
            "/etc/openclaw/openclaw-skills.json".into(),
        )]),
    }
}

/// Runs `spec` with its program replaced by `sh -c 'env > <file>'` as the current
/// user; the environment it saw, as (name, value) pairs.
fn environment_of(spec: &RuntimeSpec, dir: &Path, file: &str) -> BTreeMap<String, String> {
    let out = dir.join(file);
    let spec = RuntimeSpec {
        bin: "/bin/sh".into(),
        args: vec!["-c".into(), format!("env > {}", out.display())],
        uid: uid(),
        gid: gid(),
        workdir: dir.to_owned(),
        ..spec.clone()
    };
    let status = spawn(&spec).expect("spawn").wait().expect("wait");
    assert!(status.success());
    fs::read_to_string(&out)
        .expect("env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn model_comes_from_the_env_file() {
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path().join(".env");
    fs::write(&f, "ANTHROPIC_BASE_URL=http://x\nCLAWOS_MODEL=claude-x\n").expect("write");
    assert_eq!(model_from_env_file(&f).as_deref(), Some("claude-x"));
    fs::write(&f, "CLAWOS_MODEL=\n").expect("write");
    assert_eq!(model_from_env_file(&f), None);
    assert_eq!(model_from_env_file(&d.path().join("absent")), None);
}

#[test]
fn the_mcp_server_comes_from_the_env_file_only_when_named() {
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path().join(".env");
    fs::write(&f, "CLAWOS_MODEL=claude-x\nCLAWOS_MCP_URLX=http://no\n").expect("write");
    assert_eq!(
        env_file_value(&f, MCP_URL_VAR),
        None,
        "a longer name is not it"
    );
    fs::write(&f, "CLAWOS_MCP_URL=http://127.0.0.1:2083/mcp\n").expect("write");
    assert_eq!(
        env_file_value(&f, MCP_URL_VAR).as_deref(),
        Some("http://127.0.0.1:2083/mcp")
    );
}

#[test]
fn skills_add_the_mcp_server_and_the_descriptors_skills_environment() {
    let d = openclaw();
    let value = |spec: &RuntimeSpec, k: &str| -> Vec<String> {
        spec.env
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let plain = RuntimeSpec::from_descriptor(&d, None, Some("t"), None);
    assert_eq!(
        value(&plain, "OPENCLAW_CONFIG_PATH"),
        ["/etc/openclaw/openclaw.json"]
    );
    assert!(value(&plain, MCP_URL_VAR).is_empty());
    let mut with = plain.clone();
    with.offer_skills(&d, "http://127.0.0.1:2083/mcp");
    assert_eq!(value(&with, MCP_URL_VAR), ["http://127.0.0.1:2083/mcp"]);
    assert_eq!(
        value(&with, "OPENCLAW_CONFIG_PATH"),
        ["/etc/openclaw/openclaw-skills.json"],
        "replaced, not set twice"
    );
    assert_eq!(with.env.len(), plain.env.len() + 1);
}

#[test]
fn the_image_chooses_its_runtime() {
    let d = tempfile::tempdir().expect("tmp");
    let desc = d.path().join("runtime.json");
    let agentd = d.path().join("clawos-agentd");
    // Neither: no runtime.
    assert_eq!(choose(&desc, &agentd, Some("m")), Ok(None));
    // The built-in one, as before descriptors existed.
    fs::write(&agentd, "").expect("agentd");
    let b = choose(&desc, &agentd, Some("claude-x"))
        .expect("ok")
        .expect("built-in");
    assert_eq!(b.name, "clawos-agentd");
    assert_eq!(b.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        b.argv,
        [agentd.to_string_lossy().as_ref(), "--model", "claude-x"]
    );
    assert_eq!(b.home, "/workspace");
    assert_eq!(b.gateway_token_env, None);
    assert_eq!(b.ready_timeout_secs, 120);
    let b = choose(&desc, &agentd, None).expect("ok").expect("built-in");
    assert_eq!(b.argv, [agentd.to_string_lossy().as_ref()]);
    // A descriptor wins over the built-in runtime.
    fs::write(&desc, serde_json::to_vec(&openclaw()).expect("json")).expect("write");
    assert_eq!(choose(&desc, &agentd, None), Ok(Some(openclaw())));
}

#[test]
fn a_bad_descriptor_is_refused_with_the_problem_named() {
    let d = tempfile::tempdir().expect("tmp");
    let desc = d.path().join("runtime.json");
    let agentd = d.path().join("clawos-agentd");
    fs::write(&agentd, "").expect("agentd");
    let mut bad = openclaw();
    bad.home = "/root".into();
    fs::write(&desc, serde_json::to_vec(&bad).expect("json")).expect("write");
    let e = choose(&desc, &agentd, None).expect_err("refused");
    assert!(e.contains("home") && e.contains("runtime.json"), "{e}");
    let mut bad = openclaw();
    bad.ready_timeout_secs = 0;
    fs::write(&desc, serde_json::to_vec(&bad).expect("json")).expect("write");
    let e = choose(&desc, &agentd, None).expect_err("refused");
    assert!(e.contains("ready_timeout_secs"), "{e}");
    // Not JSON, and an unknown field: refused too, never the built-in instead.
    fs::write(&desc, "{").expect("write");
    assert!(choose(&desc, &agentd, None).is_err());
    let mut v = serde_json::to_value(openclaw()).expect("json");
    v["run_as_root"] = true.into();
    fs::write(&desc, v.to_string()).expect("write");
    let e = choose(&desc, &agentd, None).expect_err("refused");
    assert!(e.contains("run_as_root"), "{e}");
}

#[test]
fn the_runtime_gets_exactly_the_environment_its_descriptor_gives() {
    let d = tempfile::tempdir().expect("tmp");
    let token = new_gateway_token().expect("token");
    let spec = RuntimeSpec::from_descriptor(&openclaw(), Some("claude-x"), Some(&token), None);
    assert_eq!(spec.bin, Path::new("/opt/node/bin/node"));
    assert_eq!(
        spec.args[0],
        "/opt/openclaw/node_modules/openclaw/openclaw.mjs"
    );
    assert_eq!((spec.uid, spec.gid), (AGENT_UID, AGENT_GID));
    assert_eq!(spec.workdir, Path::new("/workspace"));
    assert!(
        !format!("{spec:?}").contains(&token),
        "Debug never shows the token"
    );
    let env = environment_of(&spec, d.path(), "env1");
    let get = |k: &str| env.get(k).map(String::as_str);
    assert_eq!(get("OPENCLAW_GATEWAY_TOKEN"), Some(token.as_str()));
    assert_eq!(get("CLAWOS_MODEL"), Some("claude-x"));
    assert_eq!(get("HOME"), Some("/workspace/.openclaw/home"));
    assert_eq!(get("USER"), Some("agent"));
    assert_eq!(get("PATH"), Some(RUNTIME_PATH));
    assert_eq!(get("OPENCLAW_STATE_DIR"), Some("/workspace/.openclaw"));
    assert_eq!(
        get("OPENCLAW_CONFIG_PATH"),
        Some("/etc/openclaw/openclaw.json")
    );
    // Nothing else, but what the shell sets itself: none of ours (cargo's, say).
    let ours = [
        "OPENCLAW_GATEWAY_TOKEN",
        "CLAWOS_MODEL",
        "HOME",
        "USER",
        "PATH",
        "OPENCLAW_STATE_DIR",
        "OPENCLAW_CONFIG_PATH",
    ];
    let shells = ["PWD", "OLDPWD", "SHLVL", "_"];
    let extra: Vec<&String> = env
        .keys()
        .filter(|k| !ours.contains(&k.as_str()) && !shells.contains(&k.as_str()))
        .collect();
    assert!(extra.is_empty(), "inherited: {extra:?}");
    // Without the VM's model, the descriptor's default; without a model variable,
    // no model at all.
    let spec = RuntimeSpec::from_descriptor(&openclaw(), None, Some(&token), None);
    let env = environment_of(&spec, d.path(), "env2");
    assert_eq!(
        env.get("CLAWOS_MODEL").map(String::as_str),
        Some("claude-sonnet-4-5")
    );
    let mut quiet = openclaw();
    quiet.model_env = None;
    quiet.gateway_token_env = None;
    let spec = RuntimeSpec::from_descriptor(&quiet, Some("claude-x"), Some(&token), None);
    let env = environment_of(&spec, d.path(), "env3");
    assert!(!env.contains_key("CLAWOS_MODEL"), "{env:?}");
    assert!(!env.values().any(|v| v == &token), "{env:?}");
}

#[test]
fn one_token_per_boot_the_same_at_every_start() {
    let d = tempfile::tempdir().expect("tmp");
    let token = new_gateway_token().expect("token");
    assert_eq!(token.len(), 64);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{token}"
    );
    assert_ne!(token, new_gateway_token().expect("token"), "random");
    // The supervisor starts every run from the one spec made at boot.
    let spec = RuntimeSpec::from_descriptor(&openclaw(), None, Some(&token), None);
    let first = environment_of(&spec, d.path(), "start1");
    let second = environment_of(&spec, d.path(), "start2");
    assert_eq!(
        first.get("OPENCLAW_GATEWAY_TOKEN"),
        Some(&token),
        "first start"
    );
    assert_eq!(
        second.get("OPENCLAW_GATEWAY_TOKEN"),
        Some(&token),
        "a restart"
    );
    // Kept root-only for diagnosis, also over a file that was there before.
    let path = d.path().join("run/clawos/gateway.token");
    fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    fs::write(&path, "old token, too long to stay\n").expect("old");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    write_gateway_token(&path, &token).expect("write");
    assert_eq!(
        fs::read_to_string(&path).expect("read"),
        format!("{token}\n")
    );
    let mode = fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never through a symlink.
    let link = d.path().join("link.token");
    std::os::unix::fs::symlink(d.path().join("elsewhere"), &link).expect("symlink");
    assert!(write_gateway_token(&link, &token).is_err());
    assert!(!d.path().join("elsewhere").exists());
}

#[test]
fn both_output_streams_reach_the_console_prefixed() {
    let d = tempfile::tempdir().expect("tmp");
    let spec = RuntimeSpec {
        name: "openclaw".into(),
        version: "1".into(),
        bin: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "echo out; echo err >&2; printf 'no newline \\377'".into(),
        ],
        env: vec![],
        cgroup: None,
        uid: uid(),
        gid: gid(),
        workdir: d.path().to_owned(),
    };
    let mut child = spawn(&spec).expect("spawn");
    let console = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let threads: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let to = Shared(std::sync::Arc::clone(&console));
        std::thread::spawn(move || prefix_lines(pipe, "openclaw", to))
    })
    .collect();
    assert_eq!(threads.len(), 2);
    assert!(child.wait().expect("wait").success());
    for t in threads {
        t.join().expect("join");
    }
    let text = String::from_utf8(console.lock().expect("lock").clone()).expect("utf-8");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "openclaw: err",
            "openclaw: no newline \u{fffd}",
            "openclaw: out"
        ]
    );
}

#[test]
fn long_lines_are_cut_and_a_dead_console_does_not_stop_the_reading() {
    let mut input = vec![b'x'; MAX_LINE * 3];
    input.extend_from_slice(b"\r\nnext\n");
    let mut out = Vec::new();
    prefix_lines(&input[..], "rt", &mut out);
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{}", text.len());
    assert_eq!(lines[0], format!("rt: {} [cut]", "x".repeat(MAX_LINE)));
    assert_eq!(lines[1], "rt: next");
    // A writer that always fails: the whole input is still read.
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("console gone"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut r = &input[..];
    prefix_lines(&mut r, "rt", Broken);
    assert!(r.is_empty());
}

#[test]
fn the_runtimes_directories_are_made_and_given_to_the_agent_never_through_a_symlink() {
    // As root (the guest agent) they go to uid 1000; otherwise to ourselves.
    let (u, g) = if uid() == 0 {
        (AGENT_UID, AGENT_GID)
    } else {
        (uid(), gid())
    };
    let d = tempfile::tempdir().expect("tmp");
    let ws = Workspace::open(d.path()).expect("ws");
    let mut desc = openclaw();
    desc.workspace_dirs = vec![".openclaw".into(), "state/deep".into()];
    // One level made earlier by root (an `exec`, say): given away too.
    fs::create_dir(d.path().join("state")).expect("mkdir");
    prepare_runtime_dirs(&ws, &desc, u, g).expect("prepare");
    use std::os::unix::fs::MetadataExt;
    for p in [
        ".",
        ".clawos/sessions",
        ".openclaw",
        ".openclaw/home",
        "state",
        "state/deep",
    ] {
        let m = fs::symlink_metadata(d.path().join(p)).expect(p);
        assert!(m.is_dir(), "{p}");
        assert_eq!((m.uid(), m.gid()), (u, g), "{p}");
    }
    // The built-in runtime: HOME is the workspace itself.
    prepare_runtime_dirs(&ws, &builtin(Path::new(AGENTD_BIN), None), u, g).expect("built-in");
    // The agent replaced its state directory with a symlink out: refused, nothing
    // made or given away outside.
    let outside = tempfile::tempdir().expect("tmp");
    fs::remove_dir_all(d.path().join(".openclaw")).expect("rm");
    std::os::unix::fs::symlink(outside.path(), d.path().join(".openclaw")).expect("symlink");
    let before = fs::metadata(outside.path()).expect("meta");
    assert!(prepare_runtime_dirs(&ws, &desc, u, g).is_err());
    assert!(!outside.path().join("home").exists());
    let after = fs::metadata(outside.path()).expect("meta");
    assert_eq!((before.uid(), before.gid()), (after.uid(), after.gid()));
    // A symlink inside the workspace is not followed either.
    fs::remove_file(d.path().join(".openclaw")).expect("rm");
    fs::create_dir(d.path().join("root-owned")).expect("mkdir");
    std::os::unix::fs::symlink("root-owned", d.path().join(".openclaw")).expect("symlink");
    assert!(prepare_runtime_dirs(&ws, &desc, u, g).is_err());
    assert!(!d.path().join("root-owned/home").exists());
}

#[test]
fn the_status_reports_the_runtime_or_none() {
    let mut s = RuntimeStatus::new(&openclaw(), Some("ab".repeat(32)));
    s.healthy = || true;
    assert!(!format!("{s:?}").contains(&"ab".repeat(32)));
    let info = RuntimeStatus::report(Some(&s));
    assert_eq!(info.name, "openclaw");
    assert_eq!(info.version, "2026.9.6");
    assert!(info.healthy);
    assert_eq!(info.gateway_token, Some("ab".repeat(32)));
    let none = RuntimeStatus::report(None);
    assert_eq!(
        (none.name.as_str(), none.version.as_str(), none.healthy),
        ("none", "", false)
    );
    assert_eq!(none.gateway_token, None);
}

#[test]
fn a_runtime_that_cannot_join_its_cgroup_does_not_start() {
    let d = tempfile::tempdir().expect("tmp");
    let spec = RuntimeSpec {
        bin: "/bin/true".into(),
        cgroup: Some(d.path().join("no-such-cgroup")),
        uid: uid(),
        gid: gid(),
        workdir: d.path().to_owned(),
        ..RuntimeSpec::from_descriptor(&openclaw(), None, None, None)
    };
    assert!(spawn(&spec).is_err());
}

#[test]
fn the_runtime_runs_without_new_privileges() {
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("status");
    let spec = RuntimeSpec {
        bin: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!("grep NoNewPrivs /proc/self/status > {}", out.display()),
        ],
        uid: uid(),
        gid: gid(),
        workdir: d.path().to_owned(),
        ..RuntimeSpec::from_descriptor(&openclaw(), None, None, None)
    };
    let status = spawn(&spec).expect("spawn").wait().expect("wait");
    assert!(status.success());
    let text = fs::read_to_string(&out).expect("status");
    assert!(text.contains('1'), "{text}");
}
