//! The auth path of a VM's token budget, in process: identity-manager issues real
//! agent tokens, the proxy verifies them against its JWKS, `clawos-scripted-model` is
//! the upstream. A token's `clawos.budget.total:<N>` scope caps its agent's total at
//! the smaller of `N` and the proxy's own total, with refusals that name which one; a
//! malformed budget scope is refused (403) in the caller's API shape; tokens without
//! the scope are as before.

use clawos_test_ports::free_port;
use std::time::Duration;

use clawos_identity_manager::{Config, IssuerConfig, MasterKeySource};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};
use clawos_inference_proxy::{ProxyConfig, config};
use clawos_scripted_model::{Script, ScriptedModel};
use serde_json::{Value, json};

const HOST_KEY: &str = "host-key-for-the-scripted-model";

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

struct Stack {
    proxy: String,
    ids: IdentityClient,
    http: reqwest::Client,
}

/// identity-manager, a scripted upstream answering 49 words (50 tokens charged per
/// call with the one-word prompt), and a proxy with a configured total of `total`.
async fn stack(dir: &std::path::Path, total: u64) -> Stack {
    let id_port = free_port();
    let issuer = format!("http://127.0.0.1:{id_port}");
    let service_token = "s".repeat(40);
    let cfg = Config {
        addr: format!("127.0.0.1:{id_port}").parse().expect("addr"),
        db_path: dir.join("identity.db"),
        master: MasterKeySource::Hex("42".repeat(32)),
        issuer: IssuerConfig::new(&issuer, "t.local"),
        service_token: service_token.clone(),
    };
    tokio::spawn(async move { clawos_identity_manager::run(cfg, std::future::pending()).await });

    let script = json!({"turns": [{"text": vec!["done"; 49].join(" ")}]}).to_string();
    let model = ScriptedModel::new(Script::from_json(&script).expect("script"))
        .api_key(HOST_KEY)
        .expect("model");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let model_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(clawos_scripted_model::serve(
        listener,
        model,
        std::future::pending(),
    ));

    let px_port = free_port();
    let cfg = ProxyConfig {
        addr: format!("127.0.0.1:{px_port}").parse().expect("addr"),
        upstreams: config::upstreams(None, &model_url, &|_| Some(HOST_KEY.into()))
            .expect("upstreams"),
        tokens_total: total,
        issuer: Some(issuer),
        ledger_path: dir.join("ledger.db"),
        audit_path: dir.join("audit.jsonl"),
        admin_token: "operator-credential-0123456789".into(),
        ..ProxyConfig::default()
    };
    wait_listening(id_port).await;
    tokio::spawn(async move { clawos_inference_proxy::run(cfg, std::future::pending()).await });
    wait_listening(px_port).await;
    Stack {
        proxy: format!("http://127.0.0.1:{px_port}"),
        ids: IdentityClient::with_service_token(
            &format!("http://127.0.0.1:{id_port}"),
            &service_token,
        ),
        http: reqwest::Client::new(),
    }
}

impl Stack {
    async fn token(&self, agent: &str, scopes: &[&str]) -> String {
        self.ids
            .issue(&IssueRequest {
                agent: agent.into(),
                vm_id: format!("{agent}-1"),
                image_root_hash: String::new(),
                audience: "inference-proxy".into(),
                ttl_secs: Some(900),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            })
            .await
            .expect("issue")
            .token
    }

    /// A message with `max_tokens`, reserved as `max_tokens` + 10.
    async fn call(&self, token: &str, max_tokens: u64) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/messages", self.proxy))
            .header("x-api-key", token)
            .header("content-type", "application/json")
            .body(
                json!({"model": "claude-x", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            )
            .send()
            .await
            .expect("send");
        (r.status().as_u16(), r.json().await.expect("json"))
    }

    /// The same on the OpenAI API (`GET /v1/models`: authentication only).
    async fn models(&self, token: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/v1/models", self.proxy))
            .bearer_auth(token)
            .send()
            .await
            .expect("send");
        (r.status().as_u16(), r.json().await.expect("json"))
    }
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_token_budget_caps_its_agent_and_a_refusal_names_the_budget_that_binds() {
    let d = tempfile::tempdir().expect("tmp");
    let s = stack(d.path(), 1000).await;

    // The VM's 300 is below the proxy's 1,000: it binds.
    let vm = s.token("step-a", &["clawos.budget.total:300"]).await;
    for i in 0..5 {
        let (status, v) = s.call(&vm, 60).await;
        assert_eq!(status, 200, "call {i}: {v}");
    }
    let (status, v) = s.call(&vm, 60).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert!(
        message(&v).starts_with("token budget of this VM (clawos.budget.total 300) exhausted"),
        "{v}"
    );
    let (status, v) = s.call(&vm, 295).await;
    assert_eq!(status, 400, "can never fit: {v}");
    assert!(
        message(&v).contains("the whole token budget of this VM (clawos.budget.total 300)"),
        "{v}"
    );

    // The VM's 5,000 is above the proxy's 1,000: the proxy's total binds, named as
    // before budgets travelled with tokens.
    let big = s.token("step-b", &["clawos.budget.total:5000"]).await;
    let (status, v) = s.call(&big, 995).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        message(&v).contains("agent step-b's whole total token budget of 1000"),
        "{v}"
    );

    // Without the scope: the proxy's own total only (20 calls = 1,000 tokens).
    let plain = s.token("plain", &[]).await;
    for i in 0..18 {
        let (status, v) = s.call(&plain, 60).await;
        assert_eq!(status, 200, "call {i}: {v}");
    }
}

#[tokio::test]
async fn a_malformed_budget_scope_is_refused_in_the_callers_api_shape() {
    let d = tempfile::tempdir().expect("tmp");
    let s = stack(d.path(), 0).await;
    for bad in [
        "clawos.budget.total:abc",
        "clawos.budget.total:0",
        "clawos.budget.total:-300",
        "clawos.budget.total:1000000000001",
        "clawos.budget.daily:300",
    ] {
        let t = s.token("step-c", &[bad]).await;
        let (status, v) = s.call(&t, 60).await;
        assert_eq!(status, 403, "{bad}: {v}");
        assert_eq!(v["type"], "error", "Anthropic's shape: {v}");
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
        assert!(message(&v).contains(bad), "{v}");
        let (status, v) = s.models(&t).await;
        assert_eq!(status, 403, "{bad}: {v}");
        assert_eq!(
            v["error"]["type"], "invalid_request_error",
            "OpenAI's shape: {v}"
        );
    }
    let t = s
        .token(
            "step-c",
            &["clawos.budget.total:300", "clawos.budget.total:900"],
        )
        .await;
    let (status, v) = s.call(&t, 60).await;
    assert_eq!(status, 403, "{v}");
    assert!(message(&v).contains("more than one budget scope"), "{v}");
    // Other scopes are not the proxy's business.
    let t = s.token("step-c", &["llm:invoke"]).await;
    assert_eq!(s.call(&t, 60).await.0, 200);
}
