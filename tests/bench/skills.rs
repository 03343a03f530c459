//! What running a skill costs, against a native call doing the same work in the same
//! run: the echo skill (`tests/e2e/skills/echo.c`: read a setting, build the answer,
//! log a line) in the real runtime — a fresh store and instance per call, as the
//! skill-manager runs every call — against the same work as a Rust function.
//!
//! 1. compile (cranelift) vs load from the compiled cache;
//! 2. cold call (first call after a load from the cache) and warm call latency
//!    p50/p99 (compiled and linked; instantiate + invoke), one caller;
//! 3. calls/s with 1, 2 and 8 concurrent callers;
//! 4. memory per concurrent instance: 64 calls of the fetch skill waiting on a slow
//!    loopback server at once, RSS before and while they wait.
//!
//! ```sh
//! cargo build --release -p clawos-skill-build
//! cargo bench -p clawos-e2e --bench skills [-- CALLS]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_e2e::skills::component;
use clawos_skill_manager::manifest::SkillManifest;
use clawos_skill_manager::outbound::Outbound;
use clawos_skill_manager::runtime::{LoadedSkill, SkillRuntime};

fn manifest(name: &str, extra: &str) -> SkillManifest {
    SkillManifest::parse(&format!(
        "name = \"{name}\"\nversion = \"1\"\ndescription = \"bench\"\n\
         [input_schema]\ntype = \"object\"\n{extra}"
    ))
    .expect("manifest")
}

fn rss_kib() -> u64 {
    clawos_e2e::rss_kib(std::process::id())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The echo skill's work, natively.
#[inline(never)]
fn native_echo(config: &BTreeMap<String, String>, input: &str, log: &mut Vec<String>) -> String {
    let g = config.get("greeting").map_or("", String::as_str);
    let out = format!("{g}:{input}");
    log.push("echoed".to_owned());
    out
}

async fn call(rt: &SkillRuntime, s: &LoadedSkill, config: &Arc<BTreeMap<String, String>>) {
    let out = rt
        .invoke(s, "{\"q\":\"bench\"}", Vec::new(), Arc::clone(config))
        .await;
    assert_eq!(out.result.expect("echo"), "hi:{\"q\":\"bench\"}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let cache = tempfile::tempdir().expect("cache");
    let outbound = Outbound::new(&HashMap::new()).expect("outbound");
    let rt = Arc::new(SkillRuntime::new(Some(cache.path()), outbound).expect("runtime"));
    let m = manifest("echo", "[config]\ngreeting = \"hi\"\n");
    let config = Arc::new(m.config.clone());
    let wasm = component("echo", "skill");

    // 1. compile vs cache.
    let t = Instant::now();
    let compiled = rt.load(&m, &wasm).expect("compile");
    let compile = t.elapsed();
    assert!(!compiled.from_cache);
    let t = Instant::now();
    let skill = rt.load(&m, &wasm).expect("from cache");
    let from_cache = t.elapsed();
    assert!(skill.from_cache);

    // 2. cold, then warm, one caller; the native baseline beside it.
    let t = Instant::now();
    call(&rt, &skill, &config).await;
    let cold = t.elapsed();
    let mut warm = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        call(&rt, &skill, &config).await;
        warm.push(t.elapsed());
    }
    let mut native = Vec::with_capacity(calls);
    let mut log = Vec::new();
    for _ in 0..calls {
        let t = Instant::now();
        let out = native_echo(&config, std::hint::black_box("{\"q\":\"bench\"}"), &mut log);
        std::hint::black_box(out);
        native.push(t.elapsed());
        log.clear();
    }
    let (w50, w99) = (pct(&mut warm, 0.5), pct(&mut warm, 0.99));
    let (n50, n99) = (pct(&mut native, 0.5), pct(&mut native, 0.99));

    // 3. throughput.
    let mut rates = Vec::new();
    for conc in [1usize, 2, 8] {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conc {
            let (rt, skill, config) = (Arc::clone(&rt), skill.clone(), Arc::clone(&config));
            let per = calls / conc;
            tasks.push(tokio::spawn(async move {
                for _ in 0..per {
                    call(&rt, &skill, &config).await;
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        rates.push((
            conc,
            (calls / conc * conc) as f64 / t.elapsed().as_secs_f64(),
        ));
    }

    // 4. memory per waiting instance.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "ok"
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let fm = manifest(
        "fetch",
        &format!("[capabilities.http]\nallow = [\"http://127.0.0.1:{port}\"]\n"),
    );
    let fetch = rt.load(&fm, &component("fetch", "skill")).expect("fetch");
    let n = 64;
    let before = rss_kib();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (rt, fetch) = (Arc::clone(&rt), fetch.clone());
        let url = format!("http://127.0.0.1:{port}/slow");
        tasks.push(tokio::spawn(async move {
            rt.invoke(&fetch, &url, Vec::new(), Arc::default()).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during = rss_kib();
    for task in tasks {
        let out = task.await.expect("task");
        assert_eq!(out.result.expect("fetch"), "200 ok");
    }

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("skill runtime, {calls} calls (echo skill vs the same work natively)");
    println!(
        "compile {:.1} ms; load from the compiled cache {:.2} ms ({:.0}x faster)",
        compile.as_secs_f64() * 1e3,
        from_cache.as_secs_f64() * 1e3,
        compile.as_secs_f64() / from_cache.as_secs_f64()
    );
    println!("cold call (after a cache load) {:.0} µs", us(cold));
    println!(
        "warm call p50 {:.0} µs, p99 {:.0} µs; native p50 {:.2} µs, p99 {:.2} µs; \
         ratio p50 {:.0}x",
        us(w50),
        us(w99),
        us(n50),
        us(n99),
        us(w50) / us(n50).max(0.001)
    );
    for (conc, rate) in rates {
        println!("calls/s with {conc} callers: {rate:.0}");
    }
    println!(
        "{n} instances waiting on HTTP at once: RSS {} → {} KiB, {:.0} KiB per instance",
        before,
        during,
        (during.saturating_sub(before)) as f64 / n as f64
    );
}
