//! Start→ready through vm-launcher vs the same image booted by a bare QEMU command,
//! alternating in the same run; launcher RSS idle and with 5 VMs running.
//!
//! ```sh
//! cargo build --release -p clawos-vm-launcher -p clawos-cli && scripts/build-guest.sh
//! cargo bench -p clawos-e2e --bench boot [-- ROUNDS]
//! ```

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clawos_e2e::{Launcher, artifacts, can_boot_vms_unrecorded, is, rss_kib, runtime};
use clawos_vm_launcher_api::{StartVm, VmState};

fn tsc_khz() -> u64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    let mhz: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))
        .and_then(|v| v.trim_start_matches([' ', '\t', ':']).trim().parse().ok())
        .expect("cpu MHz");
    (mhz * 1000.0).round() as u64
}

fn mkfs(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(mib << 20).expect("size");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("mkfs");
    assert!(ok.success());
}

/// The PLATFORM.md recipe, by hand: spawn → `CLAWOS_READY` on the console.
fn bare_qemu(dir: &Path) -> Duration {
    let a = artifacts();
    let img = &a.image_dir;
    let console = dir.join("console.log");
    let _ = std::fs::remove_file(&console);
    std::fs::write(dir.join("config.img"), vec![0u8; 4096]).expect("config");
    let drive = |id: &str, file: &Path, ro: bool| {
        [
            "-drive".to_owned(),
            format!(
                "id={id},file={},format=raw,if=none{}",
                file.display(),
                if ro { ",readonly=on" } else { "" }
            ),
            "-device".to_owned(),
            format!("virtio-blk-device,drive={id},serial={id}"),
        ]
    };
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-M",
            "microvm",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-chardev",
            &format!("file,id=c,path={}", console.display()),
            "-serial",
            "chardev:c",
        ])
        .args([
            "-device",
            "pvpanic",
            "-action",
            "panic=exit-failure",
            "-device",
            "virtio-rng-device",
        ])
        .arg("-kernel")
        .arg(img.join("vmlinuz"))
        .arg("-initrd")
        .arg(img.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 tsc_early_khz={} tsc=reliable {}",
            tsc_khz(),
            a.manifest.cmdline
        ))
        .args(drive("rootfs", &img.join("rootfs.img"), true))
        .args(drive("runtime", &dir.join("runtime.img"), false))
        .args(drive("workspace", &dir.join("workspace.img"), false))
        .args(drive("config", &dir.join("config.img"), true))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    loop {
        if std::fs::read_to_string(&console).is_ok_and(|c| c.contains("CLAWOS_READY")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "bare boot timed out"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn start_req(name: &str) -> StartVm {
    StartVm {
        name: name.into(),
        model: None,
        mem_mib: 256,
        vcpus: 1,
        image: None,
        snapshots: false,
        idempotency_key: None,
        token_budget: None,
    }
}

/// POST /v1/vms → state `running`, as a client sees it.
fn via_launcher(l: &Launcher, name: &str) -> Duration {
    let rt = runtime();
    let c = l.client();
    let started = Instant::now();
    rt.block_on(c.start(&start_req(name))).expect("start");
    loop {
        let vm = rt.block_on(c.get(name)).expect("get");
        if vm.state == VmState::Running {
            break;
        }
        assert!(vm.state == VmState::Starting, "{vm:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    rt.block_on(c.stop(name)).expect("stop");
    took
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if !can_boot_vms_unrecorded("bench boot") {
        return;
    }
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(7);
    let work = tempfile::tempdir().expect("tempdir");
    mkfs(&work.path().join("runtime.img"), 256);
    mkfs(&work.path().join("workspace.img"), 1024);
    let l = Launcher::start(&work.path().join("state")).expect("launcher");
    let pid = l.child.as_ref().expect("launcher child").id();
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(pid);

    // Warm the page cache and both paths once, then alternate.
    bare_qemu(work.path());
    via_launcher(&l, "warm");
    let (mut bare, mut launched) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        bare.push(bare_qemu(work.path()).as_secs_f64());
        launched.push(via_launcher(&l, &format!("b{i}")).as_secs_f64());
    }
    let (b50, l50) = (pct(&mut bare, 0.5), pct(&mut launched, 0.5));
    println!(
        "start->ready over {rounds} rounds (TCG, 256 MiB, 1 vCPU): bare QEMU p50 {b50:.3}s (min {:.3}s), launcher p50 {l50:.3}s (min {:.3}s), ratio {:.3}",
        bare[0],
        launched[0],
        l50 / b50
    );

    let rt = runtime();
    let c = l.client();
    for i in 0..5 {
        rt.block_on(c.start(&start_req(&format!("rss{i}"))))
            .expect("start");
    }
    for i in 0..5 {
        l.wait_for(
            &format!("rss{i}"),
            Duration::from_secs(300),
            is(VmState::Running),
        )
        .expect("running");
    }
    let busy = rss_kib(pid);
    let qemu: Vec<u64> = l.hypervisor_pids().into_iter().map(rss_kib).collect();
    println!(
        "vm-launcher RSS: idle {:.1} MiB, with 5 VMs running {:.1} MiB (each QEMU ~{:.0} MiB)",
        idle as f64 / 1024.0,
        busy as f64 / 1024.0,
        qemu.iter().sum::<u64>() as f64 / qemu.len().max(1) as f64 / 1024.0
    );
    for i in 0..5 {
        rt.block_on(c.stop(&format!("rss{i}"))).expect("stop");
    }
}
