//! inference-proxy end to end: identity-manager JWTs, the official anthropic SDK, a
//! local upstream speaking the real wire format, the ledger and the audit trail.

use std::process::Command;
use std::time::Duration;

use clawos_e2e::fake_llm::FakeAnthropic;
use clawos_e2e::{port, runtime, spawn_daemon};
use clawos_identity_manager_api::{IdentityClient, IssueRequest, RevokeRequest};
use clawos_inference_proxy_api::{ProxyAdminClient, UsageQuery};
use serde_json::{Value, json};

const HOST_KEY: &str = "sk-ant-host-only-7f3a9c";
const OPENAI_HOST_KEY: &str = "sk-openai-host-only-51c2";

fn has_sdk() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import anthropic"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        clawos_e2e::skip(
            "proxy",
            "python3 anthropic/openai SDKs missing (scripts/setup.sh installs it)",
        );
    }
    ok
}

#[test]
fn anthropic_sdk_through_the_proxy_with_limits_ledger_and_audit() {
    if !has_sdk() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let px_port = port();
    let state_s = state.to_str().expect("utf8");
    let (identity, issuer) =
        clawos_e2e::start_identity_manager(&state, &work.path().join("identity.log"))
            .expect("identity-manager");
    let upstream = FakeAnthropic::start(HOST_KEY);
    let openai_upstream = FakeAnthropic::start(OPENAI_HOST_KEY);
    let upstreams = work.path().join("upstreams.json");
    std::fs::write(
        &upstreams,
        json!([
            {"name": "anthropic", "api": "anthropic", "base_url": upstream.url, "api_key_env": "ANTHROPIC_API_KEY", "models": ["claude-*", "fail-midstream", "slow-model"]},
            {"name": "local-vllm", "api": "openai", "base_url": openai_upstream.url, "api_key_env": "OPENAI_API_KEY", "models": ["gpt-test", "gpt-*"]},
        ])
        .to_string(),
    )
    .expect("upstreams");
    let mut proxy = spawn_daemon(
        "inference-proxy",
        &[
            "--addr",
            &format!("127.0.0.1:{px_port}"),
            "--state-dir",
            state_s,
        ],
        &[
            ("ANTHROPIC_API_KEY", HOST_KEY),
            ("OPENAI_API_KEY", OPENAI_HOST_KEY),
            ("CLAWOS_PROXY_UPSTREAMS", upstreams.to_str().expect("utf8")),
            ("CLAWOS_IDENTITY_ISSUER", issuer.as_str()),
            ("CLAWOS_PROXY_RATE_LIMIT_RPM", "60"),
            ("CLAWOS_PROXY_UPSTREAM_TIMEOUT_SECS", "2"),
        ],
        &work.path().join("proxy.log"),
        px_port,
    )
    .expect("inference-proxy");
    let svc = std::fs::read_to_string(state.join("identity/service.token"))
        .expect("svc")
        .trim()
        .to_owned();
    let rt = runtime();
    let http = reqwest::Client::new();
    let identity_client = IdentityClient::with_service_token(&issuer, &svc);
    let issue_for = |agent: &str, aud: &str, ttl_secs: Option<u64>| -> String {
        let req = IssueRequest {
            agent: agent.into(),
            vm_id: format!("vm-{agent}"),
            image_root_hash: String::new(),
            audience: aud.into(),
            ttl_secs,
            scopes: vec![],
        };
        rt.block_on(identity_client.issue(&req))
            .expect("issue")
            .token
    };
    let issue = |agent: &str, aud: &str| issue_for(agent, aud, None);
    let proxy_url = format!("http://127.0.0.1:{px_port}");
    let call = |token: &str, body: &str| -> (u16, Option<String>, String) {
        rt.block_on(async {
            let r = http
                .post(format!("{proxy_url}/v1/messages"))
                .header("x-api-key", token)
                .header("content-type", "application/json")
                .body(body.to_owned())
                .send()
                .await
                .expect("send");
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (
                r.status().as_u16(),
                retry,
                r.text().await.unwrap_or_default(),
            )
        })
    };
    let body = r#"{"model":"claude-test-1","max_tokens":8,"messages":[{"role":"user","content":"one two three"}]}"#;

    // The official SDK: create and messages.stream, correct answers and usage.
    let a = issue("agent-a", "inference-proxy");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/anthropic_sdk_check.py");
    let o = Command::new("python3")
        .args([script, &proxy_url, &a])
        .output()
        .expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(r["create_text"], "Hello from fake claude");
    assert_eq!(r["create_usage"], json!([4, 4]));
    assert_eq!(r["stream_text"], "Hello from fake claude");
    assert_eq!(r["stream_usage"], json!([4, 4]));
    assert_eq!(r["bad_token"], 401);

    // The official openai SDK: create, stream with include_usage, models.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/openai_sdk_check.py");
    let o = Command::new("python3")
        .args([script, &proxy_url, &a])
        .output()
        .expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(r["create_text"], "Hello from fake gpt");
    assert_eq!(r["create_usage"], json!([5, 4]));
    assert_eq!(r["stream_text"], "Hello from fake gpt");
    assert_eq!(r["stream_usage"], json!([5, 4]));
    assert_eq!(
        r["plain_chunks_without_choices"], 0,
        "the usage chunk the proxy asked for is hidden"
    );
    assert_eq!(
        r["models"],
        json!(["fail-midstream", "gpt-test", "slow-model"])
    );
    let (_, oa_auths, _) = openai_upstream.seen();
    assert!(
        !oa_auths.is_empty()
            && oa_auths
                .iter()
                .all(|h| h == &format!("Bearer {OPENAI_HOST_KEY}")),
        "{oa_auths:?}"
    );

    // The upstream saw the host's key, never the agent's token.
    let (keys, auths, _) = upstream.seen();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k == HOST_KEY),
        "{keys:?}"
    );
    assert!(
        auths.is_empty(),
        "an Authorization header leaked upstream: {auths:?}"
    );

    // Auth failures are 401; a malformed body is 400.
    let wrong_aud = issue("agent-a", "control-plane");
    for bad in ["", "garbage", wrong_aud.as_str()] {
        assert_eq!(call(bad, body).0, 401, "token {bad:?}");
    }
    let (st, _, text) = call(&a, "{not json");
    assert_eq!(st, 400);
    assert!(
        text.contains("invalid_request_error") && text.contains("malformed JSON"),
        "{text}"
    );

    // The requests-per-minute limit has its own test below
    // (`requests_over_the_rpm_limit_are_refused_however_slow_the_machine`).

    // Expired and revoked tokens: 401. The revocation feed is polled every 5 s: wait
    // for the refusal itself (every answer until then is a 200), not a fixed 5.5 s.
    let short = issue_for("agent-x", "inference-proxy", Some(1));
    let doomed = issue("agent-d", "inference-proxy");
    assert_eq!(call(&doomed, body).0, 200);
    rt.block_on(identity_client.revoke(&RevokeRequest::agent("agent-d")))
        .expect("revoke");
    let refused_in_time = |token: &str, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match call(token, body).0 {
                401 => return,
                200 => {}
                st => panic!("{what}: {st} before the 401"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: still accepted after 20 s"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    refused_in_time(&short, "expired");
    refused_in_time(&doomed, "revoked");

    // A slow upstream: 504 with a clear body, still audited.
    let (st, _, text) = call(
        &a,
        r#"{"model":"claude-slow","max_tokens":8,"messages":[{"role":"user","content":"x"}]}"#
            .replace("claude-slow", "slow-model")
            .as_str(),
    );
    assert_eq!(st, 504, "{text}");
    assert!(text.contains("timeout_error"), "{text}");

    // The upstream dies mid-stream: the client sees an error event, the ledger a row.
    let (st, _, text) = call(
        &a,
        r#"{"model":"fail-midstream","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"x y"}]}"#,
    );
    assert_eq!(st, 200);
    assert!(
        text.contains("event: error") && text.contains("api_error"),
        "{text}"
    );
    assert!(!text.contains("message_stop"));

    // A client that hangs up mid-stream: the proxy reads the upstream to the end, so
    // the row carries the full usage.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", px_port)).expect("connect");
        let b = r#"{"model":"claude-hangup","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"p q r s t"}]}"#;
        write!(c, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {a}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len()).expect("write");
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("event: message_start") {
            let n = c.read(&mut buf).expect("read");
            assert!(n > 0, "stream ended early");
            got.extend_from_slice(&buf[..n]);
        }
        drop(c);
    }
    // The proxy is done with it once its audit line is written (the last thing a
    // request does), so wait for that line rather than a pause.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(state.join("proxy/audit.jsonl"))
        .unwrap_or_default()
        .contains(r#""model":"claude-hangup""#)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the hung-up request was never audited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Ledger and audit: one row and one line per request that reached the upstream.
    let sent = upstream.seen().2 + openai_upstream.seen().2;
    let metrics = rt.block_on(async {
        http.get(format!("{proxy_url}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert_eq!(
        metric("clawos_proxy_requests_total"),
        sent as u64,
        "{metrics}"
    );
    assert_eq!(
        metric("clawos_proxy_rate_limited_total"),
        0,
        "no request here is over RPM 60: {metrics}"
    );
    assert!(metric("clawos_proxy_auth_failures_total") >= 6, "{metrics}");
    let _ = Command::new("kill")
        .args(["-INT", &proxy.id().to_string()])
        .status();
    let _ = proxy.wait();
    let audit = std::fs::read_to_string(state.join("proxy/audit.jsonl")).expect("audit");
    assert_eq!(
        audit.lines().count(),
        sent,
        "audit lines = requests sent upstream"
    );
    assert!(
        !audit.contains(HOST_KEY) && !audit.contains(&a) && !audit.contains("one two three"),
        "audit holds a secret or prompt text"
    );
    let db = rusqlite_rows(&state.join("proxy/ledger.db"));
    assert_eq!(db.0, sent as u64, "ledger rows = requests sent upstream");
    let cut: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|v: &Value| v["model"] == "fail-midstream")
        .collect();
    assert_eq!(cut.len(), 1);
    assert!(
        cut[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("broke")),
        "{}",
        cut[0]
    );
    assert_eq!(
        cut[0]["input_tokens"], 2,
        "usage counted before the cut is kept"
    );
    let all = lines_of(&audit);
    let hung: Vec<&Value> = all
        .iter()
        .filter(|v| v["model"] == "claude-hangup")
        .collect();
    assert_eq!(hung.len(), 1);
    assert_eq!(
        (
            hung[0]["input_tokens"].clone(),
            hung[0]["output_tokens"].clone()
        ),
        (json!(5), json!(4)),
        "{}",
        hung[0]
    );
    assert!(
        hung[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("client disconnected")),
        "{}",
        hung[0]
    );
    drop(identity);
    std::thread::sleep(Duration::from_millis(10));
}

/// The requests-per-minute limit (GCRA) end to end, at RPM 2: one request per 30 s,
/// with a burst of two. Nothing here takes anywhere near 30 s, so no timing can change
/// the answers (at RPM 60 one slow second let a 62nd request through): two at once are
/// let through, the third is refused with a retry-after of at most 30 s, never reaches
/// the upstream, the ledger or the audit trail, and another agent is not held back.
/// The limiter's arithmetic over time is unit-tested with an injected clock
/// (`clawos_inference_proxy::limits`).
#[test]
fn requests_over_the_rpm_limit_are_refused_however_slow_the_machine() {
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let upstream = FakeAnthropic::start(HOST_KEY);
    let tokens = work.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tok-r": "agent-r", "tok-b": "agent-b"}"#).expect("tokens");
    let px_port = port();
    let mut proxy = clawos_e2e::spawn_proxy_with_static_tokens(
        &state,
        px_port,
        (upstream.url.as_str(), HOST_KEY),
        &tokens,
        &[("CLAWOS_PROXY_RATE_LIMIT_RPM", "2")],
        &work.path().join("proxy.log"),
    )
    .expect("inference-proxy");
    let rt = runtime();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{px_port}");
    let call = |token: &str| -> (u16, Option<String>, String) {
        rt.block_on(async {
            let r = http
                .post(format!("{url}/v1/messages"))
                .header("x-api-key", token)
                .header("content-type", "application/json")
                .body(r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"a b c"}]}"#)
                .send()
                .await
                .expect("send");
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            (r.status().as_u16(), retry, r.text().await.unwrap_or_default())
        })
    };
    let started = std::time::Instant::now();
    let answers: Vec<_> = (0..4).map(|_| call("tok-r")).collect();
    let other = call("tok-b");
    let took = started.elapsed();
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(
        statuses,
        [200, 200, 429, 429],
        "RPM 2: a burst of two, then refused until 30 s have passed (took {took:?}): {answers:?}"
    );
    for (st, retry, text) in &answers[2..] {
        assert!(
            retry
                .as_deref()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| (1..=30).contains(&s)),
            "{st}: retry-after {retry:?}"
        );
        assert!(
            text.contains("rate_limit_error") && text.contains("requests-per-minute"),
            "{text}"
        );
    }
    assert_eq!(other.0, 200, "another agent is unaffected: {other:?}");
    let metrics = rt.block_on(async {
        http.get(format!("{url}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert_eq!(metric("clawos_proxy_rate_limited_total"), 2, "{metrics}");
    // Stop gracefully (the ledger writer drains its queue): only the three requests let
    // through reached the upstream and are audited and charged, each once.
    let _ = Command::new("kill")
        .args(["-INT", &proxy.id().to_string()])
        .status();
    let _ = proxy.wait();
    assert_eq!(upstream.seen().2, 3, "requests seen upstream");
    let audit = std::fs::read_to_string(state.join("proxy/audit.jsonl")).expect("audit");
    let lines = lines_of(&audit);
    let per_agent = |a: &str| lines.iter().filter(|l| l["agent"] == a).count();
    assert_eq!(
        (lines.len(), per_agent("agent-r"), per_agent("agent-b")),
        (3, 2, 1),
        "{audit}"
    );
    assert_eq!(
        rusqlite_rows(&state.join("proxy/ledger.db")).0,
        3,
        "ledger rows"
    );
}

/// (rows, input token sum) of the ledger, read with the sqlite3-free path: the proxy's
/// own usage query over its database file.
fn rusqlite_rows(db: &std::path::Path) -> (u64, u64) {
    let rows = clawos_inference_proxy::ledger::usage_since(db, 0, None).expect("usage");
    (
        rows.iter()
            .map(|r| r["requests"].as_u64().unwrap_or(0))
            .sum(),
        rows.iter()
            .map(|r| r["input_tokens"].as_u64().unwrap_or(0))
            .sum(),
    )
}

#[test]
fn token_budgets_refuse_until_the_window_allows_and_survive_a_restart() {
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let upstream = FakeAnthropic::start(HOST_KEY);
    let tokens = work.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"dev-token-a": "agent-a", "dev-token-b": "agent-b"}"#,
    )
    .expect("tokens");
    let px_port = port();
    let start = || {
        clawos_e2e::spawn_proxy_with_static_tokens(
            &state,
            px_port,
            (upstream.url.as_str(), HOST_KEY),
            &tokens,
            &[("CLAWOS_PROXY_TOKENS_PER_DAY", "60")],
            &work.path().join(format!("proxy-{}.log", port())),
        )
        .expect("inference-proxy")
    };
    let mut proxy = start();
    let rt = runtime();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = format!("http://127.0.0.1:{px_port}");
    let call = |token: &str, path: &str| -> (u16, Option<String>, String) {
        rt.block_on(async {
            let r = http
                .post(format!("{url}{path}"))
                .header("x-api-key", token)
                .body(r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"a b c"}]}"#)
                .send()
                .await
                .expect("send");
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            (r.status().as_u16(), retry, r.text().await.unwrap_or_default())
        })
    };
    // count_tokens passes through and costs nothing.
    let (st, _, text) = call("dev-token-a", "/v1/messages/count_tokens");
    assert_eq!((st, text.as_str()), (200, r#"{"input_tokens":3}"#));
    // Each call costs 3 + 4 = 7 tokens and reserves up to 21 first (13 bytes of prompt
    // text and roles + max_tokens 8): admitted while spend + 21 <= 60, so six times
    // (42 spent), never past the budget.
    for _ in 0..6 {
        assert_eq!(call("dev-token-a", "/v1/messages").0, 200);
    }
    let (st, retry, text) = call("dev-token-a", "/v1/messages");
    assert_eq!(st, 429, "{text}");
    assert!(text.contains("token budget"), "{text}");
    assert!(
        retry
            .and_then(|r| r.parse::<u64>().ok())
            .is_some_and(|s| s > 0 && s <= 86_400)
    );
    assert_eq!(
        call("dev-token-b", "/v1/messages").0,
        200,
        "another agent has its own budget"
    );
    // Operators read usage with `clawos usage`; without the credential it is refused.
    // The ledger is written in batches (up to 20 ms), so poll briefly.
    let mut u = Value::Null;
    for _ in 0..50 {
        let o = Command::new(clawos_e2e::bin("clawos"))
            .args(["--json", "usage", "--agent", "agent-a", "--proxy-url", &url])
            .env("CLAWOS_STATE_DIR", &state)
            .output()
            .expect("clawos usage");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        u = serde_json::from_slice(&o.stdout).expect("json");
        if u["usage"][0]["requests"] == 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(u["usage"][0]["requests"], 6, "{u}");
    assert_eq!(u["usage"][0]["input_tokens"], 18);
    let anon = rt
        .block_on(ProxyAdminClient::new(&url, "dev-token-a").usage(&UsageQuery::default()))
        .expect_err("an agent credential does not read usage");
    assert_eq!(anon.status(), Some(401), "{anon}");
    // A restart does not reset the day's spend: it is read back from the ledger.
    let _ = Command::new("kill")
        .args(["-INT", &proxy.id().to_string()])
        .status();
    let _ = proxy.wait();
    let mut proxy = start();
    assert_eq!(call("dev-token-a", "/v1/messages").0, 429);
    assert_eq!(call("dev-token-b", "/v1/messages").0, 200);
    let _ = proxy.kill();
    let _ = proxy.wait();
}

#[test]
fn sixty_four_clients_with_failures_every_request_audited_and_charged_once() {
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let upstream = FakeAnthropic::start(HOST_KEY);
    let tokens = work.path().join("tokens.json");
    let map: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("tok-{i}"), json!(format!("agent-{i}"))))
        .collect();
    std::fs::write(&tokens, Value::Object(map).to_string()).expect("tokens");
    let px_port = port();
    let mut proxy = spawn_daemon(
        "inference-proxy",
        &[
            "--addr",
            &format!("127.0.0.1:{px_port}"),
            "--state-dir",
            state.to_str().expect("utf8"),
            "--rpm",
            "10000000",
        ],
        &[
            ("ANTHROPIC_API_KEY", HOST_KEY),
            ("CLAWOS_PROXY_ANTHROPIC_URL", upstream.url.as_str()),
            ("CLAWOS_PROXY_STATIC_TOKENS", tokens.to_str().expect("utf8")),
            ("CLAWOS_PROXY_INSECURE_DEV_TOKENS", "1"),
        ],
        &work.path().join("proxy.log"),
        px_port,
    )
    .expect("inference-proxy");
    let url = format!("http://127.0.0.1:{px_port}/v1/messages");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    // A fixed amount of work, not a fixed time: how fast it goes is for the bench
    // (tests/bench/proxy.rs); here every request must be audited and charged once.
    // Each client goes through the ten kinds of request twice.
    const PER_CLIENT: u64 = 20;
    let started = std::time::Instant::now();
    // (sent, expected input tokens, expected output tokens) per client.
    let totals = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..64u64 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let token = format!("tok-{}", c % 8);
                let (mut sent, mut input, mut output) = (0u64, 0u64, 0u64);
                for i in c..c + PER_CLIENT {
                    // Mixed traffic: JSON, streams, an upstream 500, an upstream dying mid-stream.
                    let (model, stream, exp_in, exp_out) = match i % 10 {
                        0 => ("fail-midstream", true, 3, 1),
                        1 => ("fail-500", false, 0, 0),
                        2..=5 => ("claude-load", false, 3, 4),
                        _ => ("claude-load", true, 3, 4),
                    };
                    let body = json!({"model": model, "stream": stream, "max_tokens": 8, "messages": [{"role": "user", "content": "w1 w2 w3"}]});
                    let r = http.post(&url).header("x-api-key", &token).json(&body).send().await.expect("send");
                    let status = r.status().as_u16();
                    let _ = r.bytes().await;
                    assert!(status == 200 || (model == "fail-500" && status == 500), "{model}: {status}");
                    sent += 1;
                    input += exp_in;
                    output += exp_out;
                }
                (sent, input, output)
            }));
        }
        let mut t = (0, 0, 0);
        for task in tasks {
            let (s, i, o) = task.await.expect("client");
            t = (t.0 + s, t.1 + i, t.2 + o);
        }
        t
    });
    let elapsed = started.elapsed();
    let (sent, exp_in, exp_out) = totals;
    assert_eq!(sent, 64 * PER_CLIENT, "every client sent all its requests");
    // Stop gracefully: the ledger writer drains its queue.
    let _ = Command::new("kill")
        .args(["-INT", &proxy.id().to_string()])
        .status();
    let _ = proxy.wait();
    assert_eq!(upstream.seen().2 as u64, sent, "requests seen upstream");
    let audit = std::fs::read_to_string(state.join("proxy/audit.jsonl")).expect("audit");
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len() as u64, sent, "audit lines = requests sent");
    let ids: std::collections::HashSet<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), lines.len(), "duplicate request ids in the audit");
    let rows = clawos_inference_proxy::ledger::usage_since(&state.join("proxy/ledger.db"), 0, None)
        .expect("ledger");
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!(sum("requests"), sent, "ledger rows = requests sent");
    assert_eq!(
        sum("input_tokens"),
        exp_in,
        "input tokens = what the upstream reported"
    );
    assert_eq!(
        sum("output_tokens"),
        exp_out,
        "output tokens = what the upstream reported"
    );
    let failed = lines
        .iter()
        .filter(|l| l["error"].is_string() || l["status"].as_u64() == Some(500))
        .count() as u64;
    assert!(
        failed > 0 && failed < sent,
        "failures were injected and recorded: {failed}"
    );
    eprintln!(
        "load: {sent} requests by 64 clients in {elapsed:?}, {failed} with injected failures"
    );
}

fn lines_of(audit: &str) -> Vec<Value> {
    audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}
