//! What the control plane costs, measured against vm-launcher itself in the same run:
//!
//! 1. added latency of `GET /api/v1/vms` (TLS, operator token, role check, audit record,
//!    then the launcher through its typed client) against `GET /v1/vms` on the
//!    launcher directly, 16 clients on keep-alive connections, rounds alternating;
//! 2. requests/s at 64 clients, keep-alive, both ways;
//! 3. TLS handshakes/s (a new connection per request, `/healthz`) at 64 clients,
//!    against new plain-TCP connections to the launcher's `/healthz`;
//! 4. the control plane's RSS idle and under load.
//!
//! Client and servers share the machine's cores; every figure is relative to the
//! baseline taken beside it.
//!
//! ```sh
//! cargo build --release -p clawos-vm-launcher -p clawos-control-plane && scripts/build-guest.sh
//! cargo bench -p clawos-e2e --bench control_plane [-- REQUESTS]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clawos_control_plane_api::ServerTrust;
use clawos_e2e::stack::ControlPlane;
use clawos_e2e::{Launcher, rss_kib, runtime};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `n` GETs of `url` from `clients` tasks, each on its own keep-alive client: the
/// latencies, sorted.
async fn latencies(
    make: &dyn Fn() -> reqwest::Client,
    url: &str,
    token: &str,
    clients: usize,
    n: usize,
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (c, url, token) = (make(), url.to_owned(), token.to_owned());
        let per = n / clients;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let r = c
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("request");
                assert!(r.status().is_success(), "{url}: {}", r.status());
                r.bytes().await.expect("body");
                out.push(t.elapsed());
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    all
}

/// Requests per second over `secs` from `clients` tasks; `fresh` makes a new client
/// (a new connection) for every request.
async fn throughput(
    make: Arc<dyn Fn() -> reqwest::Client + Send + Sync>,
    url: &str,
    token: &str,
    clients: usize,
    secs: u64,
    fresh: bool,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (make, url, token, done) = (
            Arc::clone(&make),
            url.to_owned(),
            token.to_owned(),
            Arc::clone(&done),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = make();
            while Instant::now() < end {
                if fresh {
                    c = make();
                }
                let r = c
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("request");
                assert!(r.status().is_success());
                r.bytes().await.expect("body");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(4000);
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = Launcher::start(dir.path()).expect("launcher");
    let cp = ControlPlane::start(dir.path(), &launcher.url, &[]).expect("control plane");
    let (ltoken, ctoken) = (launcher.token(), cp.admin_token());
    let trust = ServerTrust::Ca(std::fs::read(cp.ca()).expect("ca"));
    let tls_client: Arc<dyn Fn() -> reqwest::Client + Send + Sync> = {
        let t = trust.clone();
        Arc::new(move || t.http_client().expect("client"))
    };
    let plain_client: Arc<dyn Fn() -> reqwest::Client + Send + Sync> = Arc::new(|| {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    });
    let rt = runtime();
    let lurl = format!("{}/v1/vms", launcher.url);
    let curl = format!("{}/api/v1/vms", cp.url);
    let idle = rss_kib(cp.pid());

    // 1. Latency at c=16, rounds alternating.
    let (mut direct, mut fronted) = (Vec::new(), Vec::new());
    rt.block_on(async {
        latencies(&*plain_client, &lurl, &ltoken, 16, 800).await;
        latencies(&*tls_client, &curl, &ctoken, 16, 800).await;
        for _ in 0..3 {
            direct.extend(latencies(&*plain_client, &lurl, &ltoken, 16, n / 3).await);
            fronted.extend(latencies(&*tls_client, &curl, &ctoken, 16, n / 3).await);
        }
    });
    direct.sort();
    fronted.sort();
    let (d50, d99, f50, f99) = (
        pct(&direct, 0.5),
        pct(&direct, 0.99),
        pct(&fronted, 0.5),
        pct(&fronted, 0.99),
    );
    println!("latency GET vms, c=16, {} requests each:", direct.len());
    println!("  vm-launcher direct   p50 {d50:>10.2?}  p99 {d99:>10.2?}");
    println!("  via control plane    p50 {f50:>10.2?}  p99 {f99:>10.2?}");
    println!(
        "  added                p50 {:>10.2?}  p99 {:>10.2?}  (ratio p99 {:.2})",
        f50.saturating_sub(d50),
        f99.saturating_sub(d99),
        f99.as_secs_f64() / d99.as_secs_f64()
    );

    // 2. Keep-alive requests/s at c=64, and the RSS under that load.
    let peak = Arc::new(AtomicU64::new(0));
    let (rps_direct, rps_cp) = rt.block_on(async {
        let d = throughput(Arc::clone(&plain_client), &lurl, &ltoken, 64, 5, false).await;
        let (pid, peak2) = (cp.pid(), Arc::clone(&peak));
        let sampler = tokio::spawn(async move {
            loop {
                peak2.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let c = throughput(Arc::clone(&tls_client), &curl, &ctoken, 64, 5, false).await;
        sampler.abort();
        (d, c)
    });
    println!(
        "requests/s GET vms, c=64, keep-alive: launcher {rps_direct:.0}, control plane {rps_cp:.0} (ratio {:.2})",
        rps_cp / rps_direct
    );

    // 3. New connections per second at c=64: TLS handshakes vs plain TCP.
    let (plain_conn, tls_conn) = rt.block_on(async {
        let p = throughput(
            Arc::clone(&plain_client),
            &format!("{}/healthz", launcher.url),
            &ltoken,
            64,
            5,
            true,
        )
        .await;
        let t = throughput(
            Arc::clone(&tls_client),
            &format!("{}/healthz", cp.url),
            &ctoken,
            64,
            5,
            true,
        )
        .await;
        (p, t)
    });
    println!(
        "new connections/s, /healthz, c=64: plain TCP to the launcher {plain_conn:.0}, TLS handshakes to the control plane {tls_conn:.0} (ratio {:.2})",
        tls_conn / plain_conn
    );
    println!(
        "control-plane RSS: idle {} MiB, peak under load {} MiB",
        idle / 1024,
        peak.load(Ordering::Relaxed) / 1024
    );
    let audit_lines = std::fs::read_to_string(cp.state.join("control-plane/audit.jsonl"))
        .map_or(0, |s| s.lines().count());
    println!("audit records written: {audit_lines}");
}
