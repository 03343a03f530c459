//! Host ↔ guest channel costs on a real VM (QEMU TCG here):
//! `clawos vm exec NAME -- true` round trip p50/p99 over 200 runs (the whole CLI
//! process, WebSocket, launcher, vsock, guest fork/exec), `vm cp` throughput both ways
//! for 50 MB, pause/resume latency through the API, and snapshot/restore of a 256 MiB
//! VM (against a cold boot of the same VM, and of the microvm it would otherwise be).
//!
//! ```sh
//! cargo build --release -p clawos-vm-launcher -p clawos-cli && scripts/build-guest.sh
//! cargo bench -p clawos-e2e --bench channel [-- RUNS]
//! ```

use std::time::{Duration, Instant};

use clawos_e2e::{Launcher, can_boot_vms_unrecorded, can_use_vsock, is, runtime};
use clawos_vm_launcher_api::{CreateSnapshot, RestoreVm, StartVm, VmState};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if !can_boot_vms_unrecorded("bench channel") || !can_use_vsock("bench channel") {
        return;
    }
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let state = tempfile::tempdir().expect("tempdir");
    let l = Launcher::start(state.path()).expect("launcher");
    let o = l.clawos(&["vm", "start", "bench", "--mem", "512"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_secs(1));

    let mut rt = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let o = l.clawos(&["vm", "exec", "bench", "--", "true"]);
        rt.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    println!(
        "exec `true` round trip over {runs} runs: p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut rt, 0.5),
        pct(&mut rt, 0.99)
    );

    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("in.bin");
    let data: Vec<u8> = (0..50_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write");
    let mb = data.len() as f64 / 1e6;
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let o = l.clawos(&["vm", "cp", src.to_str().expect("utf8"), "bench:big.bin"]);
        up.push(mb / t.elapsed().as_secs_f64());
        assert!(o.status.success());
        let out = work.path().join("out.bin");
        let t = Instant::now();
        let o = l.clawos(&["vm", "cp", "bench:big.bin", out.to_str().expect("utf8")]);
        down.push(mb / t.elapsed().as_secs_f64());
        assert!(o.status.success());
        assert_eq!(std::fs::read(&out).expect("read").len(), data.len());
    }
    println!(
        "cp 50 MB (median of 3): into the VM {:.0} MB/s, out of the VM {:.0} MB/s",
        pct(&mut up, 0.5),
        pct(&mut down, 0.5)
    );

    let rt_ = runtime();
    let c = l.client();
    let (mut p, mut r) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        rt_.block_on(c.pause("bench")).expect("pause");
        p.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        rt_.block_on(c.resume("bench")).expect("resume");
        r.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "pause p50 {:.1} ms (max {:.1}), resume p50 {:.1} ms (max {:.1}) over 20 cycles",
        pct(&mut p, 0.5),
        pct(&mut p, 1.0),
        pct(&mut r, 0.5),
        pct(&mut r, 1.0)
    );
    let o = l.clawos(&["vm", "exec", "bench", "--", "true"]);
    assert!(o.status.success(), "exec after pause/resume cycles");
    let _ = l.clawos(&["vm", "stop", "bench"]);

    snapshots(&l);
}

/// Cold boots of a 256 MiB microvm and of the snapshot-capable (`pc`) VM, then
/// snapshot → stop → restore cycles of the latter.
fn snapshots(l: &Launcher) {
    let rt = runtime();
    let c = l.client();
    let boot = |name: &str, snapshots: bool| {
        let t = Instant::now();
        rt.block_on(c.start(&StartVm {
            name: name.into(),
            model: None,
            mem_mib: 256,
            vcpus: 1,
            image: None,
            snapshots,
            idempotency_key: None,
            token_budget: None,
        }))
        .expect("start");
        l.wait_for(name, Duration::from_secs(180), is(VmState::Running))
            .expect("running");
        t.elapsed().as_secs_f64() * 1000.0
    };
    let (mut micro, mut pc) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        micro.push(boot("micro", false));
        rt.block_on(c.stop("micro")).expect("stop");
        pc.push(boot("snap", true));
        rt.block_on(c.stop("snap")).expect("stop");
    }
    let (micro, pc) = (pct(&mut micro, 0.5), pct(&mut pc, 0.5));
    println!(
        "cold boot to ready, 256 MiB (median of 3): microvm {micro:.0} ms, pc (snapshot-capable) {pc:.0} ms, ratio {:.2}",
        pc / micro
    );

    boot("snap", true);
    let o = l.clawos(&[
        "vm",
        "exec",
        "snap",
        "--",
        "sh",
        "-c",
        "sleep 100000 </dev/null >/dev/null 2>&1 &",
    ]);
    assert!(o.status.success());
    let (mut snap, mut frozen, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    let mut state_mib = 0;
    for i in 0..5 {
        let tag = format!("b{i}");
        let t = Instant::now();
        let s = rt
            .block_on(c.snapshot(
                "snap",
                &CreateSnapshot {
                    tag: Some(tag.clone()),
                },
            ))
            .expect("snapshot");
        snap.push(t.elapsed().as_secs_f64() * 1000.0);
        frozen.push(s.save_ms as f64);
        state_mib = s.state_bytes >> 20;
        rt.block_on(c.stop("snap")).expect("stop");
        let t = Instant::now();
        rt.block_on(c.restore(
            "snap",
            &RestoreVm {
                snapshot: tag.clone(),
            },
        ))
        .expect("restore");
        l.wait_for("snap", Duration::from_secs(60), is(VmState::Running))
            .expect("restored");
        restore.push(t.elapsed().as_secs_f64() * 1000.0);
        let o = l.clawos(&[
            "vm",
            "exec",
            "snap",
            "--",
            "sh",
            "-c",
            "ps | grep -q '[s]leep 100000'",
        ]);
        assert!(
            o.status.success(),
            "the process did not survive the restore: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        rt.block_on(c.delete_snapshot("snap", &tag)).expect("rm");
    }
    let restore_p50 = pct(&mut restore, 0.5);
    println!(
        "snapshot of a 256 MiB VM (median of 5): {:.0} ms to the API answer ({:.0} ms guest frozen, {state_mib} MiB state); \
         restore to guest ready {restore_p50:.0} ms, {:.2} of a cold boot",
        pct(&mut snap, 0.5),
        pct(&mut frozen, 0.5),
        restore_p50 / pc
    );
    rt.block_on(c.stop("snap")).expect("stop");
}
