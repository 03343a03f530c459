//! Fail-closed after the grace period: a verifier whose issuer (a real identity-manager
//! on loopback) stops answering keeps verifying with its cached JWKS and last
//! revocation feed for [`REVOCATION_GRACE_POLLS`] poll intervals after the last feed
//! it fetched, then refuses every token (a fetch error, never "not revoked") until the
//! issuer is back.

use std::time::{Duration, Instant};

use clawos_agent_token::{REVOCATION_GRACE_POLLS, Verifier, VerifierConfig, VerifyError};
use clawos_identity_manager::{Config, IssuerConfig, MasterKeySource};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};

const SERVICE_TOKEN: &str = "ssssssssssssssssssssssssssssssssssssssss";

/// Starts identity-manager on `port` over `db`; returns its stop switch and task.
async fn start_identity(
    port: u16,
    db: &std::path::Path,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), clawos_identity_manager::IdentityError>>,
) {
    let url = format!("http://127.0.0.1:{port}");
    let cfg = Config {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        db_path: db.to_owned(),
        master: MasterKeySource::Hex("42".repeat(32)),
        issuer: IssuerConfig::new(&url, "t.local"),
        service_token: SERVICE_TOKEN.into(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(clawos_identity_manager::run(cfg, async move {
        let _ = stopped.await;
    }));
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return (stop, task);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("identity-manager does not listen on {port}");
}

#[tokio::test]
async fn an_unreachable_issuer_is_bridged_for_the_grace_period_then_verification_fails_closed() {
    let d = tempfile::tempdir().expect("tmp");
    let db = d.path().join("identity.db");
    let port = clawos_test_ports::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (stop, task) = start_identity(port, &db).await;
    let ids = IdentityClient::with_service_token(&url, SERVICE_TOKEN);
    let token = ids
        .issue(&IssueRequest {
            agent: "a1".into(),
            vm_id: "vm".into(),
            image_root_hash: String::new(),
            audience: "inference-proxy".into(),
            ttl_secs: Some(900),
            scopes: vec![],
        })
        .await
        .expect("issue")
        .token;

    // The feed is due every 300 ms: the grace is 12 polls, 3.6 s. Keys are cached far
    // longer, so only the revocation feed's age decides.
    let poll = Duration::from_millis(300);
    let grace = poll * REVOCATION_GRACE_POLLS;
    let v = Verifier::new(VerifierConfig {
        revocation_poll: poll,
        jwks_ttl: Duration::from_secs(3600),
        ..VerifierConfig::new(&url, "inference-proxy")
    });
    let before_fetch = Instant::now();
    v.verify(&token)
        .await
        .expect("verified while the issuer answers");
    let after_fetch = Instant::now();

    // The issuer goes away: nothing listens on its port any more.
    stop.send(()).expect("stop identity-manager");
    task.await.expect("join").expect("identity-manager ran");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the issuer still answers"
    );

    // Within the grace period (each feed poll is due, and fails): still verified from
    // the cached keys and the last feed.
    let mut bridged = 0;
    for at in [poll * 2, grace / 2, grace - poll * 2] {
        tokio::time::sleep_until((after_fetch + at).into()).await;
        let r = v.verify(&token).await;
        // The feed was fetched after `before_fetch`: if this check ended within the
        // grace counted from there, it was within the grace period.
        if before_fetch.elapsed() < grace {
            let claims =
                r.unwrap_or_else(|e| panic!("refused {at:?} into a {grace:?} grace period: {e}"));
            assert_eq!(claims.agent, "a1");
            bridged += 1;
        }
    }
    assert!(
        bridged > 0,
        "the machine was too slow to check inside the grace period"
    );

    // Past it: refused, and it stays refused.
    tokio::time::sleep_until((after_fetch + grace + poll).into()).await;
    for _ in 0..3 {
        match v.verify(&token).await {
            Err(VerifyError::Fetch { url: u, .. }) => {
                assert!(u.starts_with(&url), "{u}");
            }
            other => panic!(
                "{:?} after the last feed was fetched ({grace:?} grace), the issuer gone: {other:?}",
                after_fetch.elapsed()
            ),
        }
        tokio::time::sleep(poll).await;
    }

    // The issuer back (same keys, same store): verification resumes.
    let (stop, task) = start_identity(port, &db).await;
    v.verify(&token)
        .await
        .expect("verified once the issuer is back");
    stop.send(()).expect("stop");
    task.await.expect("join").expect("identity-manager ran");
}
