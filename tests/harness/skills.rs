//! Test skills: the C components in `tests/e2e/skills/`, built with the real
//! `clawos-skill-build` (clang for wasm32 + the skill world), once per content.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;

use sha2::{Digest, Sha256};

use crate::{bin, target_profile_dir};

fn sources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/skills")
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../skills/sdk")
}

/// Builds `tests/e2e/skills/<name>.c` (with the skills' HTTP helper) for `world`
/// (`skill`, or one of `tests/e2e/skills/wit`), returning the component's bytes.
pub fn component(name: &str, world: &str) -> Vec<u8> {
    let src = sources_dir().join(format!("{name}.c"));
    if world == "skill" {
        build(name, &[src, sdk_dir().join("skill_http.c")], world)
    } else {
        build(name, &[src], world)
    }
}

/// The web-search skill (`skills/web-search`), built from its sources, and its
/// manifest's text.
pub fn web_search() -> (Vec<u8>, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../skills/web-search");
    let wasm = build(
        "web-search",
        &[
            dir.join("web_search.c"),
            sdk_dir().join("skill_http.c"),
            sdk_dir().join("skill_json.c"),
        ],
        "skill",
    );
    let manifest = std::fs::read_to_string(dir.join("skill.toml")).expect("skill.toml");
    (wasm, manifest)
}

fn build(name: &str, sources: &[PathBuf], world: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    let headers = ["skill_http.h", "skill_json.h"].map(|f| sdk_dir().join(f));
    for f in sources.iter().chain(headers.iter()) {
        h.update(std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())));
    }
    h.update(world.as_bytes());
    let out_dir = target_profile_dir().join("../e2e/skills");
    std::fs::create_dir_all(&out_dir).expect("skills dir");
    let out = out_dir.join(format!("{name}-{}.wasm", hex::encode(&h.finalize()[..8])));
    if !out.is_file() {
        // Two tests of one binary may build the same component at once: each
        // writes its own file (process id and a per-process count), and the
        // renames replace one finished build with an identical one.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = out.with_extension(format!("tmp{}-{n}", std::process::id()));
        let mut cmd = Command::new(bin("clawos-skill-build"));
        cmd.arg("-o").arg(&tmp).arg("--world").arg(world);
        cmd.arg(format!("--cflag=-I{}", sdk_dir().display()));
        if world != "skill" {
            cmd.arg("--wit").arg(sources_dir().join("wit"));
        }
        cmd.args(sources);
        let o = cmd.output().expect("run clawos-skill-build");
        assert!(
            o.status.success(),
            "building {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::rename(&tmp, &out).expect("rename");
    }
    std::fs::read(&out).expect("read component")
}

/// A running skill-manager: its URL, and the process (killed on drop).
#[derive(Debug)]
pub struct SkillManager {
    pub url: String,
    _child: crate::KillOnDrop,
}

/// Starts the real skill-manager on a free port with `state` as its state directory,
/// trusting agent tokens from `issuer`, with `extra` flags (`--signing-pubkey`,
/// `--resolve`, ...), logging to `log`.
pub fn start_skill_manager(state: &Path, issuer: &str, extra: &[&str], log: &Path) -> SkillManager {
    let port = crate::port();
    let addr = format!("127.0.0.1:{port}");
    let state_s = state.to_str().expect("state dir is UTF-8");
    let mut args = vec!["--addr", &addr, "--state-dir", state_s, "--issuer", issuer];
    args.extend_from_slice(extra);
    let child = crate::spawn_daemon("skill-manager", &args, &[], log, port).expect("skill-manager");
    SkillManager {
        url: format!("http://{addr}"),
        _child: crate::KillOnDrop(child),
    }
}

/// The project's stand-in search backend (`clawos-search-standin`) on a free port.
pub fn search_backend() -> (u16, crate::KillOnDrop) {
    let (child, url) = crate::spawn_announced(
        Command::new(crate::bin("clawos-search-standin"))
            .args(["--addr", "127.0.0.1:0"])
            .stderr(Stdio::null()),
    )
    .expect("start clawos-search-standin");
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("clawos-search-standin listens on {url:?}"));
    (port, child)
}

/// The web-search bundle pointed at the stand-in, signed with `key`.
pub fn web_search_bundle(
    dir: &Path,
    search_port: u16,
    key: &ed25519_dalek::SigningKey,
) -> clawos_skill_manager_api::InstallSkill {
    let (wasm, manifest) = web_search();
    let manifest = manifest.replace("search.local:8888", &format!("search.local:{search_port}"));
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("skill.toml"), &manifest).expect("manifest");
    std::fs::write(dir.join("skill.wasm"), &wasm).expect("wasm");
    clawos_skill_manager::bundle::sign(dir, key).expect("sign");
    clawos_skill_manager_api::InstallSkill {
        manifest,
        component_base64: base64::engine::general_purpose::STANDARD.encode(&wasm),
        instructions: None,
        signature: std::fs::read_to_string(dir.join("skill.sig")).ok(),
        config: Default::default(),
    }
}
