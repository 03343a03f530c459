//! `LauncherClient` against the launcher's router on loopback, over the fake
//! hypervisor: both take their routes from one table, and every refusal reaches the
//! client as one error body whose code keeps what failed (an image's hash vs its
//! signature), which is what the CLI's exit code comes from.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_api::{ClientError, HttpClient, Route, code};
use clawos_image::manifest::files;
use clawos_vm_launcher::Launcher;
use clawos_vm_launcher::backend::fake::FakeHypervisor;
use clawos_vm_launcher_api::{ExecError, ExecStart, LauncherClient, StartVm, TunnelError, VmState};

/// Kills the fake VMs a failed test left running.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::kill_fake_vms(&self.0);
    }
}

/// The operator credential the tests' launchers take.
const TOKEN: &str = "test-operator-credential";

async fn serve(state: &Path, image: &Path, pubkey: &str) -> String {
    let cfg = common::raw_config(state, image, pubkey, 5)
        .validate()
        .expect("config");
    let guard = clawos_vm_launcher::http::guard(&cfg, TOKEN);
    let launcher = Launcher::new(cfg, Arc::new(FakeHypervisor::default())).expect("launcher");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(listener, clawos_vm_launcher::http::router(launcher, &guard)).await
    });
    url
}

fn start_req(name: &str) -> StartVm {
    StartVm {
        name: name.into(),
        model: None,
        mem_mib: 128,
        vcpus: 1,
        image: None,
        snapshots: false,
        idempotency_key: None,
        token_budget: None,
    }
}

fn api(e: &ClientError) -> (u16, &str, u8) {
    (e.status().unwrap_or(0), e.code(), e.exit_code())
}

#[tokio::test]
async fn client_and_router_share_routes_and_refusals_keep_their_code() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (state, image) = (tmp.path().join("state"), tmp.path().join("image"));
    let _cleanup = Cleanup(state.clone());
    let pubkey = common::signed_bundle(&image);
    let url = serve(&state, &image, &pubkey).await;
    let c = LauncherClient::new(&url).with_token(TOKEN);

    assert!(c.list().await.expect("list").is_empty());
    c.start(&start_req("a")).await.expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.get("a").await.expect("get").state != VmState::Running {
        assert!(Instant::now() < deadline, "a never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = c.start(&start_req("a")).await.expect_err("running");
    assert_eq!(api(&e), (409, code::CONFLICT, 4), "{e}");
    assert_eq!(c.pause("a").await.expect("pause").state, VmState::Paused);
    assert_eq!(c.resume("a").await.expect("resume").state, VmState::Running);
    c.console("a", 0).await.expect("console");
    assert!(c.snapshots("a").await.expect("snapshots").is_empty());
    assert_eq!(c.stop("a").await.expect("stop").state, VmState::Stopped);

    // Exec and the gateway tunnel are refused before the WebSocket opens: the same
    // error body, decoded from the refused upgrade.
    let mut out = Vec::new();
    let mut err = Vec::new();
    let e = c
        .exec(
            "a",
            &ExecStart {
                argv: vec!["true".into()],
                ..Default::default()
            },
            None::<tokio::io::Empty>,
            &mut out,
            &mut err,
        )
        .await
        .expect_err("a stopped VM runs nothing");
    assert!(matches!(e, ExecError::Refused(_)), "{e}");
    assert_eq!(e.exit_code(), 4, "{e}");
    let (tcp, _) = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::join!(tokio::net::TcpStream::connect(addr), l.accept())
    };
    let e = c
        .tunnel_gateway("nope", tcp.expect("connect"))
        .await
        .expect_err("no such VM");
    assert!(matches!(e, TunnelError::Refused(_)), "{e}");
    assert_eq!(e.exit_code(), 3, "{e}");

    c.delete("a").await.expect("delete");
    let e = c.get("a").await.expect_err("deleted");
    assert_eq!(api(&e), (404, code::NOT_FOUND, 3), "{e}");

    // Image refusals name what failed, in the message and in the code.
    std::fs::write(image.join(files::KERNEL), b"tampered").expect("tamper");
    let e = c.start(&start_req("t")).await.expect_err("tampered kernel");
    assert_eq!(api(&e), (422, code::IMAGE_HASH_MISMATCH, 5), "{e}");
    assert!(e.to_string().contains("hash mismatch"), "{e}");
    std::fs::remove_file(image.join(files::SIGNATURE)).expect("unsign");
    let e = c.start(&start_req("t")).await.expect_err("unsigned");
    assert_eq!(api(&e), (422, code::IMAGE_UNSIGNED, 5), "{e}");
    assert!(c.list().await.expect("list").is_empty());

    // A route no table has: the same body, with the request's id.
    let raw = HttpClient::new("vm-launcher", &url).with_token(TOKEN);
    let e = raw
        .send(raw.request(Route::get("/v1/nothing"), &[]))
        .await
        .expect_err("no such route");
    match e {
        ClientError::Api {
            status,
            code,
            message,
            request_id,
        } => {
            assert_eq!((status, code.as_str()), (404, code::NOT_FOUND));
            assert!(message.contains("no such route"), "{message}");
            assert_eq!(request_id.len(), 32);
        }
        other => panic!("{other}"),
    }
}

/// Waits until fake VM `name` runs.
async fn running(c: &LauncherClient, name: &str) {
    c.start(&start_req(name)).await.expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.get(name).await.expect("get").state != VmState::Running {
        assert!(Instant::now() < deadline, "{name} never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn every_route_but_liveness_and_metrics_needs_the_credential_websockets_included() {
    use clawos_vm_launcher_api::routes;
    let tmp = tempfile::tempdir().expect("tmp");
    let (state, image) = (tmp.path().join("state"), tmp.path().join("image"));
    let _cleanup = Cleanup(state.clone());
    let pubkey = common::signed_bundle(&image);
    let url = serve(&state, &image, &pubkey).await;
    let operator = LauncherClient::new(&url).with_token(TOKEN);
    running(&operator, "a").await;

    let anonymous = HttpClient::new("vm-launcher", &url);
    let wrong = HttpClient::new("vm-launcher", &url).with_token("not-the-credential");
    let all = [
        routes::START,
        routes::LIST,
        routes::GET,
        routes::DELETE,
        routes::STOP,
        routes::CONSOLE,
        routes::PAUSE,
        routes::RESUME,
        routes::CREATE_SNAPSHOT,
        routes::LIST_SNAPSHOTS,
        routes::DELETE_SNAPSHOT,
        routes::RESTORE,
        routes::EXEC,
        routes::GATEWAY,
        routes::PUT_FILE,
        routes::GET_FILE,
        Route::get("/v1/no-such-route"),
    ];
    for route in all {
        for client in [&anonymous, &wrong] {
            let e = client
                .send(client.request(route, &["a", "t"]))
                .await
                .expect_err("refused");
            assert_eq!(api(&e), (401, code::UNAUTHORIZED, 9), "{route:?}: {e}");
        }
    }
    for open in [routes::HEALTHZ, routes::METRICS] {
        anonymous
            .send(anonymous.request(open, &[]))
            .await
            .unwrap_or_else(|e| panic!("{open:?}: {e}"));
    }
    // The WebSocket clients without the credential: refused before the upgrade.
    let e = LauncherClient::new(&url)
        .exec(
            "a",
            &ExecStart {
                argv: vec!["id".into()],
                ..Default::default()
            },
            None::<tokio::io::Empty>,
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .await
        .expect_err("no credential");
    assert!(matches!(e, ExecError::Refused(_)), "{e}");
    assert_eq!(e.exit_code(), 9, "{e}");
    // A browser's WebSocket handshake names its page's origin: refused even with the
    // credential, and so are rebinding hosts.
    let op = HttpClient::new("vm-launcher", &url).with_token(TOKEN);
    for (route, header, value) in [
        (routes::EXEC, "origin", "http://evil.example"),
        (routes::GATEWAY, "origin", "null"),
        (routes::EXEC, "host", "evil.example:2080"),
        (routes::LIST, "host", "attacker.localhost.evil"),
    ] {
        let e = op
            .send(
                op.request(route, &["a"])
                    .header("connection", "Upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .header(header, value),
            )
            .await
            .expect_err("refused");
        assert_eq!(api(&e), (403, code::FORBIDDEN, 9), "{header}: {value}: {e}");
    }
    assert!(
        operator.list().await.expect("list").len() == 1,
        "nothing was created"
    );
    assert_eq!(
        operator.stop("a").await.expect("stop").state,
        VmState::Stopped
    );
}

#[tokio::test]
async fn a_refused_upload_is_answered_not_cut_off_mid_body() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (state, image) = (tmp.path().join("state"), tmp.path().join("image"));
    let _cleanup = Cleanup(state.clone());
    let pubkey = common::signed_bundle(&image);
    let url = serve(&state, &image, &pubkey).await;
    let c = LauncherClient::new(&url).with_token(TOKEN);
    running(&c, "a").await;
    // A sparse file: large to send, nothing to write.
    let big = tmp.path().join("big.bin");
    let len = 128u64 << 20;
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(len))
        .expect("big file");
    // The launcher refuses before it reads the body (no such VM; a VM without a
    // guest channel). Cut off, the client would see a broken pipe (exit 7) some of the
    // time; the refusal itself must arrive every time.
    for (vm, want) in [
        ("nope", (404, code::NOT_FOUND, 3)),
        ("a", (409, code::CONFLICT, 4)),
    ] {
        for round in 0..6 {
            let f = tokio::fs::File::open(&big).await.expect("open");
            let e = c
                .put_file_from(vm, "x.bin", f, len)
                .await
                .expect_err("refused");
            assert_eq!(api(&e), want, "{vm} round {round}: {e}");
        }
    }
    // The upload's body type is checked too: a raw upload with another type is 415.
    let raw = HttpClient::new("vm-launcher", &url).with_token(TOKEN);
    let e = raw
        .send(
            raw.request(clawos_vm_launcher_api::routes::PUT_FILE, &["a"])
                .query(&[("path", "x")])
                .header("content-type", "text/plain")
                .body("x"),
        )
        .await
        .expect_err("415");
    assert_eq!(e.status(), Some(415), "{e}");
    assert_eq!(c.stop("a").await.expect("stop").state, VmState::Stopped);
}

#[tokio::test]
async fn an_idempotent_start_over_http_is_202_with_the_vm_and_a_bad_key_is_400() {
    use clawos_vm_launcher_api::routes;
    let tmp = tempfile::tempdir().expect("tmp");
    let (state, image) = (tmp.path().join("state"), tmp.path().join("image"));
    let _cleanup = Cleanup(state.clone());
    let pubkey = common::signed_bundle(&image);
    let url = serve(&state, &image, &pubkey).await;
    let raw = HttpClient::new("vm-launcher", &url).with_token(TOKEN);
    let start = |body: serde_json::Value| {
        let raw = raw.clone();
        async move {
            let r = raw
                .send(raw.request(routes::START, &[]).json(&body))
                .await?;
            let status = r.status().as_u16();
            let vm: serde_json::Value = r.json().await.expect("body");
            Ok::<_, ClientError>((status, vm))
        }
    };
    // The wire shape: two optional fields of the start request, echoed in the VM.
    let body = serde_json::json!({
        "name": "s1", "mem_mib": 128, "vcpus": 1,
        "idempotency_key": "wf-1/step-1:try.0", "token_budget": 300
    });
    let (status, first) = start(body.clone()).await.expect("start");
    assert_eq!(status, 202);
    assert_eq!(first["idempotency_key"], "wf-1/step-1:try.0");
    assert_eq!(first["token_budget"], 300);
    let (status, again) = start(body.clone()).await.expect("the same start again");
    assert_eq!(status, 202);
    assert_eq!(again["pid"], first["pid"], "the same VM process");
    assert_eq!(again["name"], "s1");

    let e = start(serde_json::json!({
        "name": "s1", "mem_mib": 128, "vcpus": 1, "idempotency_key": "wf-1/step-2"
    }))
    .await
    .expect_err("another key while it runs");
    assert_eq!(api(&e), (409, code::CONFLICT, 4), "{e}");
    for bad in [
        serde_json::json!({"name": "s2", "idempotency_key": ""}),
        serde_json::json!({"name": "s2", "idempotency_key": "a b"}),
        serde_json::json!({"name": "s2", "idempotency_key": "k".repeat(129)}),
        serde_json::json!({"name": "s2", "idempotency_key": 7}),
        serde_json::json!({"name": "s2", "token_budget": 0}),
        serde_json::json!({"name": "s2", "token_budget": -1}),
        serde_json::json!({"name": "s2", "token_budget": 1_000_000_000_001u64}),
    ] {
        let e = start(bad.clone()).await.expect_err("refused");
        assert_eq!(api(&e), (400, code::INVALID_REQUEST, 1), "{bad}: {e}");
    }
    // Through the typed client, and a VM without either field shows neither.
    let c = LauncherClient::new(&url).with_token(TOKEN);
    let vm = c
        .start(&StartVm {
            idempotency_key: Some("wf-1/step-1:try.0".into()),
            ..start_req("s1")
        })
        .await
        .expect("typed client, same key");
    assert_eq!(vm.token_budget, Some(300));
    let plain = c.start(&start_req("s3")).await.expect("plain start");
    assert_eq!((plain.idempotency_key, plain.token_budget), (None, None));
    let listed = c.list().await.expect("list");
    assert_eq!(listed.len(), 2, "nothing else was created: {listed:?}");
    for n in ["s1", "s3"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.get(n).await.expect("get").state == VmState::Starting {
            assert!(Instant::now() < deadline, "{n} never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.stop(n).await.expect("stop");
    }
}
