//! inference-proxy vs direct to the same local upstream, same run: added latency p50/p99
//! at 1, 16 and 64 connections, peak throughput, proxy CPU time per request, and added
//! time to first token on streams. Ledger and audit are on, and every request is
//! authenticated as in production: an identity-manager JWT, verified by the proxy
//! (EdDSA signature, iss/aud/exp/nbf, revocation feed) on each request.
//!
//! ```sh
//! cargo build --release -p clawos-inference-proxy -p clawos-identity-manager
//! cargo bench -p clawos-e2e --bench proxy [-- SECONDS_PER_RUN]
//! ```

use std::time::{Duration, Instant};

use clawos_e2e::fake_llm::FakeAnthropic;
use clawos_e2e::{port, spawn_daemon};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};

const KEY: &str = "sk-bench-host";

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs `conns` clients for `secs` against `url`; returns latencies (ms) and req/s.
async fn run(
    url: &str,
    token: Option<&str>,
    conns: usize,
    secs: f64,
    stream: bool,
) -> (Vec<f64>, f64) {
    let body = if stream {
        r#"{"model":"claude-bench","stream":true,"max_tokens":8,"messages":[{"role":"user","content":"a b c"}]}"#
    } else {
        r#"{"model":"claude-bench","max_tokens":8,"messages":[{"role":"user","content":"a b c"}]}"#
    };
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let url = url.to_owned();
        let key = token.unwrap_or(KEY).to_owned();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .header("x-api-key", &key)
                    .body(body)
                    .send()
                    .await
                    .expect("send");
                assert!(r.status().is_success(), "{url}: {}", r.status());
                let _ = r.bytes().await.expect("body");
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    let rps = all.len() as f64 / started.elapsed().as_secs_f64();
    (all, rps)
}

/// Time to the first body chunk of a stream, `n` times.
async fn ttft(url: &str, token: &str, n: usize) -> Vec<f64> {
    use futures_util::StreamExt;
    let http = reqwest::Client::new();
    let body = r#"{"model":"claude-bench","stream":true,"max_tokens":8,"messages":[{"role":"user","content":"a b c"}]}"#;
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let r = http
            .post(url)
            .header("x-api-key", token)
            .body(body)
            .send()
            .await
            .expect("send");
        assert!(r.status().is_success(), "{url}: {}", r.status());
        let mut s = r.bytes_stream();
        let _ = s.next().await;
        v.push(t.elapsed().as_secs_f64() * 1e3);
        while s.next().await.is_some() {}
    }
    v
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3.0);
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().to_str().expect("utf8");
    let upstream = FakeAnthropic::start(KEY);
    let (id_port, px_port) = (port(), port());
    let identity = spawn_daemon(
        "identity-manager",
        &[
            "--addr",
            &format!("127.0.0.1:{id_port}"),
            "--state-dir",
            state,
        ],
        &[("RUST_LOG", "warn")],
        &work.path().join("identity.log"),
        id_port,
    )
    .expect("identity-manager (cargo build --release -p clawos-identity-manager first)");
    let issuer = format!("http://127.0.0.1:{id_port}");
    let proxy = spawn_daemon(
        "inference-proxy",
        &[
            "--addr",
            &format!("127.0.0.1:{px_port}"),
            "--state-dir",
            state,
            "--rpm",
            "100000000",
        ],
        &[
            ("ANTHROPIC_API_KEY", KEY),
            ("CLAWOS_PROXY_ANTHROPIC_URL", upstream.url.as_str()),
            ("CLAWOS_IDENTITY_ISSUER", issuer.as_str()),
            // The bench is one agent with 64 connections: lift its in-flight cap so
            // it measures the proxy's overhead, not its refusals.
            ("CLAWOS_PROXY_MAX_IN_FLIGHT", "64"),
            ("RUST_LOG", "warn"),
        ],
        &work.path().join("proxy.log"),
        px_port,
    )
    .expect("proxy (cargo build --release -p clawos-inference-proxy first)");
    // For scale only, the development path that skips verification: the same proxy
    // with a static token (`--insecure-dev-tokens`), its own state, compared at 64
    // connections at the end.
    let unverified_state = work.path().join("unverified");
    let tokens = work.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"bench-static-token": "bench-agent"}"#).expect("tokens");
    let uv_port = port();
    let unverified = spawn_daemon(
        "inference-proxy",
        &[
            "--addr",
            &format!("127.0.0.1:{uv_port}"),
            "--state-dir",
            unverified_state.to_str().expect("utf8"),
            "--rpm",
            "100000000",
            "--insecure-dev-tokens",
        ],
        &[
            ("ANTHROPIC_API_KEY", KEY),
            ("CLAWOS_PROXY_ANTHROPIC_URL", upstream.url.as_str()),
            ("CLAWOS_PROXY_STATIC_TOKENS", tokens.to_str().expect("utf8")),
            ("CLAWOS_PROXY_MAX_IN_FLIGHT", "64"),
            ("RUST_LOG", "error"),
        ],
        &work.path().join("unverified.log"),
        uv_port,
    )
    .expect("inference-proxy with static tokens");
    let via_unverified = format!("http://127.0.0.1:{uv_port}/v1/messages");
    let direct = format!("{}/v1/messages", upstream.url);
    let via = format!("http://127.0.0.1:{px_port}/v1/messages");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    // One agent's token, as the launcher would hold it for a VM (an hour: the longest
    // identity-manager issues, so long runs stay inside it).
    let svc = std::fs::read_to_string(work.path().join("identity/service.token"))
        .expect("identity-manager's service credential");
    let token = rt
        .block_on(
            IdentityClient::with_service_token(&issuer, svc.trim()).issue(&IssueRequest {
                agent: "bench-agent".into(),
                vm_id: "vm-bench".into(),
                image_root_hash: String::new(),
                audience: "inference-proxy".into(),
                ttl_secs: Some(3600),
                scopes: vec![],
            }),
        )
        .expect("issue")
        .token;
    let token = token.as_str();
    rt.block_on(async {
        // The proxy verifies: a token it cannot verify is refused. The payload is
        // changed (not the signature's last character, whose low bits base64 may not
        // carry), so the forgery never equals the token.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let first = parts[1].remove(0);
        parts[1].insert(0, if first == 'e' { 'f' } else { 'e' });
        let forged = parts.join(".");
        assert_ne!(forged, token);
        let st = reqwest::Client::new()
            .post(&via)
            .header("x-api-key", forged)
            .body(r#"{"model":"claude-bench","max_tokens":8,"messages":[]}"#)
            .send()
            .await
            .expect("send")
            .status();
        assert_eq!(st.as_u16(), 401, "a forged JWT");
        // Warm both paths (the proxy fetches identity-manager's JWKS on the first).
        run(&direct, None, 4, 0.5, false).await;
        run(&via, Some(token), 4, 0.5, false).await;
        println!("| connections | direct p50 | direct p99 | proxy p50 | proxy p99 | added p50 | added p99 | direct req/s | proxy req/s |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut cpu_line = String::new();
        for conns in [1usize, 16, 64] {
            let (mut d, drps) = run(&direct, None, conns, secs, false).await;
            let before = cpu_ticks(proxy.id());
            let (mut p, prps) = run(&via, Some(token), conns, secs, false).await;
            let ticks = cpu_ticks(proxy.id()) - before;
            let (d50, d99, p50, p99) = (pct(&mut d, 0.5), pct(&mut d, 0.99), pct(&mut p, 0.5), pct(&mut p, 0.99));
            println!(
                "| {conns} | {d50:.3} ms | {d99:.3} ms | {p50:.3} ms | {p99:.3} ms | {:.3} ms | {:.3} ms | {drps:.0} | {prps:.0} |",
                p50 - d50,
                p99 - d99
            );
            if conns == 64 {
                // Clock ticks are 10 ms (USER_HZ 100).
                let us = ticks as f64 * 10_000.0 / p.len() as f64;
                cpu_line = format!("proxy CPU per request at 64 connections: {us:.0} µs ({} requests)", p.len());
            }
        }
        println!("{cpu_line}");
        let mut td = ttft(&direct, KEY, 300).await;
        let mut tp = ttft(&via, token, 300).await;
        println!(
            "time to first byte of a stream, p50 over 300: direct {:.3} ms, proxy {:.3} ms, added {:.3} ms",
            pct(&mut td, 0.5),
            pct(&mut tp, 0.5),
            pct(&mut tp, 0.5) - pct(&mut td, 0.5)
        );
        // What verification costs: 64 connections, alternating, JWT-verified vs the
        // static token, twice each.
        run(&via_unverified, Some("bench-static-token"), 4, 0.5, false).await;
        let mut cmp = [(0u64, 0usize, 0f64); 2];
        for _ in 0..2 {
            for (i, (pid, url, key)) in [
                (proxy.id(), &via, token),
                (unverified.id(), &via_unverified, "bench-static-token"),
            ]
            .into_iter()
            .enumerate()
            {
                let before = cpu_ticks(pid);
                let (lat, rps) = run(url, Some(key), 64, secs, false).await;
                cmp[i].0 += cpu_ticks(pid) - before;
                cmp[i].1 += lat.len();
                cmp[i].2 += rps / 2.0;
            }
        }
        let us = |(ticks, n, _): (u64, usize, f64)| ticks as f64 * 10_000.0 / n as f64;
        println!(
            "64 connections, alternating: JWT-verified {:.0} req/s, {:.0} µs CPU per request; static token (unverified, --insecure-dev-tokens) {:.0} req/s, {:.0} µs",
            cmp[0].2,
            us(cmp[0]),
            cmp[1].2,
            us(cmp[1])
        );
    });
    for mut child in [proxy, unverified, identity] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
