//! The skill sandbox against hostile components: each test builds a purpose-made C
//! component (`tests/e2e/skills/`) with the real `clawos-skill-build` and runs it in
//! the real runtime (wasmtime, the skill-manager's linker and outbound HTTP hook)
//! against real HTTP servers on loopback. A refusal must be clear and must not stop
//! the runtime from serving other calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::Query;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use clawos_e2e::skills::{component, web_search};
use clawos_skill_manager::SkillError;
use clawos_skill_manager::manifest::SkillManifest;
use clawos_skill_manager::outbound::{Outbound, RequestLog, SecretHeader, UNFINISHED};
use clawos_skill_manager::runtime::{LoadedSkill, SkillRuntime};

const SECRET: &str = "sk-test-7f3a9c1e5b2d4068";

fn manifest(name: &str, extra: &str) -> SkillManifest {
    SkillManifest::parse(&format!(
        "name = \"{name}\"\nversion = \"1\"\ndescription = \"test\"\n\
         [input_schema]\ntype = \"object\"\n{extra}"
    ))
    .expect("manifest")
}

/// A loopback HTTP server counting its requests: `/hello`, `/redirect?to=URL`,
/// `/big` (1 GiB, streamed), `/echo-key` (answers the `x-api-key` it got).
async fn upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&hits);
    let app = axum::Router::new()
        .route("/hello", axum::routing::get(|| async { "hello" }))
        .route(
            "/redirect",
            axum::routing::get(|Query(q): Query<HashMap<String, String>>| async move {
                (
                    axum::http::StatusCode::FOUND,
                    [(
                        axum::http::header::LOCATION,
                        q.get("to").cloned().unwrap_or_default(),
                    )],
                )
                    .into_response()
            }),
        )
        .route(
            "/big",
            axum::routing::get(|| async {
                let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
                let stream = futures_util::stream::iter(
                    (0..(1u64 << 30) / (64 << 10))
                        .map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                axum::body::Body::from_stream(stream)
            }),
        )
        .route(
            "/echo-key",
            axum::routing::get(|h: HeaderMap| async move {
                let key = h
                    .get("x-api-key")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                ([("x-echo", key.clone())], format!("key={key}"))
            }),
        )
        .route(
            "/echo-key-encoded",
            axum::routing::get(|h: HeaderMap| async move {
                // The key, said to be compressed: redaction could not read it.
                let key = h
                    .get("x-api-key")
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                ([("content-encoding", "gzip")], key)
            }),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let hits = Arc::clone(&counted);
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    next.run(req).await
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

struct Fixture {
    runtime: SkillRuntime,
    _cache: tempfile::TempDir,
}

/// A runtime whose outbound client resolves `search.test` and `search.local` to
/// loopback.
fn runtime() -> Fixture {
    let cache = tempfile::tempdir().expect("cache");
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let resolve = HashMap::from([
        ("search.test".to_owned(), loopback),
        ("search.local".to_owned(), loopback),
    ]);
    let runtime = SkillRuntime::new(
        Some(cache.path()),
        Outbound::new(&resolve).expect("outbound"),
    )
    .expect("runtime");
    Fixture {
        runtime,
        _cache: cache,
    }
}

fn load(f: &Fixture, name: &str, world: &str, extra: &str) -> LoadedSkill {
    f.runtime
        .load(&manifest(name, extra), &component(name, world))
        .expect("load")
}

async fn invoke(f: &Fixture, s: &LoadedSkill, input: &str) -> Result<String, SkillError> {
    f.runtime
        .invoke(s, input, Vec::new(), Arc::new(s.manifest.config.clone()))
        .await
        .result
}

#[tokio::test(flavor = "multi_thread")]
async fn a_skill_answers_logs_reads_its_settings_and_is_cached_compiled() {
    let f = runtime();
    let m = manifest("echo", "[config]\ngreeting = \"hi\"\n");
    let wasm = component("echo", "skill");
    let s = f.runtime.load(&m, &wasm).expect("load");
    assert!(!s.from_cache);
    let d = f.runtime.describe(&s).await;
    assert_eq!(d.result.expect("describe"), "Echoes its input.");
    let out = f
        .runtime
        .invoke(&s, "{\"q\":1}", Vec::new(), Arc::new(m.config.clone()))
        .await;
    assert_eq!(out.result.expect("invoke"), "hi:{\"q\":1}");
    assert_eq!(out.log.len(), 1, "{:?}", out.log);
    assert_eq!(out.log[0].1, "echoed");
    // A second load of the same component comes from the compiled cache.
    let again = f.runtime.load(&m, &wasm).expect("load again");
    assert!(again.from_cache);
    assert_eq!(invoke(&f, &again, "x").await.expect("cached"), "hi:x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_stopped_at_its_deadline_while_others_are_served() {
    // Two worker threads, like the daemon's, and more spinning calls than workers: a
    // component spinning in wasm must not hold a thread.
    let f = Arc::new(runtime());
    let spin = load(&f, "spin", "skill", "[limits]\ntimeout_ms = 2000\n");
    let echo = load(&f, "echo", "skill", "");
    let started = Instant::now();
    let spinning: Vec<_> = (0..3)
        .map(|_| {
            let (f, spin) = (Arc::clone(&f), spin.clone());
            tokio::spawn(async move { invoke(&f, &spin, "").await })
        })
        .collect();
    // While they spin, another skill answers at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let answered = {
        // On a worker thread, like every request the daemon serves.
        let (f, echo) = (Arc::clone(&f), echo.clone());
        tokio::spawn(async move { invoke(&f, &echo, "x").await })
    };
    assert_eq!(answered.await.expect("join").expect("echo"), ":x");
    let echo_ms = t.elapsed().as_millis();
    for s in spinning {
        let r = s.await.expect("join");
        assert!(
            matches!(r, Err(SkillError::Timeout { limit_ms: 2000 })),
            "{r:?}"
        );
    }
    let took = started.elapsed();
    eprintln!("3 spinning calls stopped after {took:?}; echo answered in {echo_ms} ms meanwhile");
    assert!(
        echo_ms < 1000,
        "echo waited {echo_ms} ms behind the spinning calls"
    );
    // All three at once (not one after another, waiting for a thread).
    assert!(took < Duration::from_millis(3500), "stopped after {took:?}");
    // And the runtime still runs it again.
    assert!(matches!(
        invoke(&f, &spin, "").await,
        Err(SkillError::Timeout { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn fuel_runs_out_before_the_deadline() {
    let f = runtime();
    let spin = load(
        &f,
        "spin",
        "skill",
        "[limits]\ntimeout_ms = 60000\nfuel = 5000000\n",
    );
    let t = Instant::now();
    let r = invoke(&f, &spin, "").await;
    assert!(
        matches!(r, Err(SkillError::OutOfFuel { fuel: 5_000_000 })),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn growing_past_the_memory_cap_is_stopped() {
    let f = runtime();
    let hog = load(&f, "hog", "skill", "[limits]\nmemory_mib = 16\n");
    let r = invoke(&f, &hog, "").await;
    assert!(
        matches!(r, Err(SkillError::MemoryLimit { limit_mib: 16 })),
        "{r:?}"
    );
    let msg = r.expect_err("refused").to_string();
    assert!(msg.contains("16 MiB"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn files_environment_and_sockets_are_out_of_reach() {
    let f = runtime();
    let snoop = load(&f, "snoop", "skill", "");
    let out = invoke(&f, &snoop, "").await.expect("snoop answers");
    eprintln!("snoop found: {out}");
    assert!(!out.contains("opened"), "a file was opened: {out}");
    assert!(out.contains("env vars 0; HOME (none)"), "{out}");

    let socket = load(&f, "socket", "socket", "");
    let r = invoke(&f, &socket, "").await;
    match r {
        Err(SkillError::Failed { message }) => {
            assert!(message.starts_with("no socket"), "{message}")
        }
        other => panic!("a socket was opened: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_importing_what_skills_do_not_get_is_refused_at_load() {
    let f = runtime();
    let wat = br#"(component (import "evil:host/backdoor" (instance (export "open" (func)))))"#;
    let e = f
        .runtime
        .load(&manifest("evil", ""), wat)
        .expect_err("refused");
    assert!(matches!(e, SkillError::Component { .. }), "{e:?}");
    assert!(e.to_string().contains("evil:host/backdoor"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn outgoing_http_reaches_exactly_what_the_manifest_allows() {
    let f = runtime();
    let (allowed, _) = upstream().await;
    let (other, other_hits) = upstream().await;
    let fetch = load(
        &f,
        "fetch",
        "skill",
        &format!(
            "[capabilities.http]\nallow = [\"http://search.test:{}\"]\n[limits]\nresponse_kib = 256\n",
            allowed.port()
        ),
    );
    let name = format!("http://search.test:{}", allowed.port());
    let ok = f
        .runtime
        .invoke(&fetch, &format!("{name}/hello"), Vec::new(), Arc::default())
        .await;
    assert_eq!(ok.result.expect("allowed"), "200 hello");
    assert_eq!(ok.requests.len(), 1);
    assert!(ok.requests[0].allowed);

    let refusals = [
        // Another port of the same machine.
        format!("http://127.0.0.1:{}/hello", other.port()),
        // The allowed name's own address, as an IP literal.
        format!("http://127.0.0.1:{}/hello", allowed.port()),
        // HTTPS to the allowed host:port (only plain HTTP is allowed there).
        format!("https://search.test:{}/hello", allowed.port()),
    ];
    for url in &refusals {
        let out = f
            .runtime
            .invoke(&fetch, url, Vec::new(), Arc::default())
            .await;
        match &out.result {
            Err(SkillError::Failed { message }) => {
                assert_eq!(message, "http-request-denied", "{url}")
            }
            other => panic!("{url} was not refused: {other:?}"),
        }
        assert_eq!(out.requests.len(), 1);
        assert!(!out.requests[0].allowed);
    }
    // A redirect from the allowed host to a refused one: the component follows it
    // itself, and the second request is checked like the first.
    let to = format!("http://127.0.0.1:{}/hello", other.port());
    let out = f
        .runtime
        .invoke(
            &fetch,
            &format!("{name}/redirect?to={to}"),
            Vec::new(),
            Arc::default(),
        )
        .await;
    match &out.result {
        Err(SkillError::Failed { message }) => {
            assert!(message.ends_with("http-request-denied"), "{message}")
        }
        other => panic!("the redirect was followed: {other:?}"),
    }
    assert_eq!(
        out.requests.iter().map(|r| r.allowed).collect::<Vec<_>>(),
        [true, false]
    );
    assert_eq!(
        other_hits.load(Ordering::SeqCst),
        0,
        "a refused server was reached"
    );

    // A 1 GiB answer is cut at the manifest's 256 KiB, as an error, quickly.
    let t = Instant::now();
    let big = f
        .runtime
        .invoke(&fetch, &format!("{name}/big"), Vec::new(), Arc::default())
        .await;
    match &big.result {
        Err(SkillError::Failed { message }) => {
            assert_eq!(message, "http-response-body-size")
        }
        other => panic!("the big response was not cut: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// A call given up while its request is out (the agent went away): the request stays
/// in the call's record, allowed and unfinished, so the audit says where it went.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_still_out_when_the_call_is_given_up_stays_in_its_record() {
    let f = runtime();
    // Accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            open.push(c);
        }
    });
    let fetch = load(
        &f,
        "fetch",
        "skill",
        &format!("[capabilities.http]\nallow = [\"http://search.test:{port}\"]\n"),
    );
    let log = RequestLog::default();
    {
        let url = format!("http://search.test:{port}/slow");
        let call =
            f.runtime
                .invoke_recording(&fetch, &url, Vec::new(), Arc::default(), Arc::clone(&log));
        tokio::pin!(call);
        let waited = Instant::now();
        while log.lock().expect("log").is_empty() {
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "the request never went out"
            );
            tokio::select! {
                out = &mut call => panic!("answered by a server that never answers: {:?}", out.result),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        // Given up here: the call's future is dropped with its request out.
    }
    let seen = log.lock().expect("log").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].destination, format!("http://search.test:{port}"));
    assert!(seen[0].allowed);
    assert_eq!(seen[0].status, None);
    assert_eq!(seen[0].error.as_deref(), Some(UNFINISHED));
    held.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_secret_reaches_the_upstream_but_never_the_component() {
    let f = runtime();
    let (allowed, _) = upstream().await;
    let fetch = load(
        &f,
        "fetch",
        "skill",
        &format!(
            // Plain http with a secret: only to a loopback address (a name could
            // resolve anywhere).
            "[capabilities.http]\nallow = [\"http://127.0.0.1:{}\"]\n\
             [[capabilities.secrets]]\nname = \"API_KEY\"\nheader = \"X-Api-Key\"\n",
            allowed.port()
        ),
    );
    // The fetch skill asking `path` of the upstream, with the host's key.
    let fetch_with_key = |path: &str| {
        let secret = SecretHeader::for_grant(&fetch.manifest.capabilities.secrets[0], SECRET)
            .expect("secret header");
        let url = format!("http://127.0.0.1:{}{path}", allowed.port());
        let (f, fetch) = (&f, &fetch);
        async move {
            f.runtime
                .invoke(fetch, &url, vec![secret], Arc::default())
                .await
        }
    };
    let out = fetch_with_key("/echo-key").await;
    let answer = out.result.expect("fetch");
    // The upstream got it (it echoed something), the component saw only the mark.
    assert_eq!(answer, "200 key=[redacted]");
    assert!(!format!("{:?} {:?}", out.requests, out.log).contains(SECRET));
    // An answer redaction cannot read (compressed) never reaches the component.
    let out = fetch_with_key("/echo-key-encoded").await;
    match &out.result {
        Err(SkillError::Failed { message }) => {
            assert_eq!(message, "http-response-content-coding")
        }
        other => panic!("an encoded answer carrying the key was handed over: {other:?}"),
    }
}

/// A stand-in search backend speaking SearXNG's and Brave's JSON: 12 results for any
/// query, with quotes, a newline and non-ASCII text in them; Brave's route answers
/// only with the right `X-Subscription-Token`.
async fn search_backend() -> SocketAddr {
    fn results(q: &str) -> Vec<serde_json::Value> {
        (1..=12)
            .map(|i| {
                serde_json::json!({
                    "title": format!("Result {i} for {q}"),
                    "url": format!("https://example.org/{i}"),
                    "content": format!("snippet {i}: \"quoted\"\nnaïve café"),
                    "description": format!("brave snippet {i}"),
                })
            })
            .collect()
    }
    let app = axum::Router::new()
        .route(
            "/search",
            axum::routing::get(|Query(q): Query<HashMap<String, String>>| async move {
                assert_eq!(q.get("format").map(String::as_str), Some("json"));
                let query = q.get("q").cloned().unwrap_or_default();
                axum::Json(serde_json::json!({"query": query, "results": results(&query)}))
            }),
        )
        .route(
            "/res/v1/web/search",
            axum::routing::get(
                |h: HeaderMap, Query(q): Query<HashMap<String, String>>| async move {
                    if h.get("x-subscription-token").map(|v| v.as_bytes())
                        != Some(SECRET.as_bytes())
                    {
                        return axum::http::StatusCode::UNAUTHORIZED.into_response();
                    }
                    let query = q.get("q").cloned().unwrap_or_default();
                    axum::Json(serde_json::json!({"web": {"results": results(&query)}}))
                        .into_response()
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn the_web_search_skill_answers_from_searxng_and_brave_shaped_backends() {
    let f = runtime();
    let backend = search_backend().await;
    let (wasm, text) = web_search();
    // The shipped manifest, pointed at the stand-in's port (search.local resolves to
    // loopback in this runtime) for both backends.
    let local = format!("search.local:{}", backend.port());
    // Brave's key may go over plain http only to a loopback address.
    let brave_local = format!("127.0.0.1:{}", backend.port());
    let text = text.replace("search.local:8888", &local).replace(
        "\"api.search.brave.com:443\"",
        &format!("\"http://{brave_local}\""),
    );
    let m = SkillManifest::parse(&text).expect("the shipped manifest");
    let mut m_for_test = m.clone();
    // Brave's key goes only where the manifest says; here that is the stand-in.
    m_for_test.capabilities.secrets[0].to = vec![format!("http://{brave_local}")];
    let s = f.runtime.load(&m_for_test, &wasm).expect("load web-search");

    let out = f
        .runtime
        .invoke(
            &s,
            r#"{"query": "rust \"wasm\" & more", "count": 3}"#,
            Vec::new(),
            Arc::new(m.config.clone()),
        )
        .await;
    let answer: serde_json::Value =
        serde_json::from_str(&out.result.expect("search")).expect("the answer is JSON");
    assert_eq!(answer["backend"], "searxng");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["title"], "Result 1 for rust \"wasm\" & more");
    assert_eq!(results[0]["url"], "https://example.org/1");
    assert_eq!(results[0]["snippet"], "snippet 1: \"quoted\"\nnaïve café");
    assert_eq!(out.requests.len(), 1);
    assert!(
        out.log.iter().any(|(_, l)| l == "3 results from searxng"),
        "{:?}",
        out.log
    );

    // Brave: the key is added by the host; the component never had it.
    let mut brave = m.config.clone();
    brave.insert("backend".into(), "brave".into());
    brave.insert("url".into(), format!("http://{brave_local}"));
    let key = SecretHeader::for_grant(&m_for_test.capabilities.secrets[0], SECRET).expect("key");
    let out = f
        .runtime
        .invoke(&s, r#"{"query": "x"}"#, vec![key], Arc::new(brave.clone()))
        .await;
    let answer: serde_json::Value =
        serde_json::from_str(&out.result.expect("brave search")).expect("JSON");
    assert_eq!(answer["backend"], "brave");
    assert_eq!(answer["results"].as_array().map(Vec::len), Some(5));
    assert_eq!(answer["results"][0]["snippet"], "brave snippet 1");
    // Without the key the backend refuses, and the skill says so.
    let out = f
        .runtime
        .invoke(&s, r#"{"query": "x"}"#, Vec::new(), Arc::new(brave))
        .await;
    match out.result {
        Err(SkillError::Failed { message }) => assert!(message.contains("HTTP 401"), "{message}"),
        other => panic!("expected the backend's refusal: {other:?}"),
    }

    // Bad input is refused by the skill with a message for the model.
    for (input, expect) in [
        ("not json", "input must be a JSON object"),
        (r#"{"query": ""}"#, "\"query\" must be"),
        (r#"{"query": "x", "count": 50}"#, "\"count\" must be"),
    ] {
        match invoke(&f, &s, input).await {
            Err(SkillError::Failed { message }) => assert!(message.contains(expect), "{message}"),
            other => panic!("{input}: {other:?}"),
        }
    }
}
