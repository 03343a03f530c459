//! Images whose signed manifest names an agent runtime of their own (OpenClaw): a VM
//! with less memory than the runtime needs is refused before anything is made or
//! booted — through the API, on the fake hypervisor — and a VM that fits records the
//! runtime and shows it. An image without one (the built-in runtime) is as before.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_api::code;
use clawos_image::manifest::AgentRuntime;
use clawos_vm_launcher::Launcher;
use clawos_vm_launcher::backend::fake::FakeHypervisor;
use clawos_vm_launcher::store::VmDir;
use clawos_vm_launcher_api::{LauncherClient, StartVm, VmState};

/// The operator credential the tests' launchers take.
const TOKEN: &str = "test-operator-credential";

/// A launcher, served on loopback, whose default image is a signed bundle (naming an
/// agent runtime or not).
struct Host {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    fake: Arc<FakeHypervisor>,
    client: LauncherClient,
}

impl Drop for Host {
    fn drop(&mut self) {
        common::kill_fake_vms(&self.state);
    }
}

async fn host(runtime: Option<AgentRuntime>) -> Host {
    let tmp = tempfile::tempdir().expect("tmp");
    let (state, image) = (tmp.path().join("state"), tmp.path().join("image"));
    let pubkey = match runtime {
        Some(rt) => common::signed_bundle_with(&image, Some(rt)),
        None => common::signed_bundle(&image),
    };
    let mut cfg = common::raw_config(&state, &image, &pubkey, 5)
        .validate()
        .expect("config");
    cfg.runtime_disk_mib = 4;
    cfg.workspace_disk_mib = 4;
    let guard = clawos_vm_launcher::http::guard(&cfg, TOKEN);
    let fake = Arc::new(FakeHypervisor::default());
    let launcher = Launcher::new(cfg, fake.clone()).expect("launcher");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(listener, clawos_vm_launcher::http::router(launcher, &guard)).await
    });
    Host {
        _tmp: tmp,
        state,
        fake,
        client: LauncherClient::new(&url).with_token(TOKEN),
    }
}

fn openclaw(min_mem_mib: u32) -> AgentRuntime {
    AgentRuntime {
        name: "openclaw".into(),
        version: "2026.9.6".into(),
        min_mem_mib,
        ready_timeout_secs: 600,
    }
}

fn start_req(name: &str, mem_mib: u32) -> StartVm {
    StartVm {
        name: name.into(),
        model: None,
        mem_mib,
        vcpus: 1,
        image: None,
        snapshots: false,
        idempotency_key: None,
        token_budget: None,
    }
}

/// Nothing of VM `name` exists: no record, no directory (nor a half-made one), no boot.
async fn absent(h: &Host, name: &str) {
    let e = h.client.get(name).await.expect_err("no such VM");
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(h.client.list().await.expect("list").is_empty());
    let vms = h.state.join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .expect("vms dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        vms.display()
    );
    assert_eq!(h.fake.launches(name), 0, "{name} was booted");
}

#[tokio::test]
async fn a_vm_too_small_for_the_images_runtime_is_refused_and_leaves_nothing() {
    let h = host(Some(openclaw(2048))).await;
    let e = h
        .client
        .start(&start_req("oc", 512))
        .await
        .expect_err("512 MiB for a 2048 MiB runtime");
    assert_eq!(e.status(), Some(400), "{e}");
    assert_eq!(e.code(), code::INVALID_REQUEST, "{e}");
    let m = e.to_string();
    for part in [
        "image default runs openclaw 2026.9.6",
        "needs at least 2048 MiB of guest memory",
        "512 MiB asked",
        "--mem 2048 or more",
    ] {
        assert!(m.contains(part), "{part:?} not in {m:?}");
    }
    absent(&h, "oc").await;
}

#[tokio::test]
async fn a_vm_that_fits_records_and_shows_its_runtime() {
    let h = host(Some(openclaw(256))).await;
    let e = h
        .client
        .start(&start_req("oc", 128))
        .await
        .expect_err("too small");
    assert_eq!(e.status(), Some(400), "{e}");
    absent(&h, "oc").await;

    let vm = h.client.start(&start_req("oc", 256)).await.expect("start");
    assert_eq!(vm.agent_runtime.as_deref(), Some("openclaw"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.client.get("oc").await.expect("get").state != VmState::Running {
        assert!(Instant::now() < deadline, "oc never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listed = h.client.list().await.expect("list");
    assert_eq!(listed[0].agent_runtime.as_deref(), Some("openclaw"));
    // What the boot deadline reads, kept with the VM across launcher restarts.
    let record = VmDir {
        root: h.state.join("vms/oc"),
    }
    .load()
    .expect("record");
    assert_eq!(record.agent_runtime.as_deref(), Some("openclaw"));
    assert_eq!(record.ready_timeout_secs, Some(600));
    assert_eq!(
        h.client.stop("oc").await.expect("stop").state,
        VmState::Stopped
    );
}

#[tokio::test]
async fn an_image_of_the_built_in_runtime_is_as_before() {
    let h = host(None).await;
    let vm = h.client.start(&start_req("a", 128)).await.expect("start");
    assert_eq!(vm.agent_runtime, None);
    let record = VmDir {
        root: h.state.join("vms/a"),
    }
    .load()
    .expect("record");
    assert_eq!(
        (record.agent_runtime, record.ready_timeout_secs),
        (None, None)
    );
    let raw = std::fs::read_to_string(h.state.join("vms/a/vm.json")).expect("vm.json");
    assert!(!raw.contains("agent_runtime"), "{raw}");
}
