//! The operator API through `ProxyAdminClient` against the real router on loopback:
//! ClawOS error bodies there, while the agent-facing endpoints keep Anthropic's and
//! OpenAI's own error shapes.

use std::time::Duration;

use clawos_api::code;
use clawos_inference_proxy::ledger::AuditRotation;
use clawos_inference_proxy::{ProxyConfig, config};
use clawos_inference_proxy_api::{ProxyAdminClient, UsageQuery};

const ADMIN: &str = "operator-credential-0123456789";

async fn start(dir: &std::path::Path) -> String {
    let port = clawos_test_ports::free_port();
    let cfg = ProxyConfig {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        upstreams: config::upstreams(None, "http://127.0.0.1:1", &|_| Some("k".into()))
            .expect("upstreams"),
        rpm: 60,
        tokens_per_minute: 0,
        tokens_per_day: 0,
        tokens_total: 0,
        issuer: None,
        audience: "inference-proxy".into(),
        static_tokens: Some([("agent-token".to_owned(), "a1".to_owned())].into()),
        ledger_path: dir.join("ledger.db"),
        audit_path: dir.join("audit.jsonl"),
        admin_token: ADMIN.into(),
        upstream_timeout: Duration::from_secs(5),
        audit_rotation: AuditRotation {
            max_bytes: 1 << 20,
            keep: 2,
        },
        ..ProxyConfig::default()
    };
    tokio::spawn(async move { clawos_inference_proxy::run(cfg, std::future::pending()).await });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn operator_errors_are_clawos_bodies_and_agent_errors_stay_the_vendors() {
    let d = tempfile::tempdir().expect("tmp");
    let url = start(d.path()).await;

    let admin = ProxyAdminClient::new(&url, ADMIN);
    admin.healthz().await.expect("healthz");
    let report = admin
        .usage(&UsageQuery {
            since_ms: 0,
            agent: Some("a1".into()),
        })
        .await
        .expect("usage");
    assert!(report.usage.is_empty());
    assert!(admin.metrics().await.expect("metrics").contains("# TYPE"));

    // An agent's credential does not read usage: a ClawOS error with a request id.
    let e = ProxyAdminClient::new(&url, "agent-token")
        .usage(&UsageQuery::default())
        .await
        .expect_err("agents cannot read usage");
    assert_eq!((e.status(), e.code()), (Some(401), code::UNAUTHORIZED));
    assert!(
        matches!(&e, clawos_api::ClientError::Api { request_id, .. } if request_id.len() == 32),
        "{e}"
    );

    let http = reqwest::Client::new();
    let r = http
        .get(format!("{url}/v1/usage?since_ms=yesterday"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let body: clawos_api::ErrorBody = r.json().await.expect("ClawOS error body");
    assert_eq!(body.error.code, code::INVALID_REQUEST);

    let r = http
        .get(format!("{url}/v1/nothing"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 404);
    let body: clawos_api::ErrorBody = r.json().await.expect("ClawOS error body");
    assert_eq!(body.error.code, code::NOT_FOUND);

    // The agent-facing APIs answer in their vendors' shapes.
    let v: serde_json::Value = http
        .post(format!("{url}/v1/messages"))
        .body("{}")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    let v: serde_json::Value = http
        .post(format!("{url}/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"].get("request_id").is_none(), "{v}");
}

#[tokio::test]
async fn operator_routes_refuse_browser_style_requests_and_agent_routes_are_untouched() {
    let d = tempfile::tempdir().expect("tmp");
    let url = start(d.path()).await;
    let http = reqwest::Client::new();
    let status =
        |r: reqwest::RequestBuilder| async move { r.send().await.expect("send").status().as_u16() };
    let usage = format!("{url}/v1/usage");
    // DNS rebinding and cross-origin pages, even with the operator credential: 403.
    for (h, v) in [
        ("host", "evil.example:11435"),
        ("origin", "http://evil.example"),
        ("origin", "null"),
    ] {
        let r = http.get(&usage).bearer_auth(ADMIN).header(h, v);
        assert_eq!(status(r).await, 403, "{h}: {v}");
    }
    let r = http
        .get(format!("{url}/healthz"))
        .header("host", "evil.example");
    assert_eq!(status(r).await, 403);
    assert_eq!(status(http.get(&usage).bearer_auth(ADMIN)).await, 200);
    // Agents' SDKs come through the relay as `Host: 127.0.0.1:11435`; their routes keep
    // their vendors' answers (here: no credential).
    let r = http
        .post(format!("{url}/v1/messages"))
        .header("host", "127.0.0.1:11435")
        .header("content-type", "application/json")
        .body("{}");
    assert_eq!(status(r).await, 401);
}
