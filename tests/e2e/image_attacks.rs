//! The attacker's side of "verify what you boot" (issue 12, item 2): images are chosen by
//! name only; the files of an image are opened once, checked and hashed through that
//! descriptor, and the hypervisor gets those bytes; a FIFO or a device where a file
//! should be is refused at once; a refusal never tells the caller a file's size or hash.
//!
//! Each test fails against a launcher from before (run them with `CLAWOS_E2E_BIN_DIR`
//! naming such binaries and `CLAWOS_E2E_IMAGE_BY_PATH=1`, since those took images as
//! paths): it boots a path it is given, hangs on a FIFO, spins on `/dev/zero` and then
//! ignores SIGTERM, puts the hash of a root-only file in its error, and boots an
//! initramfs swapped in after it checked the original.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clawos_e2e::{
    Launcher, artifacts, can_boot_vms, hypervisor_running_for, image_ref, skip, store_image,
};

/// What a start request got: status and error body, or `None` when no answer came in
/// time.
fn start(l: &Launcher, vm: &str, image: &str, limit: Duration) -> Option<(u16, serde_json::Value)> {
    let token = std::fs::read_to_string(clawos_vm_launcher_api::token_path(&l.state_dir)).ok();
    clawos_e2e::runtime().block_on(async {
        let mut req = reqwest::Client::new()
            .post(format!("{}/v1/vms", l.url))
            .timeout(limit)
            .json(&serde_json::json!({"name": vm, "mem_mib": 256, "image": image}));
        if let Some(t) = &token {
            req = req.bearer_auth(t.trim());
        }
        let r = req.send().await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.json().await.unwrap_or_default()))
    })
}

/// A VM's state as the API reports it (`None` when it cannot be read).
fn state_of(l: &Launcher, vm: &str) -> Option<String> {
    let token = std::fs::read_to_string(clawos_vm_launcher_api::token_path(&l.state_dir)).ok();
    clawos_e2e::runtime().block_on(async {
        let mut req = reqwest::Client::new()
            .get(format!("{}/v1/vms/{vm}", l.url))
            .timeout(Duration::from_secs(10));
        if let Some(t) = &token {
            req = req.bearer_auth(t.trim());
        }
        let v: serde_json::Value = req.send().await.ok()?.json().await.ok()?;
        v["state"].as_str().map(str::to_owned)
    })
}

fn message(body: &serde_json::Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn code(body: &serde_json::Value) -> String {
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_path_as_image_is_refused_images_are_chosen_by_name() {
    if !can_boot_vms("a_path_as_image_is_refused_images_are_chosen_by_name") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let l = Launcher::start(&state).expect("launcher");
    // A valid, signed bundle at a path the caller names: still refused.
    let bundle = artifacts().image_dir.display().to_string();
    for (vm, image) in [
        ("by-path", bundle.as_str()),
        ("by-etc", "/etc"),
        ("by-dots", "../../x"),
    ] {
        let (status, body) = start(&l, vm, image, Duration::from_secs(30)).expect("an answer");
        assert_eq!(status, 400, "{vm}: {body}");
        assert!(
            message(&body).contains("invalid image name"),
            "{vm}: {body}"
        );
        assert!(
            !hypervisor_running_for(vm),
            "{vm}: a VM process was started"
        );
    }
    // A name in the store that is a symlink to a bundle elsewhere: refused too.
    std::fs::create_dir_all(state.join("images")).expect("store");
    std::os::unix::fs::symlink(&artifacts().image_dir, state.join("images/linked")).expect("ln");
    let (status, body) = start(
        &l,
        "by-link",
        &image_ref(&state, "linked"),
        Duration::from_secs(30),
    )
    .expect("an answer");
    assert_eq!(status, 422, "{body}");
    assert!(
        message(&body).contains("image directory is a symbolic link"),
        "{body}"
    );
    assert!(!hypervisor_running_for("by-link"));
    assert!(
        clawos_e2e::vms_on_disk(&state).is_empty(),
        "refused starts left {:?}",
        clawos_e2e::vms_on_disk(&state)
    );
}

#[test]
fn a_fifo_or_dev_zero_as_initramfs_is_refused_at_once_and_sigterm_still_stops_the_launcher() {
    if !can_boot_vms(
        "a_fifo_or_dev_zero_as_initramfs_is_refused_at_once_and_sigterm_still_stops_the_launcher",
    ) {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let mut l = Launcher::start(&state).expect("launcher");
    let fifo = store_image(&state, "fifo")
        .expect("store")
        .join("initramfs.cpio.gz");
    std::fs::remove_file(&fifo).expect("rm");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("c path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    let zero = store_image(&state, "zero")
        .expect("store")
        .join("initramfs.cpio.gz");
    std::fs::remove_file(&zero).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("ln");

    // Every symptom is collected first, so one run against an old launcher shows them all.
    let mut failures = Vec::new();
    for (vm, image, how) in [
        ("v-fifo", "fifo", "initramfs is not a regular file"),
        ("v-zero", "zero", "initramfs is a symbolic link"),
    ] {
        let asked = Instant::now();
        match start(&l, vm, &image_ref(&state, image), Duration::from_secs(20)) {
            None => failures.push(format!("{vm}: no answer within 20 s")),
            Some((status, body)) => {
                let took = asked.elapsed();
                if status != 422 || code(&body) != "image_invalid" || !message(&body).contains(how)
                {
                    failures.push(format!("{vm}: not refused as {how:?}: {status} {body}"));
                }
                if took > Duration::from_secs(5) {
                    failures.push(format!("{vm}: refused only after {took:?}"));
                }
            }
        }
        if hypervisor_running_for(vm) {
            failures.push(format!("{vm}: a VM process was started"));
        }
    }
    let healthy = clawos_e2e::runtime().block_on(async {
        reqwest::Client::new()
            .get(format!("{}/healthz", l.url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    });
    if !healthy {
        failures.push("the launcher no longer answers /healthz".into());
    }
    let child = l.child.as_mut().expect("launcher process");
    // SAFETY: kill takes plain integers; this is the test's own launcher.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let asked = Instant::now();
    let mut stopped = false;
    while asked.elapsed() < Duration::from_secs(20) {
        if child.try_wait().ok().flatten().is_some() {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !stopped {
        failures.push("SIGTERM did not stop the launcher within 20 s".into());
    }
    assert!(
        failures.is_empty(),
        "{failures:#?}\nlauncher log:\n{}",
        l.log()
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    let t = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(t.path(), bytes).expect("write");
    clawos_image::manifest::sha256_file(t.path()).expect("hash")
}

#[test]
fn a_bundle_pointing_at_root_only_files_is_refused_without_their_size_or_hash() {
    if !can_boot_vms("a_bundle_pointing_at_root_only_files_is_refused_without_their_size_or_hash") {
        return;
    }
    if !is_root() {
        skip(
            "a_bundle_pointing_at_root_only_files_is_refused_without_their_size_or_hash",
            "needs root to read /etc/shadow and make a root-only file",
        );
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let l = Launcher::start(&state).expect("launcher");
    // A symlink to a root-only host file.
    let shadow = std::fs::read("/etc/shadow").expect("read /etc/shadow");
    let link = store_image(&state, "shadow")
        .expect("store")
        .join("initramfs.cpio.gz");
    std::fs::remove_file(&link).expect("rm");
    std::os::unix::fs::symlink("/etc/shadow", &link).expect("ln");
    // A root-only file's contents in place of the initramfs (a hard link: a regular file
    // of the right owner, so it is read and hashed).
    let secret: Vec<u8> = (0..123_457u32).map(|i| (i * 7 + 3) as u8).collect();
    let secret_path = work.path().join("secret");
    std::fs::write(&secret_path, &secret).expect("secret");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let hard = store_image(&state, "secret")
        .expect("store")
        .join("initramfs.cpio.gz");
    std::fs::remove_file(&hard).expect("rm");
    std::fs::hard_link(&secret_path, &hard).expect("link");

    for (vm, image, bytes, how, code_) in [
        (
            "v-shadow",
            "shadow",
            &shadow,
            "initramfs is a symbolic link",
            "image_invalid",
        ),
        (
            "v-secret",
            "secret",
            &secret,
            "initramfs hash mismatch",
            "image_hash_mismatch",
        ),
    ] {
        let (status, body) =
            start(&l, vm, &image_ref(&state, image), Duration::from_secs(30)).expect("an answer");
        let text = body.to_string();
        let (hash, size) = (sha256_hex(bytes), bytes.len().to_string());
        assert!(
            !text.contains(&hash),
            "{vm}: the refusal gives away the file's sha256: {text}"
        );
        assert!(
            bytes.len() < 10_000 || !text.contains(&size),
            "{vm}: the refusal gives away the file's size: {text}"
        );
        assert_eq!(status, 422, "{vm}: {text}");
        assert_eq!(code(&body), code_, "{vm}: {text}");
        assert!(message(&body).contains(how), "{vm}: {text}");
        assert!(
            !hypervisor_running_for(vm),
            "{vm}: a VM process was started"
        );
    }
}

/// An initramfs whose `/init` says so on the console and powers off: what an attacker
/// would swap in.
fn evil_initramfs() -> Vec<u8> {
    use clawos_image::cpio::{CpioWriter, Entry};
    let busybox = std::fs::read("/bin/busybox").expect("static busybox (scripts/setup.sh)");
    let mut w = CpioWriter::new(Vec::new());
    for (path, mode) in [("dev", 0o755), ("bin", 0o755)] {
        w.add(&Entry::Dir { path, mode }).expect("dir");
    }
    w.add(&Entry::CharDev {
        path: "dev/console",
        mode: 0o600,
        major: 5,
        minor: 1,
    })
    .expect("console");
    w.add(&Entry::File {
        path: "bin/busybox",
        mode: 0o755,
        data: &busybox,
    })
    .expect("busybox");
    w.add(&Entry::File {
        path: "init",
        mode: 0o755,
        data: b"#!/bin/busybox sh\n/bin/busybox echo CLAWOS_SWAPPED_INITRAMFS_RAN\n/bin/busybox poweroff -f\n",
    })
    .expect("init");
    w.finish().expect("cpio")
}

/// Waits (inotify) for the first open of each watched file and then renames its
/// replacement over it. Returns the names swapped.
fn swap_on_open(files: Vec<(PathBuf, PathBuf)>) -> std::thread::JoinHandle<Vec<PathBuf>> {
    // SAFETY: inotify_init1 takes flags only.
    let ino = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    assert!(ino >= 0, "inotify");
    let mut watches = Vec::new();
    for (target, replacement) in files {
        let c = std::ffi::CString::new(target.as_os_str().as_bytes()).expect("c path");
        // SAFETY: a valid NUL-terminated path and our inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(ino, c.as_ptr(), libc::IN_OPEN) };
        assert!(wd >= 0, "watch {}", target.display());
        watches.push((wd, target, replacement));
    }
    std::thread::spawn(move || {
        let mut swapped = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(120);
        while !watches.is_empty() && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: ino,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: reads into a buffer we own, of its length.
            let n = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
            let mut at = 0usize;
            while n > 0 && at + std::mem::size_of::<libc::inotify_event>() <= n as usize {
                // SAFETY: the kernel wrote whole events; read one header unaligned.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
                at += std::mem::size_of::<libc::inotify_event>() + ev.len as usize;
                if let Some(i) = watches.iter().position(|(wd, _, _)| *wd == ev.wd) {
                    let (_, target, replacement) = watches.remove(i);
                    std::fs::rename(&replacement, &target).expect("swap");
                    swapped.push(target);
                }
            }
        }
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(ino) };
        swapped
    })
}

#[test]
fn an_initramfs_and_rootfs_swapped_after_they_were_checked_are_never_booted() {
    if !can_boot_vms("an_initramfs_and_rootfs_swapped_after_they_were_checked_are_never_booted") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let l = Launcher::start(&state).expect("launcher");
    let image = store_image(&state, "race").expect("store");
    // The replacements wait in the same directory (a rename cannot cross filesystems).
    let evil_initrd = image.join(".evil-initramfs");
    std::fs::write(&evil_initrd, evil_initramfs()).expect("evil initramfs");
    let size = std::fs::metadata(image.join("rootfs.img"))
        .expect("rootfs")
        .len();
    let evil_rootfs = image.join(".evil-rootfs");
    std::fs::write(
        &evil_rootfs,
        vec![0x5a; usize::try_from(size).expect("size")],
    )
    .expect("evil rootfs");
    // Each file is replaced the moment the launcher first opens it: after that, its
    // path names the attacker's bytes.
    let swapper = swap_on_open(vec![
        (image.join("initramfs.cpio.gz"), evil_initrd),
        (image.join("rootfs.img"), evil_rootfs),
    ]);
    let (status, body) = start(
        &l,
        "raced",
        &image_ref(&state, "race"),
        Duration::from_secs(60),
    )
    .expect("an answer");
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut vm_state = state_of(&l, "raced");
    while vm_state.as_deref() == Some("starting") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        vm_state = state_of(&l, "raced");
    }
    let swapped = swapper.join().expect("swapper");
    let console = std::fs::read_to_string(state.join("vms/raced/console.log")).unwrap_or_default();
    assert!(
        !console.contains("CLAWOS_SWAPPED_INITRAMFS_RAN"),
        "the swapped-in initramfs was booted:\n{console}"
    );
    assert!(
        swapped.contains(&image.join("initramfs.cpio.gz")),
        "the launcher never opened the initramfs in the store ({swapped:?}; start: {status} {body})"
    );
    // Verified bytes or a refusal, never the swapped ones: here the open descriptors were
    // checked before the swap could matter, so the VM boots the signed image.
    assert_eq!(status, 202, "{body}");
    assert_eq!(vm_state.as_deref(), Some("running"), "console:\n{console}");
    assert!(swapped.contains(&image.join("rootfs.img")), "{swapped:?}");
    assert_ne!(
        std::fs::read(image.join("initramfs.cpio.gz")).expect("store"),
        std::fs::read(artifacts().image_dir.join("initramfs.cpio.gz")).expect("original"),
        "the store holds the attacker's initramfs by now"
    );
    // QEMU booted the launcher's verified copy and the checked rootfs descriptor.
    let copy = state.join("vms/raced/boot/initramfs.cpio.gz");
    assert_eq!(
        clawos_image::manifest::sha256_file(&copy).expect("copy"),
        artifacts().manifest.initramfs_sha256
    );
    let o = l.clawos(&["vm", "stop", "raced"]);
    assert!(o.status.success(), "{o:?}");
}
