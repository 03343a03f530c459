//! The verifier against a real identity-manager on loopback: JWKS over HTTP, refresh
//! on an unknown kid after rotation, audience/expiry/algorithm checks, revocation.

use std::time::Duration;

use clawos_agent_token::{Verifier, VerifierConfig, VerifyError};
use clawos_identity_manager::{Config, IssuerConfig, MasterKeySource};
use clawos_identity_manager_api::{IdentityClient, IssueRequest, Issued, RevokeRequest};

async fn start_identity(dir: &std::path::Path) -> (String, IdentityClient) {
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
    let client = IdentityClient::with_service_token(&url, &service_token);
    (url, client)
}

async fn issue(c: &IdentityClient, audience: &str, ttl_secs: Option<u64>) -> Issued {
    c.issue(&IssueRequest {
        agent: "a1".into(),
        vm_id: "vm".into(),
        image_root_hash: String::new(),
        audience: audience.into(),
        ttl_secs,
        scopes: vec![],
    })
    .await
    .expect("issue")
}

#[tokio::test]
async fn verifies_refreshes_on_rotation_and_honours_revocation() {
    let d = tempfile::tempdir().expect("tmp");
    let (url, svc) = start_identity(d.path()).await;
    let cfg = VerifierConfig {
        min_refresh: Duration::ZERO,
        revocation_poll: Duration::ZERO,
        ..VerifierConfig::new(&url, "inference-proxy")
    };
    let v = Verifier::new(cfg);

    let t = issue(&svc, "inference-proxy", Some(900)).await;
    let claims = v.verify(&t.token).await.expect("valid");
    assert_eq!(claims.sub, "spiffe://t.local/agent/a1");

    let other = issue(&svc, "control-plane", Some(900)).await;
    assert!(matches!(
        v.verify(&other.token).await,
        Err(VerifyError::Invalid(_))
    ));

    // Two rotations after the JWKS was cached: the active key did not exist then, so
    // its kid is unknown and triggers a refresh.
    svc.rotate_keys().await.expect("rotate");
    svc.rotate_keys().await.expect("rotate");
    let t2 = issue(&svc, "inference-proxy", Some(900)).await;
    assert_ne!(t2.kid, t.kid);
    v.verify(&t2.token).await.expect("new kid after refresh");
    v.verify(&t.token)
        .await
        .expect("retired key still published");

    // Header says HS256: refused before any key is looked at.
    let parts: Vec<&str> = t2.token.split('.').collect();
    let hs = format!(
        "{}.{}.{}",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", parts[1], parts[2]
    );
    assert!(matches!(
        v.verify(&hs).await,
        Err(VerifyError::Algorithm(_))
    ));

    let short = issue(&svc, "inference-proxy", Some(1)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(
        v.verify(&short.token).await,
        Err(VerifyError::Invalid(_))
    ));

    svc.revoke(&RevokeRequest::jti(&t2.jti))
        .await
        .expect("revoke");
    assert!(matches!(
        v.verify(&t2.token).await,
        Err(VerifyError::Revoked)
    ));
    v.verify(&t.token).await.expect("other tokens unaffected");
}

#[tokio::test]
async fn rollover_needs_no_refresh_and_unknown_kids_do_not_hammer_the_issuer() {
    let d = tempfile::tempdir().expect("tmp");
    let (url, svc) = start_identity(d.path()).await;
    let v = Verifier::new(VerifierConfig::new(&url, "inference-proxy"));
    let t = issue(&svc, "inference-proxy", None).await;
    v.verify(&t.token).await.expect("valid");
    // One rotation: the newly active key was published as "next" before it signed,
    // so the cached JWKS already has it; no refresh needed.
    svc.rotate_keys().await.expect("rotate");
    let t2 = issue(&svc, "inference-proxy", None).await;
    v.verify(&t2.token).await.expect("pre-published next key");
    // A second rotation makes a key this verifier has never seen; with the default
    // 10 s minimum between refreshes it stays unknown for now instead of making every
    // request refetch the JWKS.
    svc.rotate_keys().await.expect("rotate");
    let t3 = issue(&svc, "inference-proxy", None).await;
    assert!(matches!(
        v.verify(&t3.token).await,
        Err(VerifyError::UnknownKey(_))
    ));
}
