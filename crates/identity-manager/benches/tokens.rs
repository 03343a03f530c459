//! Tokens issued and verified per second on one core, against raw Ed25519 sign/verify
//! of the same bytes in the same run, and the latency of `POST /v1/tokens` over HTTP.
//!
//! `cargo bench -p clawos-identity-manager --bench tokens [-- N]`

use std::time::{Duration, Instant};

use clawos_agent_token::{Verifier, VerifierConfig};
use clawos_identity_manager::{Config, Identity, IssuerConfig, MasterKey, MasterKeySource};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};
use ed25519_dalek::{Signer, SigningKey, Verifier as _};

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let issuer = IssuerConfig::new(&url, "bench.local");
    let id = Identity::open(
        &dir.path().join("bench.db"),
        MasterKey::generate().expect("key"),
        issuer.clone(),
    )
    .expect("open");
    let req = IssueRequest {
        agent: "bench-agent".into(),
        vm_id: "vm-bench".into(),
        image_root_hash: "ab".repeat(32),
        audience: "inference-proxy".into(),
        ttl_secs: Some(900),
        scopes: vec!["llm:invoke".into()],
    };

    // Baseline: raw Ed25519 over a payload of the token's size.
    let sk = SigningKey::from_bytes(&[7; 32]);
    let sample = id.issue(&req).expect("issue").token;
    let msg = vec![b'x'; sample.len()];
    let t = Instant::now();
    let sigs: Vec<_> = (0..n).map(|_| sk.sign(&msg)).collect();
    let raw_sign = rate(n, t.elapsed());
    let vk = sk.verifying_key();
    let t = Instant::now();
    for s in &sigs {
        vk.verify(&msg, s).expect("verify");
    }
    let raw_verify = rate(n, t.elapsed());

    let t = Instant::now();
    let tokens: Vec<String> = (0..n)
        .map(|_| id.issue(&req).expect("issue").token)
        .collect();
    let issue = rate(n, t.elapsed());
    drop(id);

    // Serve over HTTP, then verify with the shared verifier (JWKS cached, feed polled).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    let service_token = "b".repeat(40);
    let cfg = Config {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        db_path: dir.path().join("http.db"),
        master: MasterKeySource::Hex("11".repeat(32)),
        issuer,
        service_token: service_token.clone(),
    };
    rt.spawn(async move { clawos_identity_manager::run(cfg, std::future::pending()).await });
    let (verify, p50, p99) = rt.block_on(async {
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
        let body = IssueRequest {
            agent: "bench-agent".into(),
            vm_id: "vm".into(),
            image_root_hash: String::new(),
            audience: "inference-proxy".into(),
            ttl_secs: None,
            scopes: vec![],
        };
        let mut lat = Vec::new();
        let mut fresh = Vec::new();
        for i in 0..2000 {
            let t = Instant::now();
            let issued = client.issue(&body).await.expect("issue");
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            if i < n.min(2000) {
                fresh.push(issued.token);
            }
        }
        lat.sort_by(f64::total_cmp);
        let v = Verifier::new(VerifierConfig {
            revocation_poll: Duration::from_secs(3600),
            ..VerifierConfig::new(&url, "inference-proxy")
        });
        v.verify(&fresh[0]).await.expect("warm");
        let rounds = n / fresh.len().max(1) + 1;
        let t = Instant::now();
        let mut count = 0;
        for _ in 0..rounds {
            for tok in &fresh {
                v.verify(tok).await.expect("verify");
                count += 1;
            }
        }
        (
            rate(count, t.elapsed()),
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
        )
    });
    let _ = tokens;
    println!("raw Ed25519 on one core: sign {raw_sign:.0}/s, verify {raw_verify:.0}/s");
    println!(
        "issue (claims, sign, agent key lookup, SQLite) {issue:.0}/s = {:.2} of raw sign",
        issue / raw_sign
    );
    println!(
        "verify (clawos-agent-token, JWKS cached) {verify:.0}/s = {:.2} of raw verify",
        verify / raw_verify
    );
    println!(
        "POST /v1/tokens over HTTP/1.1 on loopback, 1 connection: p50 {p50:.3} ms, p99 {p99:.3} ms"
    );
}
