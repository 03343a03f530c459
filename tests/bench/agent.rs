//! The built-in agent runtime, measured on real VMs (TCG here):
//! - start→ready of a VM whose image carries the runtime vs the same image built without
//!   it, alternating in one run (readiness includes the runtime's agent API answering);
//! - the runtime's RSS idle, and its high-water mark over a task;
//! - one model call through the launcher's relay (the socket a guest's connection arrives
//!   on, so the relay's HTTP handling and token attachment are in the path) and the proxy,
//!   vs the same call sent to the proxy directly with a token, alternating.
//!
//! ```sh
//! cargo build --release -p clawos-vm-launcher -p clawos-cli -p clawos-identity-manager \
//!   -p clawos-inference-proxy -p clawos-scripted-model && scripts/build-guest.sh
//! cargo bench -p clawos-e2e --bench agent [-- ROUNDS]
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use clawos_e2e::stack::{HostServices, ScriptedModel};
use clawos_e2e::{Launcher, artifacts, can_boot_vms_unrecorded, is, runtime, vsock_dir};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};
use clawos_vm_launcher_api::{StartVm, VmState};
use serde_json::json;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One non-streaming Messages call over `conn`, timed to the end of the answer.
fn call(mut conn: impl Read + Write, token: Option<&str>) -> Duration {
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let t = Instant::now();
    write!(
        conn,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("answer");
    let took = t.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    took
}

fn rss_kib(l: &Launcher, vm: &str, field: &str) -> u64 {
    let o = l.clawos(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        &format!("grep {field} /proc/$(pidof clawos-agentd)/status"),
    ]);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field}: {}", String::from_utf8_lossy(&o.stderr)))
}

fn main() {
    if !can_boot_vms_unrecorded("bench agent") {
        return;
    }
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");

    // The same image without the runtime (same kernel, same binaries otherwise).
    let a = artifacts();
    let bare = work.path().join("image-without-runtime");
    let opts = clawos_e2e::image_options(
        &bare,
        &a.root.parent().expect("e2e dir").join("cache"),
        "bench-bare",
        clawos_image::AgentChoice::None,
    );
    clawos_image::build(&opts, &mut |_| {}).expect("build the image without a runtime");
    let key = clawos_image::keys::load(&a.root.join("signing.key")).expect("key");
    clawos_image::manifest::sign_bundle(&bare, &key).expect("sign");

    let model = ScriptedModel::start(
        work.path(),
        "bench",
        &json!({"turns": [
            {"tool_use": [{"name": "bash", "input": {"command": "sleep 2; head -c 200000 /dev/zero | wc -c"}}]},
            {"text": "done"}
        ]}),
    )
    .expect("model");
    let host = HostServices::start(&state, &[("anthropic", &["claude-*"], &model.url)], &[])
        .expect("host services");
    let l = Launcher::start_with(
        &state,
        &[
            ("CLAWOS_INFERENCE_PROXY_URL", host.proxy_url.as_str()),
            ("CLAWOS_IDENTITY_URL", host.identity_url.as_str()),
        ],
    )
    .expect("launcher");
    let o = l.add_image("bare", &bare);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rt = runtime();
    let client = l.client();

    // Boot: with the runtime vs without, alternating.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for (image, out) in [(None, &mut with), (Some("bare"), &mut without)] {
            let name = format!("b{round}-{}", image.unwrap_or("agent"));
            let req = StartVm {
                name: name.clone(),
                model: None,
                mem_mib: 384,
                vcpus: 1,
                image: image.map(str::to_owned),
                snapshots: false,
                idempotency_key: None,
                token_budget: None,
            };
            rt.block_on(client.start(&req)).expect("start");
            let vm = l
                .wait_for(&name, Duration::from_secs(180), is(VmState::Running))
                .expect("running");
            out.push(vm.boot_ms.expect("boot_ms") as f64);
            rt.block_on(client.stop(&name)).expect("stop");
            rt.block_on(client.delete(&name)).expect("delete");
        }
    }
    let (w, wo) = (median(with.clone()), median(without.clone()));
    println!(
        "start→ready, median of {rounds}: with the runtime {w:.0} ms, without {wo:.0} ms (ratio {:.2}, +{:.0} ms)\n  with: {with:?}\n  without: {without:?}",
        w / wo,
        w - wo
    );

    // RSS idle and over a task.
    let o = l.clawos(&["vm", "start", "rss", "--mem", "384"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let idle = rss_kib(&l, "rss", "VmRSS");
    let o = l.clawos(&["agent", "run", "rss", "--message", "work"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let peak = rss_kib(&l, "rss", "VmHWM");
    let after = rss_kib(&l, "rss", "VmRSS");
    println!(
        "clawos-agentd RSS: idle {:.1} MiB, high-water over a task {:.1} MiB, after it {:.1} MiB",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0
    );

    // One model call: relay + proxy vs proxy directly, alternating.
    let identity = IdentityClient::with_service_token(
        &host.identity_url,
        &host.service_token().expect("service token"),
    );
    let token = rt
        .block_on(identity.issue(&IssueRequest {
            agent: "direct".into(),
            vm_id: "direct-1".into(),
            image_root_hash: String::new(),
            audience: "inference-proxy".into(),
            ttl_secs: None,
            scopes: vec![],
        }))
        .expect("issue")
        .token;
    let relay = vsock_dir(&state, "rss").join("vsock.sock_11435");
    let calls = 50;
    let (mut via_relay, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..calls {
        let c = UnixStream::connect(&relay).expect("relay socket");
        via_relay.push(call(c, None).as_secs_f64() * 1000.0);
        let c = std::net::TcpStream::connect(("127.0.0.1", host.proxy_port)).expect("proxy");
        direct.push(call(c, Some(&token)).as_secs_f64() * 1000.0);
    }
    let (r, d) = (median(via_relay), median(direct));
    println!(
        "one model call, median of {calls}: relay + proxy {r:.2} ms, proxy directly {d:.2} ms (ratio {:.2}, +{:.2} ms)",
        r / d,
        r - d
    );
    let _ = l.clawos(&["vm", "stop", "rss"]);
}
