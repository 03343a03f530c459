use super::*;

#[test]
fn the_descriptor_is_valid_and_its_timeout_fits_the_manifests() {
    let d = runtime_descriptor();
    d.validate().expect("valid");
    assert!(d.ready_timeout_secs < manifest_runtime().ready_timeout_secs);
    assert!(d.argv[1].starts_with(APP_DIR));
    assert!(d.env.values().any(|v| v == CONFIG_PATH));
}

#[test]
fn the_skills_config_is_the_same_with_the_mcp_server_added() {
    let (plain, skills) = (gateway_config(), gateway_config_with_skills());
    let server = &skills["mcp"]["servers"][MCP_SERVER_NAME];
    assert_eq!(server["url"], "${CLAWOS_MCP_URL}");
    // Without it OpenClaw speaks the older SSE transport, which skill-manager does
    // not serve.
    assert_eq!(server["transport"], "streamable-http");
    assert!(server["requestTimeoutMs"].as_u64() > Some(1_500));
    let mut without = skills.clone();
    without.as_object_mut().map(|o| o.remove("mcp"));
    assert_eq!(without, plain);
    assert!(plain.get("mcp").is_none());
    assert_eq!(
        runtime_descriptor()
            .skills_env
            .get("OPENCLAW_CONFIG_PATH")
            .map(String::as_str),
        Some(SKILLS_CONFIG_PATH)
    );
}

#[test]
fn the_config_keeps_the_gateway_on_loopback_with_a_token() {
    let c = gateway_config();
    assert_eq!(c["gateway"]["bind"], "loopback");
    assert_eq!(c["gateway"]["auth"]["mode"], "token");
    assert_eq!(c["gateway"]["controlUi"]["enabled"], false);
    assert_eq!(
        c["models"]["providers"]["clawos"]["baseUrl"],
        "http://127.0.0.1:11435"
    );
    assert_eq!(c["agents"]["defaults"]["workspace"], "/workspace");
    assert_eq!(c["plugins"]["allow"], serde_json::json!(["memory-core"]));
}

#[test]
fn the_lock_pins_the_version_the_patches_are_for() {
    let lock: serde_json::Value = serde_json::from_str(PACKAGE_LOCK).expect("lock");
    assert_eq!(
        lock["packages"]["node_modules/openclaw"]["version"],
        OPENCLAW_VERSION
    );
    let pkg: serde_json::Value = serde_json::from_str(PACKAGE_JSON).expect("package");
    assert_eq!(pkg["dependencies"]["openclaw"], OPENCLAW_VERSION);
    // Every file's first patch carries its pinned hash.
    let mut seen = std::collections::HashSet::new();
    for p in PATCHES {
        if seen.insert(p.file) {
            assert_eq!(p.sha256.len(), 64, "{}", p.file);
        }
    }
}

fn pkg_with(file: &str, text: &str) -> (tempfile::TempDir, Patch) {
    let d = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(d.path().join("dist")).expect("mkdir");
    fs::write(d.path().join(file), text).expect("write");
    let patch = Patch {
        file: "dist/x.mjs",
        sha256: "",
        from: "T=5e3",
        to: "T=12e4",
        count: 1,
    };
    (d, patch)
}

#[test]
fn a_patch_applies_only_to_the_pinned_file() {
    let text = "a;T=5e3;b";
    let (d, mut p) = pkg_with("dist/x.mjs", text);
    let sha = sha256_hex(text.as_bytes());
    p.sha256 = Box::leak(sha.into_boxed_str());
    apply_patches(d.path(), &[p]).expect("patched");
    assert_eq!(
        fs::read_to_string(d.path().join("dist/x.mjs")).expect("read"),
        "a;T=12e4;b"
    );
    // Now the file is no longer the pinned one: refused, untouched.
    let e = apply_patches(d.path(), &[p]).expect_err("not pinned");
    assert!(
        e.to_string().contains("only adjusts that exact version"),
        "{e}"
    );
    assert_eq!(
        fs::read_to_string(d.path().join("dist/x.mjs")).expect("read"),
        "a;T=12e4;b"
    );
}

#[test]
fn a_patch_that_does_not_match_exactly_writes_nothing() {
    let text = "T=5e3;T=5e3";
    let (d, mut p) = pkg_with("dist/x.mjs", text);
    p.sha256 = Box::leak(sha256_hex(text.as_bytes()).into_boxed_str());
    let e = apply_patches(d.path(), &[p]).expect_err("two matches");
    assert!(e.to_string().contains("occurs 2 times"), "{e}");
    assert_eq!(
        fs::read_to_string(d.path().join("dist/x.mjs")).expect("read"),
        text
    );
}

#[test]
fn integrity_is_the_registry_format() {
    // `printf abc | openssl dgst -sha512 -binary | base64`
    assert_eq!(
        integrity(b"abc"),
        "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    );
}
