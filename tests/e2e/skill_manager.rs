//! skill-manager as agents and operators meet it: the real daemon beside a real
//! identity-manager, bundles signed with the image key chain installed through the
//! typed client, and agents speaking MCP through the official Python SDK with the
//! JWTs identity-manager issued them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clawos_e2e::skills::component;
use clawos_e2e::{KillOnDrop, port, spawn_daemon};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};
use clawos_skill_manager_api::{CallSkill, ClientError, InstallSkill, SkillsClient};
use serde_json::Value;

const MANIFEST: &str = r#"name = "echo"
version = "1.0.0"
description = "Echoes its input back."

[input_schema]
type = "object"
properties.q.type = "integer"

[config]
greeting = "hi"
"#;

fn bundle(
    dir: &Path,
    manifest: &str,
    wasm: &[u8],
    key: Option<&ed25519_dalek::SigningKey>,
) -> InstallSkill {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("skill.toml"), manifest).expect("manifest");
    std::fs::write(dir.join("skill.wasm"), wasm).expect("wasm");
    if let Some(k) = key {
        clawos_skill_manager::bundle::sign(dir, k).expect("sign");
    }
    InstallSkill {
        manifest: manifest.to_owned(),
        component_base64: base64::engine::general_purpose::STANDARD.encode(wasm),
        instructions: None,
        signature: std::fs::read_to_string(dir.join("skill.sig")).ok(),
        config: Default::default(),
    }
}

fn mcp(url: &str, token: &str, call: Option<(&str, &str)>) -> Value {
    mcp_times(url, token, call, 1)
}

/// The agent's MCP session through the Python SDK, calling `call` `times` times.
fn mcp_times(url: &str, token: &str, call: Option<(&str, &str)>, times: u32) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/mcp_skills_check.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(url).arg(token);
    if let Some((tool, args)) = call {
        cmd.arg(tool).arg(args).arg(times.to_string());
    }
    let o = cmd.output().expect("python3");
    assert!(
        o.status.success(),
        "the MCP client failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("client output")
}

#[test]
fn agents_see_and_call_only_their_skills_over_mcp_and_every_call_is_audited() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let (_identity, issuer) =
        clawos_e2e::start_identity_manager(&state, &work.path().join("identity.log"))
            .expect("identity-manager");
    let key_path = work.path().join("signing.key");
    let key = clawos_image::keys::generate(&key_path).expect("key");
    let pubkey = clawos_image::keys::public_hex(&key);
    // Two calls a minute per agent: a GCRA interval of 30 s, so no machine is slow
    // enough to let a third through within this test.
    let skills = clawos_e2e::skills::start_skill_manager(
        &state,
        &issuer,
        &["--signing-pubkey", &pubkey, "--agent-calls-per-minute", "2"],
        &work.path().join("skills.log"),
    );
    let url = skills.url.clone();
    let token = clawos_skill_manager_api::local_token(&state).expect("operator token");
    let client = SkillsClient::new(&url, &token);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let wasm = component("echo", "skill");

    // Unsigned, tampered, another key: refused with why, nothing installed.
    let unsigned = bundle(&work.path().join("unsigned"), MANIFEST, &wasm, None);
    let e = rt
        .block_on(client.install(&unsigned))
        .expect_err("unsigned");
    assert!(e.to_string().contains("skill.sig is missing"), "{e}");
    let mut tampered = bundle(&work.path().join("tampered"), MANIFEST, &wasm, Some(&key));
    tampered.manifest = MANIFEST.replace("Echoes", "Steals");
    let e = rt
        .block_on(client.install(&tampered))
        .expect_err("tampered");
    assert!(e.to_string().contains("bad signature"), "{e}");
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let foreign = bundle(&work.path().join("foreign"), MANIFEST, &wasm, Some(&other));
    let e = rt
        .block_on(client.install(&foreign))
        .expect_err("other key");
    assert!(e.to_string().contains("bad signature"), "{e}");
    assert!(rt.block_on(client.list()).expect("list").is_empty());

    // Signed: installed once; the same name again is a conflict.
    let good = bundle(&work.path().join("good"), MANIFEST, &wasm, Some(&key));
    let info = rt.block_on(client.install(&good)).expect("install");
    assert!(info.signed);
    assert_eq!(info.config["greeting"], "hi");
    match rt.block_on(client.install(&good)) {
        Err(ClientError::Api { status: 409, .. }) => {}
        other => panic!("expected 409: {other:?}"),
    }
    rt.block_on(client.enable("echo", "agent-a"))
        .expect("enable");

    // Agents: a's token lists and calls echo; b's sees nothing and cannot call it.
    let identity = IdentityClient::with_service_token(
        &issuer,
        std::fs::read_to_string(state.join("identity/service.token"))
            .expect("service token")
            .trim(),
    );
    let issue = |agent: &str| {
        rt.block_on(identity.issue(&IssueRequest {
            agent: agent.into(),
            vm_id: format!("vm-{agent}"),
            image_root_hash: String::new(),
            audience: "skill-manager".into(),
            ttl_secs: None,
            scopes: vec![],
        }))
        .expect("issue")
        .token
    };
    let (a, b) = (issue("agent-a"), issue("agent-b"));
    let mcp_url = format!("{url}/mcp");
    // Three calls in one session: at 2 a minute the third is the tool's error telling
    // the model to wait (not a protocol error).
    let seen = mcp_times(&mcp_url, &a, Some(("echo", r#"{"q": 7}"#)), 3);
    assert_eq!(seen["server"], "clawos-skill-manager", "{seen}");
    assert_eq!(seen["tools"][0]["name"], "echo", "{seen}");
    assert_eq!(seen["tools"][0]["description"], "Echoes its input back.");
    assert_eq!(
        seen["tools"][0]["schema"]["properties"]["q"]["type"],
        "integer"
    );
    assert_eq!(seen["call"]["is_error"], false, "{seen}");
    assert_eq!(seen["call"]["text"][0], r#"hi:{"q":7}"#, "{seen}");
    let unseen = mcp(&mcp_url, &b, Some(("echo", r#"{"q": 1}"#)));
    assert_eq!(unseen["tools"], serde_json::json!([]), "{unseen}");
    assert!(unseen["call"]["rpc_error"].as_str().is_some(), "{unseen}");

    // A token for another service, no token, a browser: refused.
    let wrong_aud = rt
        .block_on(identity.issue(&IssueRequest {
            agent: "agent-a".into(),
            vm_id: "vm-agent-a".into(),
            image_root_hash: String::new(),
            audience: "inference-proxy".into(),
            ttl_secs: None,
            scopes: vec![],
        }))
        .expect("issue")
        .token;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let post = |token: Option<&str>, origin: Option<&str>| -> u16 {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args(["-H", "content-type: application/json"])
            .args(["-H", "accept: application/json, text/event-stream"])
            .args(["--data", init]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("authorization: Bearer {t}")]);
        }
        if let Some(o) = origin {
            cmd.args(["-H", &format!("origin: {o}")]);
        }
        let o = cmd.arg(&mcp_url).output().expect("curl");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("status")
    };
    assert_eq!(post(None, None), 401);
    assert_eq!(post(Some(&wrong_aud), None), 401);
    assert_eq!(post(Some("not-a-jwt"), None), 401);
    assert_eq!(post(Some(&a), Some("http://evil.example")), 403);
    assert_eq!(post(Some(&a), None), 200);

    assert_eq!(seen["calls"][1]["is_error"], false, "{seen}");
    assert_eq!(seen["calls"][2]["is_error"], true, "{seen}");
    let told = seen["calls"][2]["text"][0].as_str().unwrap_or("");
    assert!(
        told.contains("has made its 2 skill calls for this minute: try again in"),
        "{seen}"
    );
    let metrics = Command::new("curl")
        .args(["-s", &format!("{url}/metrics")])
        .output()
        .expect("curl");
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for line in [
        "clawos_skill_calls_answered_total 2",
        "clawos_skill_calls_refused_total 1",
        "clawos_skill_calls_running 0",
        "clawos_skills_installed 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    // Disabled: invisible to a again.
    rt.block_on(client.disable("echo", "agent-a"))
        .expect("disable");
    let after = mcp(&mcp_url, &a, None);
    assert_eq!(after["tools"], serde_json::json!([]), "{after}");

    // The operator's test call, and the audit trail: each call, who made it.
    let r = rt
        .block_on(client.call(
            "echo",
            &CallSkill {
                input: serde_json::json!({"q": 2}),
            },
        ))
        .expect("operator call");
    assert_eq!(r.output.as_deref(), Some(r#"hi:{"q":2}"#));
    let audit = std::fs::read_to_string(state.join("skills/audit.jsonl")).expect("audit");
    let records: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(records.len(), 4, "{audit}");
    assert_eq!(records[0]["agent"], "agent-a");
    assert_eq!(records[0]["vm_id"], "vm-agent-a");
    assert_eq!(records[0]["skill"], "echo");
    assert_eq!(records[0]["ok"], true);
    assert_eq!(records[1]["ok"], true);
    assert_eq!(records[2]["refused"], "rate limit", "{audit}");
    assert_eq!(records[2]["agent"], "agent-a");
    assert_eq!(records[3]["caller"], "operator");
    // Credentials stay out of the trail and the log.
    let log = std::fs::read_to_string(work.path().join("skills.log")).expect("log");
    for secret in [&a, &b, &token] {
        assert!(!audit.contains(secret.as_str()) && !log.contains(secret.as_str()));
    }

    // The same through the CLI.
    let clawos = |args: &[&str]| {
        Command::new(clawos_e2e::bin("clawos"))
            .args(args)
            .env("CLAWOS_STATE_DIR", &state)
            .env("CLAWOS_SKILLS_URL", &url)
            .env_remove("CLAWOS_SKILLS_TOKEN_PATH")
            .output()
            .expect("clawos")
    };
    let o = clawos(&["skill", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(listed[0]["name"], "echo");
    assert_eq!(listed[0]["agents"], serde_json::json!([]));
    let o = clawos(&["skill", "call", "echo", "--input", r#"{"q":3}"#]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), r#"hi:{"q":3}"#);
    // `clawos skill sign` with the state's signing key, then install: accepted.
    let cli_dir = work.path().join("cli-signed");
    bundle(
        &cli_dir,
        &MANIFEST.replace("\"echo\"", "\"echo2\""),
        &wasm,
        None,
    );
    std::fs::copy(&key_path, state.join("signing.key")).expect("key");
    let o = clawos(&["skill", "sign", cli_dir.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Packed into one file (named after the skill, here), installed from the file.
    let o = Command::new(clawos_e2e::bin("clawos"))
        .args(["skill", "pack", cli_dir.to_str().expect("utf-8")])
        .current_dir(work.path())
        .output()
        .expect("clawos");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let packed = work.path().join("echo2-1.0.0.skill");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("into echo2-1.0.0.skill"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = clawos(&["skill", "install", packed.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("installed echo2 1.0.0 (signed"));
    // A packed file with something else in it: refused before anything is sent.
    let stray = work.path().join("stray.skill");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&cli_dir)
        .arg("-cf")
        .arg(&stray)
        .args(["skill.toml", "skill.wasm", "skill.sig"])
        .arg("-C")
        .arg(work.path())
        .arg("signing.key")
        .status()
        .expect("tar");
    assert!(st.success());
    let o = clawos(&["skill", "install", stray.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("holds \"signing.key\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = clawos(&["skill", "rm", "no-such-skill"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let unsigned_dir = work.path().join("unsigned");
    let o = clawos(&["skill", "install", unsigned_dir.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("skill.sig is missing"));

    // Removed: gone for everyone.
    rt.block_on(client.remove("echo")).expect("remove");
    let left: Vec<String> = rt
        .block_on(client.list())
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(left, ["echo2"]);
}

#[test]
fn a_skill_installed_unsigned_is_not_loaded_once_a_key_is_configured() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let state_s = state.to_str().expect("utf-8").to_owned();
    let start = |key: Option<&str>| {
        let p = port();
        let mut args = vec![
            "--addr".to_owned(),
            format!("127.0.0.1:{p}"),
            "--state-dir".into(),
            state_s.clone(),
            // Never asked here: no agent calls in this test.
            "--issuer".into(),
            "http://127.0.0.1:9".into(),
        ];
        if let Some(k) = key {
            args.extend(["--signing-pubkey".into(), k.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = spawn_daemon(
            "skill-manager",
            &args,
            &[],
            &work.path().join("skills.log"),
            p,
        )
        .expect("skill-manager");
        (KillOnDrop(child), format!("http://127.0.0.1:{p}"))
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let wasm = component("echo", "skill");
    {
        let (_d, url) = start(None);
        let token = clawos_skill_manager_api::local_token(&state).expect("token");
        let c = SkillsClient::new(&url, &token);
        let info = rt
            .block_on(c.install(&bundle(&work.path().join("b"), MANIFEST, &wasm, None)))
            .expect("unsigned install without a key");
        assert!(!info.signed);
    }
    let key = clawos_image::keys::generate(&work.path().join("k")).expect("key");
    let (_d, url) = start(Some(&clawos_image::keys::public_hex(&key)));
    let token = clawos_skill_manager_api::local_token(&state).expect("token");
    let listed = rt
        .block_on(SkillsClient::new(&url, &token).list())
        .expect("list");
    assert!(
        listed.is_empty(),
        "an unsigned skill was loaded: {listed:?}"
    );
    let log = std::fs::read_to_string(work.path().join("skills.log")).expect("log");
    assert!(log.contains("installed unsigned"), "{log}");
}

/// The host's own limits on one agent, in process (so the test can hold a call open
/// and give it up at exactly the point it means to): a second call while the first
/// runs is refused (in flight: 1), calls past the minute's allowance are refused (2 a
/// minute: the interval is 30 s, so the machine's speed cannot let a third through),
/// another agent is not affected, and a call dropped mid-run is audited as aborted.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_past_its_limits_is_refused_and_a_call_given_up_is_audited() {
    use clawos_skill_manager::host::{AgentLimits, Caller, HostError, SkillHost};
    use clawos_skill_manager::outbound::Outbound;
    use clawos_skill_manager::runtime::SkillRuntime;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let work = tempfile::tempdir().expect("tempdir");
    let runtime = SkillRuntime::new(
        Some(&work.path().join("compiled")),
        Outbound::new(&Default::default()).expect("outbound"),
    )
    .expect("runtime");
    let host = Arc::new(
        SkillHost::open(
            work.path(),
            runtime,
            None,
            Default::default(),
            AgentLimits {
                calls_per_minute: 2,
                in_flight: 1,
                // Past the first, a refusal is only counted (the window is the test).
                refusals_recorded_every: Duration::from_secs(3600),
            },
        )
        .expect("host"),
    );
    let spin_manifest = MANIFEST
        .replace("\"echo\"", "\"spin\"")
        .replace("Echoes its input back.", "Spins.")
        + "\n[limits]\ntimeout_ms = 60000\n";
    for (manifest, wasm) in [
        (MANIFEST.to_owned(), component("echo", "skill")),
        (spin_manifest, component("spin", "skill")),
    ] {
        let req = bundle(&work.path().join("b"), &manifest, &wasm, None);
        host.install(req).await.expect("install");
    }
    for (skill, agent) in [("echo", "a"), ("spin", "a"), ("echo", "b")] {
        host.enable(skill, agent).expect("enable");
    }
    let agent = |name: &str| Caller::Agent {
        agent: name.into(),
        vm_id: format!("vm-{name}"),
    };
    let input = serde_json::json!({"q": 1});

    // a's spin runs; a second call of a's is refused while it does.
    let spinning = {
        let (host, caller, input) = (Arc::clone(&host), agent("a"), input.clone());
        tokio::spawn(async move { host.call("spin", &caller, &input).await })
    };
    let waited = Instant::now();
    while host.counts().running.load(Ordering::Relaxed) < 1 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "spin never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match host.call("echo", &agent("a"), &input).await {
        Err(HostError::Busy { max: 1, .. }) => {}
        other => panic!("expected a refusal for calls in flight: {other:?}"),
    }
    // Given up: the sandbox stops, the place is free again, the record says aborted.
    spinning.abort();
    assert!(spinning.await.expect_err("aborted").is_cancelled());
    assert_eq!(host.counts().running.load(Ordering::Relaxed), 0);
    assert_eq!(host.counts().aborted.load(Ordering::Relaxed), 1);

    // The minute's second call (the spin was the first; the busy refusal was not
    // counted) is answered, the third refused with when to try again.
    let r = host
        .call("echo", &agent("a"), &input)
        .await
        .expect("second");
    assert_eq!(r.output.as_deref(), Some(r#"hi:{"q":1}"#));
    match host.call("echo", &agent("a"), &input).await {
        Err(e @ HostError::RateLimited { per_minute: 2, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("\"a\" has made its 2 skill calls for this minute: try again in "),
                "{msg}"
            );
        }
        other => panic!("expected a rate-limit refusal: {other:?}"),
    }
    // More refusals at once: counted, not each written (the first was).
    for _ in 0..3 {
        assert!(matches!(
            host.call("echo", &agent("a"), &input).await,
            Err(HostError::RateLimited { .. })
        ));
    }
    assert_eq!(host.counts().refused.load(Ordering::Relaxed), 5);
    // b has its own allowance; the operator has none to use up.
    assert!(host.call("echo", &agent("b"), &input).await.is_ok());
    for _ in 0..3 {
        assert!(host.call("echo", &Caller::Operator, &input).await.is_ok());
    }

    let audit = std::fs::read_to_string(work.path().join("audit.jsonl")).expect("audit");
    let records: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let summary: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            let how = if r["refused"].is_string() {
                format!("refused: {}", r["refused"].as_str().unwrap_or(""))
            } else if r["aborted"] == true {
                "aborted".into()
            } else {
                format!("ok={}", r["ok"])
            };
            (
                r["skill"].as_str().unwrap_or("").into(),
                r["agent"].as_str().unwrap_or("-").into(),
                how,
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        summary,
        [
            s("echo", "a", "refused: in flight"),
            s("spin", "a", "aborted"),
            s("echo", "a", "ok=true"),
            s("echo", "a", "refused: rate limit"),
            s("echo", "b", "ok=true"),
            s("echo", "-", "ok=true"),
            s("echo", "-", "ok=true"),
            s("echo", "-", "ok=true"),
        ],
        "{audit}"
    );
    assert_eq!(records[1]["vm_id"], "vm-a");
    assert!(records[1]["duration_ms"].as_u64().is_some(), "{audit}");
}
