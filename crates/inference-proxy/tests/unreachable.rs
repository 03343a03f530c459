//! An upstream that cannot be reached gets the caller a 502 in the caller's own API
//! shape (Anthropic's or OpenAI's error body), streaming or not; and the usage ledger
//! — the SQLite database with its `-wal`, not only the audit JSONL — records those
//! requests and the ones that succeeded without any credential in it: neither the
//! host's API keys nor the agent's JWT (a real one, from identity-manager).

use clawos_test_ports::free_port;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clawos_identity_manager::{Config, IssuerConfig, MasterKeySource};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};
use clawos_inference_proxy::ProxyConfig;
use clawos_inference_proxy::config::{ApiKind, Upstream};
use clawos_inference_proxy_api::{ProxyAdminClient, UsageQuery};
use clawos_scripted_model::{Script, ScriptedModel};
use serde_json::{Value, json};

const LIVE_KEY: &str = "sk-host-live-upstream-key-5b1e0c";
const DEAD_ANTHROPIC_KEY: &str = "sk-host-dead-anthropic-key-93af7d";
const DEAD_OPENAI_KEY: &str = "sk-host-dead-openai-key-0c44e2";
const ADMIN: &str = "operator-credential-0123456789";

async fn wait_listening(port: u16) {
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on {port}");
}

fn upstream(name: &str, kind: ApiKind, base_url: &str, model: &str, key: &str) -> Upstream {
    Upstream {
        name: name.into(),
        kind,
        base_url: base_url.into(),
        api_key_env: format!("{}_KEY", name.to_uppercase()),
        models: vec![model.into()],
        api_key: key.into(),
    }
}

/// The ledger's files as they are on disk: the database, its write-ahead log (where
/// fresh rows are) and shared-memory index, and the audit trail.
fn ledger_files(dir: &Path) -> Vec<PathBuf> {
    ["ledger.db", "ledger.db-wal", "ledger.db-shm", "audit.jsonl"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_in_the_callers_shape_and_the_ledger_holds_no_secret() {
    let d = tempfile::tempdir().expect("tmp");
    let state = d.path().join("proxy");
    clawos_inference_proxy::ledger::private_dir(&state).expect("state dir");

    // identity-manager issues the agent's JWT.
    let id_port = free_port();
    let issuer = format!("http://127.0.0.1:{id_port}");
    let service_token = "s".repeat(40);
    let cfg = Config {
        addr: format!("127.0.0.1:{id_port}").parse().expect("addr"),
        db_path: d.path().join("identity.db"),
        master: MasterKeySource::Hex("42".repeat(32)),
        issuer: IssuerConfig::new(&issuer, "t.local"),
        service_token: service_token.clone(),
    };
    tokio::spawn(async move { clawos_identity_manager::run(cfg, std::future::pending()).await });

    // One upstream that answers (so the ledger also holds a success), and two base URLs
    // on a loopback port nothing listens on.
    let model =
        ScriptedModel::new(Script::from_json(r#"{"turns": [{"text": "fine"}]}"#).expect("script"))
            .api_key(LIVE_KEY)
            .expect("model");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let live_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(clawos_scripted_model::serve(
        listener,
        model,
        std::future::pending(),
    ));
    let closed = free_port();
    let dead_url = format!("http://127.0.0.1:{closed}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", closed)).is_err(),
        "port {closed} should be closed"
    );

    let px_port = free_port();
    let cfg = ProxyConfig {
        addr: format!("127.0.0.1:{px_port}").parse().expect("addr"),
        upstreams: vec![
            upstream(
                "live",
                ApiKind::Anthropic,
                &live_url,
                "claude-live",
                LIVE_KEY,
            ),
            upstream(
                "deadanthropic",
                ApiKind::Anthropic,
                &dead_url,
                "claude-*",
                DEAD_ANTHROPIC_KEY,
            ),
            upstream(
                "deadopenai",
                ApiKind::Openai,
                &dead_url,
                "gpt-*",
                DEAD_OPENAI_KEY,
            ),
        ],
        issuer: Some(issuer.clone()),
        ledger_path: state.join("ledger.db"),
        audit_path: state.join("audit.jsonl"),
        admin_token: ADMIN.into(),
        upstream_timeout: Duration::from_secs(10),
        ..ProxyConfig::default()
    };
    wait_listening(id_port).await;
    tokio::spawn(async move { clawos_inference_proxy::run(cfg, std::future::pending()).await });
    wait_listening(px_port).await;
    let proxy = format!("http://127.0.0.1:{px_port}");

    let jwt = IdentityClient::with_service_token(&issuer, &service_token)
        .issue(&IssueRequest {
            agent: "a1".into(),
            vm_id: "a1-vm".into(),
            image_root_hash: String::new(),
            audience: "inference-proxy".into(),
            ttl_secs: Some(900),
            scopes: vec![],
        })
        .await
        .expect("issue")
        .token;
    let http = reqwest::Client::new();
    let anthropic = |model: &str, stream: bool| {
        http.post(format!("{proxy}/v1/messages"))
            .header("x-api-key", &jwt)
            .header("content-type", "application/json")
            .body(
                json!({"model": model, "max_tokens": 32, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            )
            .send()
    };
    let openai = |model: &str, stream: bool| {
        http.post(format!("{proxy}/v1/chat/completions"))
            .bearer_auth(&jwt)
            .header("content-type", "application/json")
            .body(
                json!({"model": model, "max_tokens": 32, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            )
            .send()
    };

    // The live upstream answers: the JWT is good, the proxy works.
    let r = anthropic("claude-live", false).await.expect("send");
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);

    for stream in [false, true] {
        // Anthropic's API: `{"type":"error","error":{"type":"api_error",...}}`.
        let t = Instant::now();
        let r = anthropic("claude-dead", stream).await.expect("send");
        let status = r.status().as_u16();
        let v: Value = r.json().await.expect("an error body in JSON");
        assert_eq!(status, 502, "anthropic, stream {stream}: {v}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(v["type"], "error", "Anthropic's shape: {v}");
        assert_eq!(v["error"]["type"], "api_error", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("deadanthropic") && msg.contains("unreachable"),
            "{v}"
        );

        // OpenAI's API: `{"error":{"message","type","param","code"}}`, no `type` at the top.
        let r = openai("gpt-dead", stream).await.expect("send");
        let status = r.status().as_u16();
        let v: Value = r.json().await.expect("an error body in JSON");
        assert_eq!(status, 502, "openai, stream {stream}: {v}");
        assert!(v.get("type").is_none(), "OpenAI's shape: {v}");
        assert_eq!(v["error"]["type"], "server_error", "{v}");
        assert!(
            v["error"].get("param").is_some() && v["error"].get("code").is_some(),
            "{v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("deadopenai") && m.contains("unreachable")),
            "{v}"
        );
    }

    // All five requests are in the ledger (read back through the proxy's own API).
    let admin = ProxyAdminClient::new(&proxy, ADMIN);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = admin
            .usage(&UsageQuery {
                since_ms: 0,
                agent: Some("a1".into()),
            })
            .await
            .expect("usage");
        let n: u64 = report.usage.iter().map(|u| u.requests).sum();
        if n == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "ledger has {n} of 5: {report:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The bytes on disk: the records are there, the credentials are not.
    let files = ledger_files(&state);
    let bytes: Vec<(PathBuf, Vec<u8>)> = files
        .iter()
        .map(|p| (p.clone(), std::fs::read(p).expect("read")))
        .collect();
    let wal = bytes
        .iter()
        .find(|(p, _)| p.ends_with("ledger.db-wal"))
        .map(|(_, b)| b.len());
    assert!(
        wal.is_some_and(|n| n > 0),
        "no write-ahead log to scan: {files:?}"
    );
    let db: Vec<u8> = bytes
        .iter()
        .filter(|(p, _)| !p.ends_with("audit.jsonl"))
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    for model in ["claude-live", "claude-dead", "gpt-dead"] {
        assert!(
            contains(&db, model),
            "the ledger database does not hold the {model} rows"
        );
    }
    let signature = jwt.rsplit('.').next().expect("a JWT");
    for (p, b) in &bytes {
        for (what, secret) in [
            ("the agent's JWT", jwt.as_str()),
            ("the JWT's signature", signature),
            ("the live upstream's host key", LIVE_KEY),
            ("the Anthropic host key", DEAD_ANTHROPIC_KEY),
            ("the OpenAI host key", DEAD_OPENAI_KEY),
        ] {
            assert!(!contains(b, secret), "{} holds {what}", p.display());
        }
    }

    // And the ledger says what happened to each request.
    let conn = rusqlite::Connection::open_with_flags(
        state.join("ledger.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the ledger");
    let mut rows: Vec<(String, i64, Option<String>)> = conn
        .prepare("SELECT model, status, error FROM requests ORDER BY time_ms")
        .expect("query")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows.sort();
    let statuses: Vec<(&str, i64)> = rows.iter().map(|(m, s, _)| (m.as_str(), *s)).collect();
    assert_eq!(
        statuses,
        [
            ("claude-dead", 502),
            ("claude-dead", 502),
            ("claude-live", 200),
            ("gpt-dead", 502),
            ("gpt-dead", 502)
        ],
        "{rows:?}"
    );
    for (model, _, error) in &rows {
        if model.ends_with("-dead") {
            assert!(
                error.as_deref().is_some_and(|e| e.contains("dead")),
                "{model}: the failure is recorded: {rows:?}"
            );
        }
    }
}
