//! `clawos image build` is reproducible and its output passes `veritysetup verify`.

use std::process::Command;

use clawos_e2e::{artifacts, bin, can_boot_vms};

fn build(out: &std::path::Path, cache: &std::path::Path) -> serde_json::Value {
    let o = Command::new(bin("clawos"))
        .args(["--json", "image", "build", "--out"])
        .arg(out)
        .env("CLAWOS_STATE_DIR", cache)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("run clawos image build");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("manifest JSON")
}

#[test]
fn same_inputs_give_the_same_image_and_veritysetup_accepts_it() {
    if !can_boot_vms() {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    // Share the harness's kernel download cache layout: a state dir with cache/kernel.
    let cache = work.path().join("state");
    let a = build(&work.path().join("a"), &cache);
    let b = build(&work.path().join("b"), &cache);
    assert_eq!(a, b, "two builds of the same inputs differ");
    for f in ["rootfs.img", "initramfs.cpio.gz", "manifest.json"] {
        let x = std::fs::read(work.path().join("a").join(f)).expect("read");
        let y = std::fs::read(work.path().join("b").join(f)).expect("read");
        assert!(x == y, "{f} differs between identical builds");
    }
    // And the harness's image (same epoch, same kernel and guest binaries) agrees.
    assert_eq!(
        a["verity"]["root_hash"],
        artifacts().manifest.verity.root_hash.as_str()
    );

    let v = &a["verity"];
    let blocks = v["data_blocks"].as_u64().expect("blocks");
    let img = work.path().join("a/rootfs.img");
    let out = Command::new("veritysetup")
        .arg("verify")
        .arg(format!("--hash-offset={}", blocks * 4096))
        .arg(format!("--data-blocks={blocks}"))
        .arg(&img)
        .arg(&img)
        .arg(v["root_hash"].as_str().expect("hash"))
        .output()
        .expect("run veritysetup (cryptsetup-bin)");
    assert!(
        out.status.success(),
        "veritysetup verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
