//! Time limits that turn a hang into a red test with evidence instead of a CI run that
//! never ends: every `clawos` call the harness makes has one, and every test binary that
//! uses the harness has one as a whole.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Output, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// How long one CLI call may take (`CLAWOS_TEST_CALL_LIMIT_SECS` overrides): well
/// above the slowest legitimate call (`vm start` of an OpenClaw image waits for the
/// runtime to answer, 3 to 7 minutes under TCG on a busy machine), well below CI's limit.
const CALL_LIMIT: Duration = Duration::from_secs(15 * 60);

/// How long one test binary may run (`CLAWOS_TEST_BINARY_LIMIT_SECS` overrides). The
/// longest (the OpenClaw agent in a VM) takes about 15 min here.
const BINARY_LIMIT: Duration = Duration::from_secs(40 * 60);

fn limit_from_env(var: &str, default: Duration) -> Duration {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(default, Duration::from_secs)
}

/// The launchers alive in this process (state directory, pid), so a watchdog that ends
/// the process can end their VMs first (an abort runs no destructor).
static LIVE: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());

/// Notes a launcher started by the harness.
pub(crate) fn launcher_started(state_dir: &Path, pid: u32) {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|(d, _)| d != state_dir);
    live.push((state_dir.to_owned(), pid));
}

/// Forgets a launcher the harness has ended.
pub(crate) fn launcher_ended(state_dir: &Path) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(d, _)| d != state_dir);
}

/// The limit for one CLI call.
pub fn call_limit() -> Duration {
    limit_from_env("CLAWOS_TEST_CALL_LIMIT_SECS", CALL_LIMIT)
}

/// Starts (once per process) a watchdog that aborts the test binary when it has run
/// longer than its limit: the test runner then reports the binary as failed and the
/// suite goes on, instead of CI's own time limit ending the whole run.
pub fn watch_binary() {
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        let limit = limit_from_env("CLAWOS_TEST_BINARY_LIMIT_SECS", BINARY_LIMIT);
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            // Straight to the process's stderr: the test runner's capture (which
            // `eprintln!` would go to from here) dies with the abort, unprinted.
            let mut err = std::io::stderr();
            let _ = writeln!(
                err,
                "HUNG: test binary {exe} still running after {limit:?} \
                 (CLAWOS_TEST_BINARY_LIMIT_SECS); ending its launchers and VMs, then \
                 aborting it so the rest of the suite runs"
            );
            let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
            for (state_dir, pid) in live {
                let _ = writeln!(err, "{}", state_logs(&state_dir));
                // SAFETY: kill takes plain integers; the pid is a launcher this
                // process started and has not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                // What a launcher's drop does: its VMs, their helpers and cgroups.
                drop(crate::Launcher::stand_in_for(&state_dir));
            }
            std::process::abort();
        });
    });
}

/// Runs `cmd` with `stdin` as its input, collecting both output streams; kills it and
/// panics with `context()` (logs worth reading) when it outlives `limit`.
pub fn output_within(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
    context: impl FnOnce() -> String,
) -> Output {
    output_within_reading(
        cmd,
        stdin,
        limit,
        |mut out| {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        },
        context,
    )
}

/// [`output_within`], with the command's stdout read by `read_stdout` (on a thread of
/// its own) instead of at once: a test can read it as slowly as it likes.
pub fn output_within_reading(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
    read_stdout: impl FnOnce(ChildStdout) -> Vec<u8> + Send + 'static,
    context: impl FnOnce() -> String,
) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    let feeder = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        std::thread::spawn(move || {
            // The command may stop reading early; that is its business.
            let _ = pipe.write_all(&input);
        })
    });
    let out = child.stdout.take().expect("piped stdout");
    let stdout = std::thread::spawn(move || read_stdout(out));
    let mut err = child.stderr.take().expect("piped stderr");
    let stderr = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!(
                "HUNG: {shown} did not finish within {limit:?} (CLAWOS_TEST_CALL_LIMIT_SECS); \
                 killed it.\n--- its stdout (tail) ---\n{}\n--- its stderr (tail) ---\n{}\n{}",
                tail(&out, 2000),
                tail(&err, 4000),
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// The last `max` bytes of `s` (on a character boundary).
pub fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The tails of the launcher's log and of every VM's logs under `state_dir`: what a
/// reader of a hung test needs to see where it stopped.
pub fn state_logs(state_dir: &Path) -> String {
    let mut text = String::new();
    let mut add = |path: &Path| {
        if let Ok(body) = std::fs::read_to_string(path) {
            text.push_str(&format!(
                "--- {} (tail) ---\n{}\n",
                path.display(),
                tail(&body, 6000)
            ));
        }
    };
    add(&state_dir.join("launcher.log"));
    if let Ok(vms) = std::fs::read_dir(state_dir.join("vms")) {
        for vm in vms.flatten() {
            for log in ["console.log", "hypervisor.log", "vsock-device.log"] {
                add(&vm.path().join(log));
            }
        }
    }
    text
}
