//! What the control plane costs, measured against vm-launcher itself in the same run:
//!
//! 1. added latency of `GET /api/v1/vms` (TLS, operator token, role check, audit record,
//!    then the launcher through its typed client) against `GET /v1/vms` on the
//!    launcher directly, 16 clients on keep-alive connections, rounds alternating —
//!    twice: paced (each client sends on a fixed schedule, together a set rate well
//!    below either side's capacity, so a request's time is the server's work and not
//!    a queue) and saturated (each client sends its next request as soon as the last
//!    is answered, so the box is full and a request's time is mostly waiting for a
//!    core);
//! 2. requests/s at 64 clients, keep-alive, both ways;
//! 3. TLS handshakes/s (a new connection per request, `/healthz`) at 64 clients,
//!    against new plain-TCP connections to the launcher's `/healthz`;
//! 4. the control plane's RSS idle and under load.
//!
//! Client and servers share the machine's cores; every figure is relative to the
//! baseline taken beside it. With `--split-cores` the servers (launcher and control
//! plane) run on CPU 0 and the client on CPU 1, the nearest this machine comes to a
//! client on another machine: the client's work no longer competes with the servers'.
//!
//! ```sh
//! cargo build --release -p clawos-vm-launcher -p clawos-control-plane && scripts/build-guest.sh
//! cargo bench -p clawos-e2e --bench control_plane [-- REQUESTS] [--split-cores]
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

/// One GET of `url`, answered with success, its body read.
async fn get_ok(c: &reqwest::Client, url: &str, token: &str) {
    let r = c.get(url).bearer_auth(token).send().await.expect("request");
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.bytes().await.expect("body");
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
                get_ok(&c, &url, &token).await;
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

/// `per_client` GETs of `url` from each of `clients` tasks on keep-alive connections,
/// every client sending on its own fixed schedule (together `rate` requests/s, the
/// clients' schedules staggered evenly): the latencies, sorted. A request held up by
/// the answer before it is timed from when it was due, so a server that falls behind
/// is charged for the requests it delayed (no coordinated omission).
async fn paced_latencies(
    make: &dyn Fn() -> reqwest::Client,
    url: &str,
    token: &str,
    clients: usize,
    rate: f64,
    per_client: usize,
) -> Vec<Duration> {
    let every = Duration::from_secs_f64(clients as f64 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (c, url, token) = (make(), url.to_owned(), token.to_owned());
        let first = start + every.mul_f64(k as f64 / clients as f64);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_client);
            let mut answered = tokio::time::Instant::now();
            for i in 0..per_client {
                let due = first + every * i as u32;
                tokio::time::sleep_until(due).await;
                // On time, a request is timed from when it went out (Tokio's timer
                // wakes on whole milliseconds; that slack is the client's, not the
                // server's). Late because the last answer came after this one was
                // due, it is timed from when it was due.
                let from = if answered > due {
                    due
                } else {
                    tokio::time::Instant::now()
                };
                get_ok(&c, &url, &token).await;
                answered = tokio::time::Instant::now();
                out.push(answered - from);
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(clients * per_client);
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

/// Prints p50/p99 of both sides and what the control plane adds.
fn report(what: &str, mut direct: Vec<Duration>, mut fronted: Vec<Duration>) {
    direct.sort();
    fronted.sort();
    let (d50, d99, f50, f99) = (
        pct(&direct, 0.5),
        pct(&direct, 0.99),
        pct(&fronted, 0.5),
        pct(&fronted, 0.99),
    );
    println!("{what}, {} requests each:", direct.len());
    println!("  vm-launcher direct   p50 {d50:>10.2?}  p99 {d99:>10.2?}");
    println!("  via control plane    p50 {f50:>10.2?}  p99 {f99:>10.2?}");
    println!(
        "  added                p50 {:>10.2?}  p99 {:>10.2?}  (ratio p99 {:.2})",
        f50.saturating_sub(d50),
        f99.saturating_sub(d99),
        f99.as_secs_f64() / d99.as_secs_f64()
    );
}

/// Keeps the calling thread, and what it starts from now on (threads, processes), on
/// one CPU.
fn pin_to(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; CPU_SET sets one bit in the
    // set we own (it ignores a CPU beyond the set's size); the call reads that set and
    // changes only this thread's affinity. A CPU this process may not use is refused
    // with EINVAL, which the assert reports.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity(CPU {cpu}): {}",
        std::io::Error::last_os_error()
    );
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(4000);
    let split = std::env::args().any(|a| a == "--split-cores");
    if split {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(
            cpus >= 2,
            "--split-cores needs two CPUs, this machine has {cpus}"
        );
        println!("layout: launcher and control plane on CPU 0, the client on CPU 1");
        pin_to(0);
    } else {
        println!("layout: client and servers share every CPU");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = Launcher::start(dir.path()).expect("launcher");
    let cp = ControlPlane::start(dir.path(), &launcher.url, &[]).expect("control plane");
    if split {
        pin_to(1);
    }
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

    // 1a. Latency at c=16, paced below capacity, rounds alternating.
    for rate in [1000.0, 2000.0, 4000.0] {
        let per_round = n / 3 / 16;
        let (mut direct, mut fronted) = (Vec::new(), Vec::new());
        rt.block_on(async {
            paced_latencies(&*plain_client, &lurl, &ltoken, 16, rate, 50).await;
            paced_latencies(&*tls_client, &curl, &ctoken, 16, rate, 50).await;
            for _ in 0..3 {
                direct.extend(
                    paced_latencies(&*plain_client, &lurl, &ltoken, 16, rate, per_round).await,
                );
                fronted.extend(
                    paced_latencies(&*tls_client, &curl, &ctoken, 16, rate, per_round).await,
                );
            }
        });
        report(
            &format!("latency GET vms, c=16 paced at {rate:.0} requests/s"),
            direct,
            fronted,
        );
    }

    // 1c. Where the added time goes, paced at 1,000 requests/s: TLS and HTTP alone
    // (`/healthz`), then the operator's token checked and an audit record written
    // (`whoami`), then the launcher called too (`vms`).
    for (what, path) in [
        ("/healthz (TLS, HTTP)", "/healthz"),
        ("whoami (+ token, audit)", "/api/v1/whoami"),
        ("vms (+ launcher call)", "/api/v1/vms"),
    ] {
        let url = format!("{}{path}", cp.url);
        let mut all = rt.block_on(async {
            paced_latencies(&*tls_client, &url, &ctoken, 16, 1000.0, 50).await;
            paced_latencies(&*tls_client, &url, &ctoken, 16, 1000.0, n / 16).await
        });
        all.sort();
        println!(
            "  control plane {what:<26} p50 {:>10.2?}  p90 {:>10.2?}  p99 {:>10.2?}  max {:>10.2?}",
            pct(&all, 0.5),
            pct(&all, 0.9),
            pct(&all, 0.99),
            all[all.len() - 1]
        );
    }

    // 1b. Latency at c=16, saturated (closed loop), rounds alternating.
    let (mut direct, mut fronted) = (Vec::new(), Vec::new());
    rt.block_on(async {
        latencies(&*plain_client, &lurl, &ltoken, 16, 800).await;
        latencies(&*tls_client, &curl, &ctoken, 16, 800).await;
        for _ in 0..3 {
            direct.extend(latencies(&*plain_client, &lurl, &ltoken, 16, n / 3).await);
            fronted.extend(latencies(&*tls_client, &curl, &ctoken, 16, n / 3).await);
        }
    });
    report("latency GET vms, c=16 saturated", direct, fronted);

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
