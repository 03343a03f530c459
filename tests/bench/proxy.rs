//! inference-proxy vs direct to the same local upstream, same run: added latency p50/p99
//! at 1, 16 and 64 connections, peak throughput, proxy CPU time per request, and added
//! time to first token on streams. Ledger and audit are on.
//!
//! ```sh
//! cargo build --release -p clawos-inference-proxy
//! cargo bench -p clawos-e2e --bench proxy [-- SECONDS_PER_RUN]
//! ```

use std::time::{Duration, Instant};

use clawos_e2e::fake_llm::FakeAnthropic;
use clawos_e2e::{port, spawn_daemon};

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
    let upstream = FakeAnthropic::start(KEY);
    let tokens = work.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"bench-token": "bench-agent"}"#).expect("tokens");
    let px_port = port();
    let proxy = spawn_daemon(
        "inference-proxy",
        &[
            "--addr",
            &format!("127.0.0.1:{px_port}"),
            "--state-dir",
            work.path().to_str().expect("utf8"),
            "--rpm",
            "100000000",
        ],
        &[
            ("ANTHROPIC_API_KEY", KEY),
            ("CLAWOS_PROXY_ANTHROPIC_URL", upstream.url.as_str()),
            ("CLAWOS_PROXY_STATIC_TOKENS", tokens.to_str().expect("utf8")),
            // The bench is one agent with 64 connections: lift its in-flight cap so
            // it measures the proxy's overhead, not its refusals.
            ("CLAWOS_PROXY_MAX_IN_FLIGHT", "64"),
            ("RUST_LOG", "warn"),
        ],
        &work.path().join("proxy.log"),
        px_port,
    )
    .expect("proxy (cargo build --release -p clawos-inference-proxy first)");
    let direct = format!("{}/v1/messages", upstream.url);
    let via = format!("http://127.0.0.1:{px_port}/v1/messages");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        // Warm both paths.
        run(&direct, None, 4, 0.5, false).await;
        run(&via, Some("bench-token"), 4, 0.5, false).await;
        println!("| connections | direct p50 | direct p99 | proxy p50 | proxy p99 | added p50 | added p99 | direct req/s | proxy req/s |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut cpu_line = String::new();
        for conns in [1usize, 16, 64] {
            let (mut d, drps) = run(&direct, None, conns, secs, false).await;
            let before = cpu_ticks(proxy.id());
            let (mut p, prps) = run(&via, Some("bench-token"), conns, secs, false).await;
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
        let mut tp = ttft(&via, "bench-token", 300).await;
        println!(
            "time to first byte of a stream, p50 over 300: direct {:.3} ms, proxy {:.3} ms, added {:.3} ms",
            pct(&mut td, 0.5),
            pct(&mut tp, 0.5),
            pct(&mut tp, 0.5) - pct(&mut td, 0.5)
        );
    });
    let mut proxy = proxy;
    let _ = proxy.kill();
    let _ = proxy.wait();
}
