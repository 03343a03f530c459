//! Verity tree build throughput: ours vs `veritysetup format`, same data, same run.
//!
//! `cargo bench -p clawos-image --bench verity [-- MiB]` (default 256 MiB). Both read
//! the image from the page cache (it was just written); the median of 5 runs each is
//! reported, with the ratio ours/veritysetup in throughput.

use std::process::Command;
use std::time::Instant;

use clawos_image::verity;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(256);
    let blocks = mib * 256;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_path = dir.path().join("data");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..blocks * verity::BLOCK_SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&data_path, &data).expect("write");
    let salt = [7u8; 32];
    let uuid = [9u8; 16];
    let work = dir.path().join("work");
    let bytes = (blocks * verity::BLOCK_SIZE) as f64;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut roots = (String::new(), String::new());
    for _ in 0..5 {
        std::fs::copy(&data_path, &work).expect("copy");
        let t = Instant::now();
        let g = verity::format(&work, Some(blocks), &salt, &uuid).expect("format");
        ours.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        roots.0 = g.root_hash;

        std::fs::copy(&data_path, &work).expect("copy");
        let w = work.to_str().expect("utf8");
        let t = Instant::now();
        let out = Command::new("veritysetup")
            .args([
                "format",
                &format!("--hash-offset={}", blocks * verity::BLOCK_SIZE),
                &format!("--data-blocks={blocks}"),
                &format!("--salt={}", hex::encode(salt)),
                "--uuid=09090909-0909-0909-0909-090909090909",
                w,
                w,
            ])
            .output()
            .expect("run veritysetup (apt-get install cryptsetup-bin)");
        theirs.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        roots.1 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:").map(|h| h.trim().to_owned()))
            .unwrap_or_default();
    }
    assert_eq!(roots.0, roots.1, "root hashes differ");
    let (o, t) = (median(ours), median(theirs));
    println!(
        "verity tree over {mib} MiB ({} cores): ours {o:.0} MB/s, veritysetup {t:.0} MB/s, ratio {:.2}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        o / t
    );
}
