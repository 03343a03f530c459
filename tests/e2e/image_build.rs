//! `clawos image build` is reproducible and its output passes `veritysetup verify`.

use std::process::Command;

use clawos_e2e::{artifacts, bin, can_build_images};

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
    if !can_build_images("same_inputs_give_the_same_image_and_veritysetup_accepts_it") {
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

fn clawos(args: &[&str], state: &std::path::Path) -> std::process::Output {
    Command::new(bin("clawos"))
        .args(args)
        .env("CLAWOS_STATE_DIR", state)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("run clawos")
}

#[test]
fn kernel_dir_and_vmlinux_builds_are_verified() {
    if !can_build_images("kernel_dir_and_vmlinux_builds_are_verified") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let debian = work.path().join("debian");
    let o = clawos(
        &[
            "--json",
            "image",
            "build",
            "--vmlinux",
            "--out",
            debian.to_str().expect("utf8"),
        ],
        &state,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let vmlinux = std::fs::read(debian.join("vmlinux")).expect("vmlinux written");
    assert!(vmlinux.starts_with(b"\x7fELF") && vmlinux.len() > 10 << 20);
    assert!(m["vmlinux_sha256"].is_string());

    // The same kernel, named as a directory, gives the same initramfs and rootfs.
    let tree = std::fs::read_dir(state.join("cache/kernel"))
        .expect("kernel cache")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("boot").is_dir())
        .expect("unpacked kernel tree");
    let fromdir = work.path().join("fromdir");
    let o = clawos(
        &[
            "--json",
            "image",
            "build",
            "--kernel-dir",
            tree.to_str().expect("utf8"),
            "--out",
            fromdir.to_str().expect("utf8"),
        ],
        &state,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m2: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(m["initramfs_sha256"], m2["initramfs_sha256"]);
    assert_eq!(m["verity"], m2["verity"]);

    // A signed --vmlinux image is refused once its vmlinux changes.
    let key = work.path().join("k");
    assert!(
        clawos(&["keygen", "--out", key.to_str().expect("utf8")], &state)
            .status
            .success()
    );
    assert!(
        clawos(
            &[
                "image",
                "sign",
                debian.to_str().expect("utf8"),
                "--key",
                key.to_str().expect("utf8")
            ],
            &state
        )
        .status
        .success()
    );
    let pubkey = String::from_utf8_lossy(
        &clawos(
            &[
                "--json",
                "image",
                "sign",
                debian.to_str().expect("utf8"),
                "--key",
                key.to_str().expect("utf8"),
            ],
            &state,
        )
        .stdout,
    )
    .into_owned();
    let pubkey: serde_json::Value = serde_json::from_str(&pubkey).expect("json");
    let pk = pubkey["public_key"].as_str().expect("public key");
    let o = clawos(
        &[
            "image",
            "verify",
            debian.to_str().expect("utf8"),
            "--pubkey",
            pk,
        ],
        &state,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    clawos_e2e::flip_byte(&debian.join("vmlinux"), 5000).expect("flip");
    let o = clawos(
        &[
            "image",
            "verify",
            debian.to_str().expect("utf8"),
            "--pubkey",
            pk,
        ],
        &state,
    );
    assert_eq!(o.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("vmlinux hash mismatch"),
        "{o:?}"
    );
}
