//! Harness for the end-to-end tests: builds a real signed image once per test binary,
//! runs the real `vm-launcher` binary on a loopback port with its own state directory,
//! and drives it with the real `clawos` CLI or the typed client.

pub mod deadline;
pub mod fake_llm;
pub mod skills;
pub mod stack;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clawos_vm_launcher::host::ProcessId;
use clawos_vm_launcher_api::{LauncherClient, Vm, VmState};

/// `target/debug` (or whichever profile built this test).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test exe lives in target/<profile>/deps")
        .to_owned()
}

/// A workspace binary built by `cargo build --workspace`.
/// `CLAWOS_E2E_BIN_DIR` overrides where they are (e.g. to run a bench or an attacker
/// test against binaries built from an earlier commit).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CLAWOS_E2E_BIN_DIR").map_or_else(target_profile_dir, PathBuf::from);
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: the e2e tests run the real binaries; run `cargo build --workspace` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The static guest binaries.
pub fn guest_bin_dir() -> PathBuf {
    let d = target_profile_dir().join("../x86_64-unknown-linux-gnu/release");
    assert!(
        clawos_image::build::GUEST_BINS
            .iter()
            .all(|b| d.join(b).is_file()),
        "static guest binaries missing in {}: run scripts/build-guest.sh first (scripts/test.sh does)",
        d.display()
    );
    d
}

/// Prints a measurement and appends it to `<target>/e2e/MEASURED`, which
/// `scripts/test.sh` shows after the run (a passing test's output is hidden).
pub fn measured(text: &str) {
    use std::io::Write;
    eprintln!("MEASURED {text}");
    let file = target_profile_dir().join("../e2e/MEASURED");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        // One write: two tests' lines never interleave.
        let _ = f.write_all(format!("MEASURED {text}\n").as_bytes());
    }
}

/// The text of `<base>/metrics` (a daemon's Prometheus page).
pub fn metrics_text(base: &str) -> String {
    runtime()
        .block_on(async {
            reqwest::get(format!("{base}/metrics"))
                .await?
                .error_for_status()?
                .text()
                .await
        })
        .unwrap_or_else(|e| panic!("{base}/metrics: {e}"))
}

/// The value of the unlabelled sample `name` in `metrics` (a text from
/// [`metrics_text`]); a sample that is not there fails the test, never reads as 0.
pub fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a count ({e}):\n{metrics}"))
}

/// Records and prints why a test did not run: every test that returns early goes through
/// here. `scripts/test.sh` lists every skip after the run (the test runner hides the
/// output of tests that return normally) and fails on one not on its allow-list. Tests
/// outside this crate write the same line to the same file (`<target>/e2e/SKIPPED`).
pub fn skip(test: &str, why: &str) {
    clawos_test_skip::record(test, why);
}

/// Whether `tool` is an executable file, by path or on `PATH`.
fn have_tool(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.contains('/') {
        return executable(Path::new(tool));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| executable(&d.join(tool))))
}

/// Tools an image build runs: the Debian kernel package (apt-get, dpkg) and the erofs
/// and ext4 file systems.
const IMAGE_TOOLS: [&str; 4] = ["mkfs.erofs", "mkfs.ext4", "apt-get", "dpkg"];

/// The hypervisor vm-launcher runs: `CLAWOS_QEMU` (which the launchers the tests start
/// inherit), else `qemu-system-x86_64` on `PATH`.
fn qemu_bin() -> String {
    std::env::var("CLAWOS_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// Which of `tools` are missing here, as a sentence, or `None` when all are there.
fn missing(tools: &[String]) -> Option<String> {
    let gone: Vec<&str> = tools
        .iter()
        .map(String::as_str)
        .filter(|t| !have_tool(t))
        .collect();
    (!gone.is_empty()).then(|| format!("{} not installed", gone.join(", ")))
}

/// Whether this machine can build images; if not, records a skip naming what is missing
/// (the caller returns).
pub fn can_build_images(test: &str) -> bool {
    match missing(&IMAGE_TOOLS.map(String::from)) {
        Some(m) => {
            skip(
                test,
                &format!("{m}; this test builds an image (run scripts/setup.sh)"),
            );
            false
        }
        None => true,
    }
}

/// Which of the image tools and the hypervisor are missing here, if any.
fn missing_for_vms() -> Option<String> {
    let mut tools = vec![qemu_bin()];
    tools.extend(IMAGE_TOOLS.map(String::from));
    missing(&tools)
}

/// Why this machine cannot boot VMs (build an image and run the hypervisor), if it
/// cannot.
fn why_vms_cannot_boot() -> Option<String> {
    missing_for_vms().map(|m| format!("{m}; this test boots real VMs (run scripts/setup.sh)"))
}

/// Whether this machine can boot VMs; if not, records a skip naming what is missing
/// (the caller returns).
pub fn can_boot_vms(test: &str) -> bool {
    match why_vms_cannot_boot() {
        Some(why) => {
            skip(test, &why);
            false
        }
        None => true,
    }
}

/// Whether vm-launcher can start here for a test that boots nothing: it needs an image,
/// and it refuses to start without its hypervisor binary. If not, records a skip naming
/// what is missing (the caller returns).
pub fn can_start_launcher(test: &str) -> bool {
    match missing_for_vms() {
        Some(m) => {
            skip(
                test,
                &format!(
                    "{m}; this test starts vm-launcher, which needs an image and its hypervisor binary (run scripts/setup.sh)"
                ),
            );
            false
        }
        None => true,
    }
}

/// [`can_boot_vms`] for the benchmarks (not part of the test suite): says why not,
/// records nothing.
pub fn can_boot_vms_unrecorded(bench: &str) -> bool {
    match why_vms_cannot_boot() {
        Some(why) => {
            eprintln!("SKIP {bench}: {why}");
            false
        }
        None => true,
    }
}

/// Whether QEMU VMs get the vsock channel here (`vhost-device-vsock` installed).
pub fn can_use_vsock(test: &str) -> bool {
    let on_path = Command::new("sh")
        .args(["-c", "command -v vhost-device-vsock"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let in_cargo = std::env::var_os("HOME")
        .map(|h| {
            Path::new(&h)
                .join(".cargo/bin/vhost-device-vsock")
                .is_file()
        })
        .unwrap_or(false);
    if !(on_path || in_cargo) {
        skip(
            test,
            "vhost-device-vsock is not installed (scripts/setup.sh installs it); no guest channel",
        );
        return false;
    }
    true
}

/// A built and signed image plus its key.
#[derive(Debug)]
pub struct Artifacts {
    pub root: PathBuf,
    pub image_dir: PathBuf,
    pub public_key: String,
    pub manifest: clawos_image::Manifest,
}

/// A command's exit status and both outputs, for an assertion's message (stdout cut at
/// 20,000 characters).
pub fn show(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout)
            .chars()
            .take(20_000)
            .collect::<String>(),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// How the tests build images: Debian's current cloud kernel, the static guest binaries
/// of this checkout, busybox, a fixed timestamp (reproducible), into `out` (replaced).
pub fn image_options(
    out: &Path,
    cache: &Path,
    version: &str,
    agent: clawos_image::AgentChoice,
) -> clawos_image::BuildOptions {
    clawos_image::BuildOptions {
        kernel: clawos_image::KernelSource::Debian { package: None },
        cache_dir: cache.to_owned(),
        guest_bin_dir: guest_bin_dir(),
        rootfs_overlay: None,
        out: out.to_owned(),
        force: true,
        version: Some(version.to_owned()),
        source_date_epoch: Some(1_700_000_000),
        vmlinux: false,
        busybox: Some(clawos_image::build::DEFAULT_BUSYBOX.into()),
        agent,
    }
}

/// Builds (once per test process) and signs the default image.
pub fn artifacts() -> &'static Artifacts {
    static CELL: OnceLock<Artifacts> = OnceLock::new();
    deadline::watch_binary();
    CELL.get_or_init(|| build_artifacts().expect("build the test image"))
}

fn build_artifacts() -> Result<Artifacts> {
    let e2e = target_profile_dir().join("../e2e");
    let root = e2e.join(format!("run-{}", std::process::id()));
    // Leftovers of earlier runs whose process is gone.
    if let Ok(entries) = std::fs::read_dir(&e2e) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = n.strip_prefix("run-").and_then(|p| p.parse::<u32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    // A directory of this name is an earlier run's whose process had this pid (this
    // process builds once): its signing key would refuse to be made again.
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let image_dir = root.join("image");
    let opts = image_options(
        &image_dir,
        &e2e.join("cache"),
        "e2e",
        clawos_image::AgentChoice::Builtin,
    );
    let manifest = clawos_image::build(&opts, &mut |m| eprintln!("image build: {m}"))?;
    let key_path = root.join("signing.key");
    let key = clawos_image::keys::generate(&key_path)?;
    clawos_image::manifest::sign_bundle(&image_dir, &key)?;
    Ok(Artifacts {
        root,
        image_dir,
        public_key: clawos_image::keys::public_hex(&key),
        manifest,
    })
}

/// Builds (once per test process, downloads cached in `<target>/e2e/cache/openclaw`)
/// the OpenClaw image, signed with the test key. Needs npm and apt-get: a machine
/// without npm fails here, naming it.
pub fn openclaw_image() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    CELL.get_or_init(|| {
        assert!(
            have_tool("npm"),
            "npm is not installed: the OpenClaw image is built with it (scripts/setup.sh installs it)"
        );
        let a = artifacts();
        let dir = a.root.join("image-openclaw");
        let opts = image_options(
            &dir,
            &target_profile_dir().join("../e2e/cache"),
            "e2e-openclaw",
            clawos_image::AgentChoice::OpenClaw,
        );
        clawos_image::build(&opts, &mut |m| eprintln!("openclaw image build: {m}"))
            .expect("build the OpenClaw image");
        let key = clawos_image::keys::load(&a.root.join("signing.key")).expect("test key");
        clawos_image::manifest::sign_bundle(&dir, &key).expect("sign the OpenClaw image");
        dir
    })
}

/// Copies the image bundle to `dest` (to tamper with it).
pub fn copy_image(dest: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dest)?;
    for e in std::fs::read_dir(&artifacts().image_dir)? {
        let e = e?;
        std::fs::copy(e.path(), dest.join(e.file_name()))?;
    }
    Ok(dest.to_owned())
}

/// Flips one bit of a file at `offset`.
pub fn flip_byte(path: &Path, offset: u64) -> Result<()> {
    let mut bytes = std::fs::read(path)?;
    let i = usize::try_from(offset)?;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// A running `vm-launcher` process with its own state directory.
#[derive(Debug)]
pub struct Launcher {
    pub child: Option<Child>,
    pub url: String,
    pub state_dir: PathBuf,
    port: u16,
    extra_env: Vec<(String, String)>,
}

impl Launcher {
    /// Starts a launcher trusting the test key, with the test image as default.
    pub fn start(state_dir: &Path) -> Result<Self> {
        Self::start_with(state_dir, &[])
    }

    /// Like [`Launcher::start`] with extra environment.
    pub fn start_with(state_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        deadline::watch_binary();
        let mut l = Self {
            child: None,
            url: String::new(),
            state_dir: state_dir.to_owned(),
            port: port(),
            extra_env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        l.url = format!("http://127.0.0.1:{}", l.port);
        l.spawn()?;
        Ok(l)
    }

    /// (Re)starts the process on the same port and state.
    pub fn spawn(&mut self) -> Result<()> {
        let a = artifacts();
        std::fs::create_dir_all(&self.state_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("launcher.log"))?;
        let mut cmd = Command::new(bin("vm-launcher"));
        cmd.arg("--addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--image")
            .arg(&a.image_dir)
            .arg("--stop-timeout")
            .arg("30")
            .env("CLAWOS_SIGNING_PUBKEY", &a.public_key)
            .env_remove("CLAWOS_AGENT_ROOTHASH")
            .env_remove(clawos_vm_launcher_api::TOKEN_PATH_ENV)
            .env_remove("CLAWOS_LAUNCHER_ALLOWED_ORIGINS")
            .env_remove("CLAWOS_IDENTITY_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawn vm-launcher")?;
        deadline::launcher_started(&self.state_dir, child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("vm-launcher exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("vm-launcher did not listen within 20s: {}", self.log())
    }

    /// The launcher's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("launcher.log")).unwrap_or_default()
    }

    /// SIGKILLs the launcher process (VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The launcher's operator credential (`<state>/launcher/admin.token`, made by the
    /// launcher before it listens).
    pub fn token(&self) -> String {
        let path = clawos_vm_launcher_api::token_path(&self.state_dir);
        std::fs::read_to_string(&path)
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|e| panic!("operator credential {}: {e}", path.display()))
    }

    /// A typed client with the operator credential (without one when the launcher made
    /// none: a binary from before credentials, run through `CLAWOS_E2E_BIN_DIR`).
    pub fn client(&self) -> LauncherClient {
        let c = LauncherClient::new(&self.url);
        match std::fs::read_to_string(clawos_vm_launcher_api::token_path(&self.state_dir)) {
            Ok(t) => c.with_token(t.trim()),
            Err(_) => c,
        }
    }

    /// The `clawos` CLI against this launcher, as the local operator (it finds the
    /// credential in the state directory), ready for more arguments or other stdio.
    pub fn clawos_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("clawos"));
        cmd.args(args)
            .env("CLAWOS_LAUNCHER_URL", &self.url)
            .env("CLAWOS_STATE_DIR", &self.state_dir)
            .env_remove(clawos_vm_launcher_api::TOKEN_PATH_ENV);
        cmd
    }

    /// Runs the `clawos` CLI against this launcher.
    /// A call that outlives [`deadline::call_limit`] is killed and fails the test with
    /// the launcher's and the VMs' logs.
    pub fn clawos(&self, args: &[&str]) -> Output {
        self.clawos_within(args, None)
    }

    /// Runs the `clawos` CLI with `input` on its stdin.
    pub fn clawos_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        self.clawos_within(args, Some(input))
    }

    fn clawos_within(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let o = deadline::output_within(
            &mut self.clawos_command(args),
            input,
            deadline::call_limit(),
            || deadline::state_logs(&self.state_dir),
        );
        // A VM that did not come up: its console and the launcher's log say why, and a
        // test's failure output shows what the test printed (a test that expects the
        // refusal passes, and this stays unseen).
        if args.starts_with(&["vm", "start"]) && !o.status.success() {
            eprintln!(
                "`clawos {}` failed; the logs:\n{}",
                args.join(" "),
                deadline::state_logs(&self.state_dir)
            );
        }
        o
    }

    /// Polls until the VM satisfies `done`, or fails after `limit`.
    pub fn wait_for(&self, name: &str, limit: Duration, done: impl Fn(&Vm) -> bool) -> Result<Vm> {
        let rt = runtime();
        let client = self.client();
        let deadline = Instant::now() + limit;
        loop {
            let vm = rt.block_on(client.get(name))?;
            if done(&vm) {
                return Ok(vm);
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} still {} after {limit:?}: {vm:?}\nlauncher log:\n{}",
                    vm.state,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Hypervisors recorded in this launcher's state directory (`<pid> <start time>`)
    /// that still run: a pid taken since by another process (another test's, after
    /// the counter wrapped) is not one.
    pub fn hypervisor_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("vms")) {
            for e in entries.flatten() {
                let Ok(t) = std::fs::read_to_string(e.path().join("hypervisor.pid")) else {
                    continue;
                };
                let mut fields = t.split_whitespace();
                if let (Some(Ok(pid)), Some(Ok(start_time))) = (
                    fields.next().map(str::parse::<u32>),
                    fields.next().map(str::parse::<u64>),
                ) && (ProcessId { pid, start_time }).is_alive()
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Launcher {
    /// A handle on a launcher's state directory only (no process), whose drop ends the
    /// VMs recorded there: for the watchdog, which cannot run the real one's drop.
    pub(crate) fn stand_in_for(state_dir: &Path) -> Self {
        Self {
            child: None,
            url: String::new(),
            state_dir: state_dir.to_owned(),
            port: 0,
            extra_env: Vec::new(),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.kill9();
        if self.port != 0 {
            deadline::launcher_ended(&self.state_dir);
        }
        // Never leak VMs from a failed test: the hypervisors, their helpers (the vsock
        // device) and the VMs' cgroups, which the launcher would have removed.
        let mut cgroups = Vec::new();
        for pid in self.hypervisor_pids() {
            cgroups.extend(clawos_cgroups_of(pid));
            // SAFETY: kill takes plain integers; these pids are the test's own VMs.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for pid in self.helper_pids() {
            cgroups.extend(clawos_cgroups_of(pid));
            // SAFETY: as above; each was checked to be a vsock device process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        cgroups.sort();
        cgroups.dedup();
        // A killed hypervisor with gigabytes of guest memory can take seconds to go
        // under load; its cgroup cannot be removed before.
        let deadline = Instant::now() + Duration::from_secs(10);
        for d in cgroups {
            while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
                for pid in std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill takes plain integers; these are in the VM's cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if d.exists() {
                eprintln!(
                    "warning: a VM cgroup outlived the test: {} (processes: {:?})",
                    d.display(),
                    std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default()
                );
            }
        }
    }
}

impl Launcher {
    /// Helper processes (vsock devices) recorded in this launcher's VM records that
    /// still run (the same process: pid and start time) as such.
    fn helper_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("vms")) {
            for e in entries.flatten() {
                let Ok(r) = std::fs::read(e.path().join("vm.json")) else {
                    continue;
                };
                let r: serde_json::Value = serde_json::from_slice(&r).unwrap_or_default();
                for h in r["helpers"].as_array().into_iter().flatten() {
                    if let Ok(helper) = serde_json::from_value::<ProcessId>(h.clone())
                        && helper.is_alive()
                        && let pid = helper.pid
                        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                            String::from_utf8_lossy(&c).contains("vhost-device-vsock")
                        })
                    {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }
}

/// The directories of the per-VM cgroups (`clawos-…`) process `pid` is in.
fn clawos_cgroups_of(pid: u32) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut dirs = Vec::new();
    for l in own.lines() {
        let mut it = l.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let last = path.rsplit('/').next().unwrap_or("");
        if !last.starts_with("clawos-") {
            continue;
        }
        let first = ctrls.split(',').next().unwrap_or("");
        for m in mounts.lines() {
            let Some((pre, post)) = m.split_once(" - ") else {
                continue;
            };
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let fits = match first {
                "" => post.first() == Some(&"cgroup2"),
                c => {
                    post.first() == Some(&"cgroup")
                        && post.get(2).is_some_and(|o| o.split(',').any(|x| x == c))
                }
            };
            if fits
                && pre.len() > 4
                && let Some(rel) = path.strip_prefix(pre[3].trim_end_matches('/'))
            {
                dirs.push(PathBuf::from(pre[4]).join(rel.trim_start_matches('/')));
            }
        }
    }
    dirs
}

/// A small runtime for the typed client in synchronous tests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Whether any process's command line names this VM's hypervisor.
pub fn hypervisor_running_for(name: &str) -> bool {
    let needle = format!("clawos-{name},");
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries.flatten().any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// Reads a file out of an ext4 image with debugfs (no mount needed).
pub fn ext4_cat(image: &Path, path: &str) -> Result<String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .context("run debugfs (e2fsprogs)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until the VM has state `s`.
pub fn is(s: VmState) -> impl Fn(&Vm) -> bool {
    move |vm| vm.state == s
}

/// Starts a workspace daemon binary with its output in `log`, and waits for `port`.
pub fn spawn_daemon(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
    port: u16,
) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    let mut cmd = Command::new(bin(name));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    // Not left running behind the failure.
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "{name} did not listen on {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// A process's resident set size, KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A free loopback port for a daemon to bind (outside the ephemeral range: see
/// [`clawos_test_ports`]).
pub fn port() -> u16 {
    clawos_test_ports::free_port()
}

/// Stops every watch of the monitor-daemon at `url` whose state is in `state_dir` (the
/// VM processes vm-launcher registered); returns how many. Under software emulation a
/// hypervisor makes thousands of events a second that guest-side tests need not read.
pub fn monitor_unwatch_all(state_dir: &Path, url: &str) -> Result<usize> {
    let token = std::fs::read_to_string(clawos_monitor_api::token_path(state_dir))?;
    let client = clawos_monitor_api::MonitorClient::new(url, token.trim());
    let watched: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(state_dir.join("monitor/watches.json"))?)?;
    let rt = runtime();
    for w in &watched {
        let pid = w["req"]["pid"].as_u64().context("a pid watch")? as u32;
        rt.block_on(client.unwatch_pid(pid))?;
    }
    Ok(watched.len())
}

/// Whether the monitor's VM tests can run here: real VMs with vsock, and root with a
/// BTF kernel for the eBPF program. Says why not (loudly) when they cannot.
pub fn can_audit_vms(test: &str) -> bool {
    if !can_boot_vms(test) || !can_use_vsock(test) {
        return false;
    }
    can_run_monitor(test)
}

/// Whether monitor-daemon can run here (root, a kernel with BTF); records the skip
/// under `test` if not.
pub fn can_run_monitor(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/sys/kernel/btf/vmlinux").exists() {
        skip(
            test,
            "monitor-daemon loads eBPF programs: needs root and a kernel with BTF",
        );
        return false;
    }
    true
}

/// Starts a stand-in that announces itself on stdout with one line `listening on URL`
/// (`clawos-scripted-model`, `clawos-search-standin`); returns it and the URL.
pub fn spawn_announced(cmd: &mut Command) -> Result<(KillOnDrop, String)> {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let child = KillOnDrop(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    match line.trim().strip_prefix("listening on ") {
        Some(url) => Ok((child, url.to_owned())),
        None => bail!("{cmd:?} said {line:?}"),
    }
}

/// A daemon process that is killed (SIGKILL) when dropped, also when a test panics.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts monitor-daemon on `127.0.0.1:port` with its state in `state_dir` and its
/// output in `state_dir/<log>`.
pub fn start_monitor(state_dir: &Path, port: u16, log: &str) -> Result<KillOnDrop> {
    spawn_daemon(
        "monitor-daemon",
        &[
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            state_dir.to_str().context("state dir is not UTF-8")?,
        ],
        &[],
        &state_dir.join(log),
        port,
    )
    .map(KillOnDrop)
}

/// Starts identity-manager on a free loopback port with its state in `state_dir` and
/// its output in `log`; returns it (killed when dropped) and its URL.
pub fn start_identity_manager(state_dir: &Path, log: &Path) -> Result<(KillOnDrop, String)> {
    let port = port();
    let daemon = spawn_daemon(
        "identity-manager",
        &[
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            state_dir.to_str().context("state dir is not UTF-8")?,
        ],
        &[],
        log,
        port,
    )?;
    Ok((KillOnDrop(daemon), format!("http://127.0.0.1:{port}")))
}

/// Starts inference-proxy on `port` with its state in `state_dir`, one Anthropic
/// upstream (`upstream`, keyed with `api_key`) and the agent tokens of the JSON file
/// `tokens` instead of JWTs (its development mode, for tests about something else);
/// `env` adds settings. Its output goes to `log`.
pub fn spawn_proxy_with_static_tokens(
    state_dir: &Path,
    port: u16,
    (upstream, api_key): (&str, &str),
    tokens: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> Result<Child> {
    let mut all = vec![
        ("ANTHROPIC_API_KEY", api_key),
        ("CLAWOS_PROXY_ANTHROPIC_URL", upstream),
        (
            "CLAWOS_PROXY_STATIC_TOKENS",
            tokens.to_str().context("tokens path is not UTF-8")?,
        ),
        ("CLAWOS_PROXY_INSECURE_DEV_TOKENS", "1"),
    ];
    all.extend_from_slice(env);
    spawn_daemon(
        "inference-proxy",
        &[
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            state_dir.to_str().context("state dir is not UTF-8")?,
        ],
        &all,
        log,
        port,
    )
}

/// Compiles a C program to a static executable `dir/name` (for running inside a VM,
/// whose rootfs has no C library).
pub fn static_c_program(dir: &Path, name: &str, source: &str) -> Result<PathBuf> {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source)?;
    let bin = dir.join(name);
    let o = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("gcc (scripts/setup.sh installs gcc and libc6-dev)")?;
    if !o.status.success() {
        bail!("gcc: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(bin)
}

/// Copies the test image into `state`'s image store (`<state>/images/<name>/`, what
/// `clawos image add` makes) without any check, so a test can then change it the way
/// an attacker or a failing disk would. Returns the image's directory.
pub fn store_image(state: &Path, name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let images = state.join("images");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&images)?;
    std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o700))?;
    let dir = images.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    for e in std::fs::read_dir(&artifacts().image_dir)? {
        let e = e?;
        std::fs::copy(e.path(), dir.join(e.file_name()))?;
    }
    Ok(dir)
}

/// How a test names image `name` of `state`'s store in a start request: its name. With
/// `CLAWOS_E2E_IMAGE_BY_PATH` set it is the image's directory instead — how launchers
/// took images before they were chosen by name — so an attacker test can be run
/// against such a binary (with `CLAWOS_E2E_BIN_DIR`) to show that it fails there.
pub fn image_ref(state: &Path, name: &str) -> String {
    if std::env::var_os("CLAWOS_E2E_IMAGE_BY_PATH").is_some() {
        return state.join("images").join(name).display().to_string();
    }
    name.to_owned()
}

impl Launcher {
    /// `clawos image add NAME DIR` into this launcher's image store, checking the
    /// signature with the test key.
    pub fn add_image(&self, name: &str, dir: &Path) -> Output {
        self.clawos_command(&["image", "add", name])
            .arg(dir)
            .env("CLAWOS_SIGNING_PUBKEY", &artifacts().public_key)
            .stdin(Stdio::null())
            .output()
            .expect("run clawos image add")
    }
}

/// Where a VM's vsock sockets are (`vsock.sock` and the relays' `vsock.sock_<port>`):
/// the directory its record names (QEMU: `<vm>/vsock/`, owned by the VM's uid; a jailed
/// Firecracker: its chroot), else the VM's directory.
pub fn vsock_dir(state: &Path, vm: &str) -> PathBuf {
    let dir = state.join("vms").join(vm);
    std::fs::read(dir.join("vm.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|r| r["socket_dir"].as_str().map(PathBuf::from))
        .unwrap_or(dir)
}

/// The VM directories a launcher's state holds (a refused start must leave none).
pub fn vms_on_disk(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that `command` — a unit's command line, its binary under `prefix` (e.g.
/// `/usr/bin/`) — is taken by that binary as built here: every flag known, every value
/// valid. `--help` goes last: clap prints it and exits 0 only once everything before it
/// parsed. `${CREDENTIALS_DIRECTORY}` stands for a scratch directory.
pub fn assert_command_line_taken(command: &str, prefix: &str, what: &str) {
    let cred = tempfile::tempdir().expect("tmp");
    let command = command.replace(
        "${CREDENTIALS_DIRECTORY}",
        &cred.path().display().to_string(),
    );
    let mut words = command.split_whitespace();
    let binary = words
        .next()
        .and_then(|b| b.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("{what}: {command:?} does not start with {prefix}"));
    let o = Command::new(bin(binary))
        .args(words)
        .arg("--help")
        .env_clear()
        .output()
        .expect("binary");
    assert!(
        o.status.success(),
        "{what}: {binary} refuses {command:?}: {}",
        show(&o)
    );
}

/// The `clawos` Debian package of the binaries this test run uses (debug or release),
/// packed by `packaging/deb/build.sh --no-build` into `out`: its path.
pub fn build_deb(out: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profile = if bin("clawos").to_string_lossy().contains("/release/") {
        "release"
    } else {
        "debug"
    };
    let o = Command::new(root.join("packaging/deb/build.sh"))
        .args(["--profile", profile, "--no-build", "--out"])
        .arg(out)
        .output()
        .expect("packaging/deb/build.sh");
    assert!(o.status.success(), "build.sh: {}", show(&o));
    std::fs::read_dir(out)
        .expect("out")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb")
}
