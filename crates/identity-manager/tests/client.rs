//! The typed client against the real router on loopback: every route of the table
//! answers what the client expects, and errors arrive as the one ClawOS error body.

use std::time::Duration;

use clawos_api::{ClientError, code};
use clawos_identity_manager::{Config, IssuerConfig, MasterKeySource};
use clawos_identity_manager_api::{IdentityClient, IssueRequest, RevokeRequest, routes};

async fn start(dir: &std::path::Path) -> (String, String) {
    let port = clawos_test_ports::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let service_token = "s".repeat(40);
    let cfg = Config {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        db_path: dir.join("identity.db"),
        master: MasterKeySource::Hex("42".repeat(32)),
        issuer: IssuerConfig::new(&url, "t.local"),
        service_token: service_token.clone(),
    };
    tokio::spawn(async move { clawos_identity_manager::run(cfg, std::future::pending()).await });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (url, service_token)
}

fn req(agent: &str) -> IssueRequest {
    IssueRequest {
        agent: agent.into(),
        vm_id: "vm-1".into(),
        image_root_hash: "ab".repeat(32),
        audience: "inference-proxy".into(),
        ttl_secs: Some(600),
        scopes: vec!["llm:invoke".into(), "files:read".into()],
    }
}

#[tokio::test]
async fn every_route_answers_the_client() {
    let d = tempfile::tempdir().expect("tmp");
    let (url, svc) = start(d.path()).await;
    let c = IdentityClient::with_service_token(&url, &svc);

    let t = c.issue(&req("agent-1")).await.expect("issue");
    let i = c.introspect(&t.token).await.expect("introspect");
    assert!(i.active);
    assert_eq!(i.scope.as_deref(), Some("llm:invoke files:read"));
    assert_eq!(i.sub.as_deref(), Some("spiffe://t.local/agent/agent-1"));

    let renewed = IdentityClient::new(&url)
        .renew(&t.token)
        .await
        .expect("renew with the agent's own token");
    assert_ne!(renewed.jti, t.jti);

    let jwks = c.jwks().await.expect("jwks");
    assert!(jwks.keys.iter().any(|k| k.kid.as_deref() == Some(&t.kid)));
    assert!(jwks.keys.iter().all(|k| k.is_ed25519()));

    let key = c.agent_key("agent-1").await.expect("agent key");
    assert_eq!(key.agent, "agent-1");
    assert!(key.jwk.kid.is_none() && key.jwk.is_ed25519());

    let rotated = c.rotate_keys().await.expect("rotate");
    assert_ne!(rotated.active_kid, t.kid);

    c.revoke(&RevokeRequest::jti(&t.jti)).await.expect("revoke");
    let feed = IdentityClient::new(&url).revocations().await.expect("feed");
    assert!(feed.tokens.iter().any(|r| r.jti == t.jti));
    let gone = c.introspect(&t.token).await.expect("introspect");
    assert_eq!(gone, clawos_identity_manager_api::Introspection::inactive());
    c.revoke(&RevokeRequest::agent("agent-1"))
        .await
        .expect("revoke agent");
    assert!(
        c.revocations()
            .await
            .expect("feed")
            .agents
            .iter()
            .any(|a| a.agent == "agent-1")
    );

    let disco = c.discovery().await.expect("discovery");
    assert_eq!(disco.issuer, url);
    assert_eq!(disco.jwks_uri, format!("{url}{}", routes::JWKS.path));

    let metrics = c.metrics().await.expect("metrics");
    assert!(
        metrics.contains("clawos_identity_tokens_issued_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn errors_are_one_body_with_a_code_and_a_request_id() {
    let d = tempfile::tempdir().expect("tmp");
    let (url, svc) = start(d.path()).await;
    let c = IdentityClient::with_service_token(&url, &svc);

    let api = |e: ClientError| match e {
        ClientError::Api {
            status,
            code,
            message,
            request_id,
        } => (status, code, message, request_id),
        other => panic!("not an API error: {other}"),
    };
    let (status, code, message, request_id) = api(c
        .issue(&IssueRequest {
            ttl_secs: Some(7200),
            ..req("a")
        })
        .await
        .expect_err("ttl too long"));
    assert_eq!((status, code.as_str()), (400, code::INVALID_REQUEST));
    assert!(message.contains("ttl_secs"), "{message}");
    assert_eq!(request_id.len(), 32, "every error names its request");

    let wrong = IdentityClient::with_service_token(&url, "wrong");
    let e = wrong.issue(&req("a")).await.expect_err("wrong credential");
    assert_eq!((e.status(), e.code()), (Some(401), code::UNAUTHORIZED));
    let e = c.agent_key("nobody").await.expect_err("unknown agent");
    assert_eq!((e.status(), e.code()), (Some(404), code::NOT_FOUND));
    assert_eq!(e.exit_code(), 3);

    // Raw: the body shape, the scheme a 401 asks for, the id the client chose, and
    // unknown routes.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}{}", routes::ISSUE.path))
        .header("x-request-id", "chosen-by-the-client-1")
        .json(&req("a"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers().get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let body: clawos_api::ErrorBody = r.json().await.expect("error body");
    assert_eq!(body.error.code, code::UNAUTHORIZED);
    assert_eq!(body.error.request_id, "chosen-by-the-client-1");
    let r = http
        .get(format!("{url}/v1/nothing-here"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 404);
    let body: clawos_api::ErrorBody = r.json().await.expect("error body");
    assert_eq!(body.error.code, code::NOT_FOUND);

    // Transport failures have their own code (the CLI's "unreachable").
    let e = IdentityClient::new("http://127.0.0.1:1")
        .jwks()
        .await
        .expect_err("nothing listens");
    assert_eq!((e.code(), e.exit_code()), (code::UNAVAILABLE, 7));
}

/// A web page the operator opens can reach loopback: a rebinding `Host`, a foreign
/// `Origin` or a `text/plain` body (no preflight) must not get a service answer, even
/// with the credential (a page cannot read it, but a misconfigured client might).
#[tokio::test]
async fn browser_style_requests_are_refused_even_with_the_credential() {
    let d = tempfile::tempdir().expect("tmp");
    let (url, svc) = start(d.path()).await;
    let http = reqwest::Client::new();
    let issue = format!("{url}{}", routes::ISSUE.path);
    let body = serde_json::to_string(&req("agent-1")).expect("json");
    let send = |host: Option<&str>, origin: Option<&str>, ctype: &str| {
        let mut r = http
            .post(&issue)
            .bearer_auth(&svc)
            .header("content-type", ctype)
            .body(body.clone());
        if let Some(h) = host {
            r = r.header("host", h);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(send(None, None, "application/json").await.expect("send")),
        201,
        "the control: a plain local call works"
    );
    let port = url.rsplit(':').next().expect("port");
    let rebound = format!("evil.example:{port}");
    assert_eq!(
        status(
            send(Some(&rebound), None, "application/json")
                .await
                .expect("send")
        ),
        403
    );
    assert_eq!(
        status(
            send(None, Some("http://evil.example"), "application/json")
                .await
                .expect("send")
        ),
        403
    );
    assert_eq!(
        status(send(None, None, "text/plain").await.expect("send")),
        415
    );
}
