//! Claims of the launcher that had no test of their own, on the fake hypervisor:
//! a restore verifies the image again, and refuses a snapshot when the image on disk
//! changed after the snapshot was taken — tampered with (refused as any bad image is)
//! or replaced by another validly signed image with a different root hash (the saved
//! memory only runs on the image it was taken on). Nothing is started either way.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_image::manifest::files;
use clawos_vm_launcher::backend::fake::FakeHypervisor;
use clawos_vm_launcher::host::ProcessId;
use clawos_vm_launcher::store::VmDir;
use clawos_vm_launcher::{Launcher, LauncherError};
use clawos_vm_launcher_api::{StartVm, VmState};

struct Host {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    image: PathBuf,
    pubkey: String,
    fake: Arc<FakeHypervisor>,
}

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let image = tmp.path().join("image");
        let pubkey = common::signed_bundle(&image);
        Self {
            state: tmp.path().join("state"),
            image,
            pubkey,
            fake: Arc::new(FakeHypervisor::default()),
            _tmp: tmp,
        }
    }

    fn launcher(&self) -> Arc<Launcher> {
        let mut cfg = common::raw_config(&self.state, &self.image, &self.pubkey, 1)
            .validate()
            .expect("config");
        cfg.stop_timeout = Duration::from_secs(3);
        cfg.boot_timeout = Duration::from_secs(5);
        cfg.ready_probe_interval = Duration::from_millis(16);
        cfg.runtime_disk_mib = 4;
        cfg.workspace_disk_mib = 4;
        Launcher::new(cfg, self.fake.clone()).expect("launcher")
    }

    fn process(&self, name: &str) -> Option<ProcessId> {
        VmDir {
            root: self.state.join("vms").join(name),
        }
        .read_pid()
        .filter(ProcessId::is_alive)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        common::kill_fake_vms(&self.state);
    }
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

async fn settle(l: &Launcher, name: &str, want: VmState) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = l.get(name).expect("vm").state;
        if s == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stuck in {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Rewrites the bundle's signed manifest with another root hash and signs it again
/// with the bundle's own (trusted) key: a valid image, but not the snapshot's.
fn replace_root_hash(image: &Path, new: &str) -> String {
    let path = image.join(files::MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
    let old = m["verity"]["root_hash"]
        .as_str()
        .expect("a root hash")
        .to_owned();
    assert_ne!(old, new);
    m["verity"]["root_hash"] = new.into();
    std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write manifest");
    let key = clawos_image::keys::load(&image.join("signing.key")).expect("bundle key");
    clawos_image::manifest::sign_bundle(image, &key).expect("re-sign");
    old
}

#[test]
fn restore_reverifies_the_image_and_refuses_one_changed_since_the_snapshot() {
    let host = Host::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let l = host.launcher();
        l.start(start_req("s")).await.expect("start");
        settle(&l, "s", VmState::Running).await;
        let taken_on = l.get("s").expect("vm").root_hash;
        let snap = l.snapshot("s", Some("t1")).await.expect("snapshot");
        assert_eq!(snap.root_hash, taken_on);
        l.stop("s").await.expect("stop");

        let refused = |what: &str, e: &LauncherError| {
            assert_eq!(
                l.get("s").expect("vm").state,
                VmState::Stopped,
                "{what}: nothing started ({e})"
            );
            assert!(host.process("s").is_none(), "{what}: a VM process runs");
        };

        // 1. The image on disk is tampered with (its kernel changed): the restore
        // verifies it again and refuses it like any start would.
        let kernel = host.image.join(files::KERNEL);
        let original_kernel = std::fs::read(&kernel).expect("kernel");
        std::fs::write(&kernel, b"tampered kernel").expect("tamper");
        let e = l
            .restore("s", "t1")
            .await
            .expect_err("a tampered image is restored");
        assert!(
            matches!(&e, LauncherError::ImageRefused { code, message }
                if *code == clawos_api::code::IMAGE_HASH_MISMATCH && message.contains("kernel")),
            "{e:?}"
        );
        refused("tampered kernel", &e);
        std::fs::write(&kernel, &original_kernel).expect("put the kernel back");

        // 2. The image is replaced by another one, validly signed by the trusted key,
        // with a different root hash: it would boot, but the snapshot's memory was
        // taken on the other image.
        let manifest = host.image.join(files::MANIFEST);
        let signature = host.image.join(files::SIGNATURE);
        let (orig_manifest, orig_sig) = (
            std::fs::read(&manifest).expect("manifest"),
            std::fs::read(&signature).expect("signature"),
        );
        let new_hash = "cd".repeat(32);
        assert_eq!(replace_root_hash(&host.image, &new_hash), taken_on);
        let e = l
            .restore("s", "t1")
            .await
            .expect_err("a snapshot restored on another image");
        assert!(
            matches!(&e, LauncherError::Conflict(m)
                if m.contains(&format!("taken on image root hash {taken_on}"))
                    && m.contains(&new_hash)),
            "{e:?}"
        );
        refused("replaced image", &e);
        // The replacement itself is a good image: a fresh boot takes it.
        l.start(start_req("fresh"))
            .await
            .expect("the new image boots");
        settle(&l, "fresh", VmState::Running).await;
        assert_eq!(l.get("fresh").expect("vm").root_hash, new_hash);
        l.stop("fresh").await.expect("stop");

        // 3. The snapshot's own image back: the same snapshot restores.
        std::fs::write(&manifest, orig_manifest).expect("manifest back");
        std::fs::write(&signature, orig_sig).expect("signature back");
        l.restore("s", "t1")
            .await
            .expect("restore on its own image");
        settle(&l, "s", VmState::Running).await;
        assert_eq!(l.get("s").expect("vm").root_hash, taken_on);
        l.stop("s").await.expect("stop");
    });
}
