//! A skill used from inside a real VM: the built-in agent runtime asks the host's
//! skill-manager for its tools over MCP (guest `127.0.0.1:2083` → vsock → the
//! launcher's relay, which attaches a token of the VM's own for skill-manager), the
//! model calls `web-search`, the real web-search component queries the project's
//! stand-in SearXNG (`clawos-search-standin`) on loopback, and the results come back to
//! the model. monitor-daemon follows skill-manager's record of the call into the
//! host's audit trail, where `clawos audit tail` shows it. Every part is the real one
//! but the model (scripted) and the search backend (the stand-in).

use clawos_e2e::skills::{search_backend, web_search_bundle};
use clawos_e2e::stack::{HostServices, ScriptedModel};
use clawos_e2e::{
    Launcher, can_boot_vms, can_run_monitor, can_use_vsock, port, show, start_monitor,
};
use clawos_skill_manager_api::SkillsClient;
use serde_json::{Value, json};

/// The title of the stand-in's page about ClawOS (its built-in corpus).
const TITLE: &str = "ClawOS: autonomous AI agents in hardened microVMs";
const ANSWER: &str = "Found it: ClawOS runs agents in microVMs.";

#[test]
fn an_agent_in_a_vm_searches_the_web_through_its_skill() {
    let name = "an_agent_in_a_vm_searches_the_web_through_its_skill";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    // The host's audit trail, where the call must land too (when eBPF can run here).
    let monitor_port = port();
    let _monitor = can_run_monitor(name)
        .then(|| start_monitor(&state, monitor_port, "monitor.log").expect("monitor-daemon"));

    let model = ScriptedModel::start(
        work.path(),
        "searcher",
        &json!({"turns": [
            {"tool_use": [{"name": "web-search", "input": {"query": "what is clawos", "count": 2}}]},
            {"text": ANSWER, "expect_tool_result": true}
        ]}),
    )
    .expect("model");
    let host = HostServices::start(&state, &[("anthropic", &["claude-*"], &model.url)], &[])
        .expect("identity-manager and inference-proxy");
    let (search_port, _search) = search_backend();
    let key_path = work.path().join("signing.key");
    let key = clawos_image::keys::generate(&key_path).expect("key");
    let pubkey = clawos_image::keys::public_hex(&key);
    let skills = clawos_e2e::skills::start_skill_manager(
        &state,
        &host.identity_url,
        &[
            "--signing-pubkey",
            &pubkey,
            "--resolve",
            "search.local=127.0.0.1",
        ],
        &work.path().join("skills.log"),
    );
    let skills_url = skills.url.clone();
    let client = SkillsClient::new(
        &skills_url,
        &clawos_skill_manager_api::local_token(&state).expect("operator token"),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(client.install(&web_search_bundle(
        &work.path().join("ws"),
        search_port,
        &key,
    )))
    .expect("install web-search");

    let l = Launcher::start_with(
        &state,
        &[
            ("CLAWOS_INFERENCE_PROXY_URL", host.proxy_url.as_str()),
            ("CLAWOS_IDENTITY_URL", host.identity_url.as_str()),
            ("CLAWOS_SKILLS_URL", skills_url.as_str()),
        ],
    )
    .expect("launcher");
    let o = l.clawos(&[
        "vm",
        "start",
        "seeker",
        "--model",
        "claude-sonnet-4-5",
        "--mem",
        "384",
    ]);
    assert!(o.status.success(), "{}\n{}", show(&o), l.log());

    // Not enabled for this agent yet: the model is offered no such tool.
    let ask = || {
        l.clawos(&[
            "agent",
            "run",
            "seeker",
            "--message",
            "What is ClawOS? Search the web.",
            "--json",
        ])
    };
    let o = ask();
    assert!(o.status.success(), "{}\nlauncher: {}", show(&o), l.log());
    let first = model.requests();
    assert!(
        !first.is_empty(),
        "the task reached the model: {}",
        show(&o)
    );
    // The runtime did ask skill-manager (an empty list, not an unreachable server).
    let console = std::fs::read_to_string(state.join("vms/seeker/console.log")).unwrap_or_default();
    assert!(
        !console.contains("skills unavailable"),
        "the MCP server answered the runtime: {console}"
    );
    assert!(
        first[0]["tools"]
            .as_array()
            .is_some_and(|t| !t.iter().any(|n| n == "web-search")),
        "a skill not enabled for the agent is invisible to it: {first:?}\n{}",
        show(&o)
    );

    // Enabled: the model sees it, calls it, and gets the stand-in's results.
    rt.block_on(client.enable("web-search", "seeker"))
        .expect("enable");
    let o = ask();
    assert!(o.status.success(), "{}\nlauncher: {}", show(&o), l.log());
    let outcome: Value = serde_json::from_slice(&o.stdout).expect("agent run --json");
    assert_eq!(outcome["answer"], ANSWER, "{outcome}");
    assert_eq!(outcome["tool_calls"][0]["name"], "web-search", "{outcome}");
    assert_eq!(
        outcome["tool_calls"][0]["ok"],
        true,
        "{outcome}\n{}\nskill-manager: {}",
        clawos_e2e::deadline::state_logs(&state),
        std::fs::read_to_string(work.path().join("skills.log")).unwrap_or_default()
    );
    let seen = model.requests();
    let offered = &seen[seen.len() - 2]["tools"];
    assert!(
        offered
            .as_array()
            .is_some_and(|t| t.iter().any(|n| n == "web-search")),
        "{offered}"
    );
    let back = seen.last().expect("second call")["tool_results"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        back.contains(TITLE),
        "the results reached the model: {back:?}"
    );
    assert!(back.contains("https://clawos.example/"), "{back:?}");
    assert!(
        !back.contains("wasmtime.dev"),
        "only what matched the query: {back:?}"
    );
    // The audit trail names the VM's agent and its boot, as its token said.
    let audit = std::fs::read_to_string(state.join("skills/audit.jsonl")).expect("audit");
    let record: Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["skill"] == "web-search")
        .unwrap_or_else(|| panic!("no web-search record: {audit}"));
    assert_eq!(record["agent"], "seeker", "{record}");
    assert!(
        record["vm_id"]
            .as_str()
            .is_some_and(|v| v.starts_with("seeker-")),
        "{record}"
    );
    assert_eq!(record["ok"], true, "{record}");
    if _monitor.is_some() {
        // The same call in the host's trail, as an operator reads it.
        let tail = || {
            let o = std::process::Command::new(clawos_e2e::bin("clawos"))
                .args([
                    "--json", "audit", "tail", "--agent", "seeker", "--limit", "10000",
                ])
                .env("CLAWOS_STATE_DIR", &state)
                .env(
                    "CLAWOS_MONITOR_URL",
                    format!("http://127.0.0.1:{monitor_port}"),
                )
                .output()
                .expect("clawos audit tail");
            assert!(o.status.success(), "{}", show(&o));
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|e| e["kind"] == "skill_call")
                .collect::<Vec<_>>()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut calls = tail();
        while calls.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
            calls = tail();
        }
        let call = calls
            .iter()
            .find(|e| e["skill_call"]["skill"] == "web-search")
            .unwrap_or_else(|| panic!("no web-search call in the host's trail: {calls:?}"));
        assert_eq!(call["skill_call"]["outcome"], "answered", "{call}");
        assert_eq!(call["skill_call"]["vm_id"], record["vm_id"], "{call}");
        let request = &call["skill_call"]["requests"][0];
        assert_eq!(request["allowed"], true, "{call}");
        assert!(
            request["destination"]
                .as_str()
                .is_some_and(|d| d.ends_with(&format!(":{search_port}"))),
            "{call}"
        );
    }

    // From inside the VM, a forged credential changes nothing: the relay replaces it
    // with the VM's own token (the forged one alone would be refused 401), so the
    // guest's own MCP request is answered.
    let o = l.clawos(&[
        "vm",
        "exec",
        "seeker",
        "--",
        "sh",
        "-c",
        "wget -q -O- --header 'authorization: Bearer forged' --header 'content-type: application/json' \
         --header 'accept: application/json, text/event-stream' \
         --post-data '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-06-18\",\"capabilities\":{},\"clientInfo\":{\"name\":\"x\",\"version\":\"1\"}}}' \
         http://127.0.0.1:2083/mcp; echo rc=$?",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("clawos-skill-manager"), "{}", show(&o));

    let o = l.clawos(&["vm", "stop", "seeker"]);
    assert!(o.status.success(), "{}", show(&o));
}
