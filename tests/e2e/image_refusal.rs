//! Images that fail verification start nothing, and bad input creates nothing. Images
//! are chosen by name: `clawos image add` refuses a bad bundle before it reaches the
//! store, and the launcher refuses an image in its store that changed since (the
//! tests change the store's copy directly, as a failing disk or a root attacker would).
//! A refusal names the part and keeps its code, but never says a file's hash or size.

use clawos_e2e::{
    Launcher, artifacts, can_start_launcher, copy_image, flip_byte, hypervisor_running_for,
    image_ref, store_image,
};

#[test]
fn one_changed_byte_in_any_part_is_refused_and_named() {
    if !can_start_launcher("one_changed_byte_in_any_part_is_refused_and_named") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let l = Launcher::start(&state).expect("launcher");

    // (name, file to change, offset, words the error must contain: the launcher's
    // message and the error code that keeps what failed)
    let cases: &[(&str, &str, u64, &[&str])] = &[
        (
            "t-kernel",
            "vmlinuz",
            4096,
            &["kernel", "hash mismatch", "image_hash_mismatch"],
        ),
        (
            "t-initramfs",
            "initramfs.cpio.gz",
            100,
            &["initramfs", "hash mismatch", "image_hash_mismatch"],
        ),
        (
            "t-manifest",
            "manifest.json",
            40,
            &["signature mismatch", "manifest", "image_bad_signature"],
        ),
        (
            "t-signature",
            "manifest.sig",
            10,
            &["signature", "image_bad_signature"],
        ),
    ];
    for (name, file, offset, words) in cases {
        // `clawos image add` checks as the launcher does: the bundle never gets in.
        let source = copy_image(&work.path().join(name)).expect("copy");
        flip_byte(&source.join(file), *offset).expect("flip");
        let o = l.add_image(name, &source);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{name}: image add: {err}");
        assert!(!state.join("images").join(name).exists(), "{name}: added");
        // The store's copy changed after it was added: the launcher refuses it.
        let image = store_image(&state, name).expect("store");
        flip_byte(&image.join(file), *offset).expect("flip");
        let changed = clawos_image::manifest::sha256_file(&image.join(file)).expect("hash");
        let size = std::fs::metadata(image.join(file)).expect("size").len();
        let o = l.clawos(&[
            "vm",
            "start",
            name,
            "--mem",
            "256",
            "--image",
            &image_ref(&state, name),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{name}: {err}");
        for w in *words {
            assert!(err.contains(w), "{name}: error should name {w:?}: {err}");
        }
        // (Sizes of a few digits could appear in a request id by chance: only the
        // kernel's and initramfs's are distinctive.)
        assert!(
            !err.contains(&changed) && (size < 100_000 || !err.contains(&size.to_string())),
            "{name}: the refusal must not say the file's hash or size: {err}"
        );
        assert!(
            l.log().contains(&changed) || *file == "manifest.json" || *file == "manifest.sig",
            "{name}: the launcher's own log keeps the details"
        );
        assert!(
            !hypervisor_running_for(name),
            "{name}: a VM process was started"
        );
    }

    // No signature while a key is configured.
    let image = store_image(&state, "t-unsigned").expect("store");
    std::fs::remove_file(image.join("manifest.sig")).expect("rm sig");
    let o = l.clawos(&[
        "vm",
        "start",
        "t-unsigned",
        "--image",
        &image_ref(&state, "t-unsigned"),
    ]);
    assert_eq!(o.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unsigned"),
        "{o:?}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("image_unsigned"),
        "{o:?}"
    );

    // Signed by another key.
    let image = store_image(&state, "t-otherkey").expect("store");
    let other = clawos_image::keys::generate(&work.path().join("other.key")).expect("key");
    clawos_image::manifest::sign_bundle(&image, &other).expect("sign");
    let o = l.clawos(&[
        "vm",
        "start",
        "t-otherkey",
        "--image",
        &image_ref(&state, "t-otherkey"),
    ]);
    assert_eq!(o.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("signature mismatch"),
        "{o:?}"
    );

    assert!(
        clawos_e2e::vms_on_disk(&state).is_empty(),
        "refused starts left {:?}",
        clawos_e2e::vms_on_disk(&state)
    );
    let o = l.clawos(&["--json", "vm", "list"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let metrics = clawos_e2e::metrics_text(&l.url);
    assert_eq!(
        clawos_e2e::metric(&metrics, "clawos_launcher_images_refused_total"),
        6,
        "{metrics}"
    );
    for state in [
        "starting", "running", "paused", "stopping", "stopped", "failed",
    ] {
        assert!(
            metrics.contains(&format!("clawos_launcher_vms{{state=\"{state}\"}} 0")),
            "{state}: {metrics}"
        );
    }
}

#[test]
fn bad_names_sizes_and_bodies_get_4xx_and_create_nothing() {
    if !can_start_launcher("bad_names_sizes_and_bodies_get_4xx_and_create_nothing") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let l = Launcher::start(&state).expect("launcher");
    let rt = clawos_e2e::runtime();
    let http = reqwest::Client::new();
    let token = l.token();
    let post = |body: String| {
        rt.block_on(async {
            let r = http
                .post(format!("{}/v1/vms", l.url))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("send");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.expect("error body is JSON");
            (
                status,
                body["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
    };
    let long = "a".repeat(200);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"name": "../x"}), "invalid VM name"),
        (serde_json::json!({"name": ""}), "invalid VM name"),
        (serde_json::json!({"name": long}), "invalid VM name"),
        (serde_json::json!({"name": "Agent"}), "invalid VM name"),
        (serde_json::json!({"name": "agént"}), "invalid VM name"),
        (
            serde_json::json!({"name": "ok", "mem_mib": 0}),
            "invalid memory",
        ),
        (
            serde_json::json!({"name": "ok", "mem_mib": 4_000_000_000u32}),
            "invalid memory",
        ),
        (
            serde_json::json!({"name": "ok", "vcpus": 0}),
            "invalid vcpus",
        ),
        (
            serde_json::json!({"name": "ok", "vcpus": 4096}),
            "invalid vcpus",
        ),
        (
            serde_json::json!({"name": "ok", "model": "x\nANTHROPIC_API_KEY=y"}),
            "invalid model",
        ),
        (
            serde_json::json!({"name": "ok", "image": "relative/dir"}),
            "invalid image name",
        ),
        (
            serde_json::json!({"name": "ok", "image": artifacts().image_dir}),
            "invalid image name",
        ),
        (
            serde_json::json!({"name": "ok", "surprise": 1}),
            "unknown field",
        ),
    ];
    for (body, want) in cases {
        let (status, msg) = post(body.to_string());
        assert_eq!(status, 400, "{body}: {msg}");
        assert!(
            msg.contains(want),
            "{body}: {msg:?} should contain {want:?}"
        );
    }
    let (status, msg) = post("{not json".into());
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("request body"), "{msg}");

    // Path parameters are validated too.
    let status = rt.block_on(async {
        http.get(format!("{}/v1/vms/..%2Fetc", l.url))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    });
    assert_eq!(status, 400);
    let o = l.clawos(&["vm", "stop", "nope"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");

    assert!(
        clawos_e2e::vms_on_disk(&state).is_empty(),
        "bad input left {:?}",
        clawos_e2e::vms_on_disk(&state)
    );
}
