//! The verifier against issuers that play the attacker: tokens forged with a key the
//! verifier trusts but not yet valid (`nbf` in the future), and an issuer URL that
//! answers with a redirect to a server publishing an attacker's key.
//!
//! The issuers here are small loopback HTTP servers that answer fixed bodies, so each
//! test decides exactly what the verifier is shown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use clawos_agent_token::{Claims, Verifier, VerifierConfig, VerifyError};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback HTTP/1.1 server: `answer(path)` gives (status line, extra headers, body);
/// every request is counted.
struct FakeServer {
    url: String,
    requests: Arc<AtomicUsize>,
}

async fn serve(
    answer: impl Fn(&str) -> (&'static str, String, String) + Send + Sync + 'static,
) -> FakeServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let requests = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&requests);
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let count = Arc::clone(&count);
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // One request per connection (`connection: close`); the verifier's
                // requests have no body.
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&buf);
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, headers, body) = answer(&path);
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    FakeServer { url, requests }
}

/// A test Ed25519 key: its JWKS entry and a PKCS#8 encoding key for signing.
struct TestKey {
    kid: String,
    jwks: String,
    encoding: EncodingKey,
}

fn test_key(seed: u8) -> TestKey {
    let seed = [seed; 32];
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let kid = format!("test-key-{}", seed[0]);
    let jwks = format!(
        r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"{kid}","alg":"EdDSA","use":"sig"}}]}}"#,
        B64.encode(public)
    );
    // PKCS#8 v1 DER of an Ed25519 seed, the form `jsonwebtoken` takes.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    TestKey {
        kid,
        jwks,
        encoding: EncodingKey::from_ed_der(&der),
    }
}

const EMPTY_FEED: &str = r#"{"generated_at":0,"tokens":[],"agents":[]}"#;

/// An issuer publishing `key` and an empty revocation feed.
async fn issuer_with(key: &TestKey) -> FakeServer {
    let jwks = key.jwks.clone();
    serve(move |path| match path {
        "/.well-known/jwks.json" => ("200 OK", String::new(), jwks.clone()),
        "/v1/revocations" => ("200 OK", String::new(), EMPTY_FEED.to_owned()),
        _ => ("404 Not Found", String::new(), "{}".to_owned()),
    })
    .await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(iss: &str, nbf: u64, exp: u64) -> Claims {
    Claims {
        iss: iss.to_owned(),
        sub: "spiffe://t.local/agent/a1".into(),
        aud: "inference-proxy".into(),
        iat: now(),
        nbf,
        exp,
        jti: format!("jti-{nbf}-{exp}"),
        agent: "a1".into(),
        vm_id: "vm".into(),
        image_root_hash: String::new(),
        scopes: vec![],
        auth_time: None,
    }
}

fn sign(key: &TestKey, c: &Claims) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&h, c, &key.encoding).expect("sign")
}

fn verifier(issuer: &str) -> Verifier {
    Verifier::new(VerifierConfig {
        min_refresh: Duration::ZERO,
        revocation_poll: Duration::ZERO,
        ..VerifierConfig::new(issuer, "inference-proxy")
    })
}

/// A token signed by a key the verifier trusts, but whose `nbf` is in the future, is
/// refused: no leeway, as for `exp`.
#[tokio::test]
async fn a_token_whose_nbf_is_in_the_future_is_refused() {
    let key = test_key(7);
    let issuer = issuer_with(&key).await;
    let v = verifier(&issuer.url);
    let t = now();
    // The control: the same key and claims with `nbf` now verify, so the refusal below
    // is about `nbf` and nothing else.
    let valid = sign(&key, &claims(&issuer.url, t, t + 600));
    v.verify(&valid).await.expect("nbf now: valid");
    for ahead in [2, 60, 3600] {
        let early = sign(&key, &claims(&issuer.url, t + ahead, t + 7200));
        match v.verify(&early).await {
            Err(VerifyError::Invalid(m)) => {
                assert!(m.contains("Immature"), "nbf +{ahead}s: {m}")
            }
            other => panic!("a token valid only {ahead}s from now was not refused: {other:?}"),
        }
    }
}

/// The issuer URL answers 307 to another server that publishes an attacker's key: the
/// verifier must not follow, so a token signed with the attacker's key is refused and
/// the attacker's server is never asked.
#[tokio::test]
async fn the_jwks_client_does_not_follow_redirects() {
    let attacker_key = test_key(9);
    let attacker = issuer_with(&attacker_key).await;
    let target = attacker.url.clone();
    let redirecting = serve(move |path| {
        (
            "307 Temporary Redirect",
            format!("location: {target}{path}\r\n"),
            String::new(),
        )
    })
    .await;

    // The control: the attacker's server itself, as an issuer, would make the token
    // verify, so what is tested below is the redirect.
    let forged_for_attacker = sign(&attacker_key, &claims(&attacker.url, now(), now() + 600));
    verifier(&attacker.url)
        .verify(&forged_for_attacker)
        .await
        .expect("the attacker's own issuer URL accepts its key");
    let asked_directly = attacker.requests.load(Ordering::SeqCst);

    let v = verifier(&redirecting.url);
    let forged = sign(&attacker_key, &claims(&redirecting.url, now(), now() + 600));
    for _ in 0..3 {
        match v.verify(&forged).await {
            Err(VerifyError::Fetch { url, detail }) => {
                assert!(url.starts_with(&redirecting.url), "{url}");
                assert!(detail.contains("307"), "{detail}");
            }
            other => panic!("a redirected JWKS was followed: {other:?}"),
        }
    }
    assert!(redirecting.requests.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        attacker.requests.load(Ordering::SeqCst),
        asked_directly,
        "the verifier fetched from the redirect target"
    );
}

/// The issuer publishes its real key but redirects its revocation feed to a server
/// that says nothing is revoked: the verifier must not follow, and with no feed it
/// fails closed.
#[tokio::test]
async fn the_revocation_feed_client_does_not_follow_redirects() {
    let key = test_key(7);
    let empty_feed = issuer_with(&key).await;
    let feed_target = empty_feed.url.clone();
    let jwks = key.jwks.clone();
    let issuer = serve(move |path| match path {
        "/.well-known/jwks.json" => ("200 OK", String::new(), jwks.clone()),
        _ => (
            "307 Temporary Redirect",
            format!("location: {feed_target}{path}\r\n"),
            String::new(),
        ),
    })
    .await;
    let v = verifier(&issuer.url);
    let token = sign(&key, &claims(&issuer.url, now(), now() + 600));
    match v.verify(&token).await {
        Err(VerifyError::Fetch { url, detail }) => {
            assert!(url.ends_with("/v1/revocations"), "{url}");
            assert!(detail.contains("307"), "{detail}");
        }
        other => panic!("a redirected revocation feed was followed: {other:?}"),
    }
    assert_eq!(
        empty_feed.requests.load(Ordering::SeqCst),
        0,
        "the verifier fetched the feed from the redirect target"
    );
}
