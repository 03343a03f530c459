//! Our dm-verity tree must be byte-identical to `veritysetup format` with the same salt,
//! UUID and geometry, and `veritysetup verify` must accept it.

use std::path::Path;
use std::process::Command;

use clawos_image::verity;

/// Whether `veritysetup` runs here; if not, records a skip (the caller returns).
fn have_veritysetup(test: &str) -> bool {
    let ok = Command::new("veritysetup")
        .arg("--version")
        .output()
        .is_ok();
    if !ok {
        clawos_test_skip::record(
            test,
            "veritysetup not installed (apt-get install cryptsetup-bin); cannot cross-check",
        );
    }
    ok
}

/// Deterministic pseudo-random data, so every block hashes differently.
fn data(blocks: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..blocks * verity::BLOCK_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn uuid_text(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn veritysetup(args: &[&str]) -> String {
    let out = Command::new("veritysetup")
        .args(args)
        .output()
        .expect("run veritysetup");
    assert!(
        out.status.success(),
        "veritysetup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cross_check(dir: &Path, blocks: u64) {
    let ours = dir.join(format!("ours-{blocks}"));
    let theirs = dir.join(format!("theirs-{blocks}"));
    let bytes = data(blocks, blocks);
    std::fs::write(&ours, &bytes).expect("write");
    std::fs::write(&theirs, &bytes).expect("write");
    let salt = [0x5au8; 32];
    let uuid = [
        0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x47, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
        0x00,
    ];
    let g = verity::format(&ours, None, &salt, &uuid).expect("our verity format");

    let t = theirs.to_str().expect("utf8");
    let out = veritysetup(&[
        "format",
        &format!("--hash-offset={}", blocks * verity::BLOCK_SIZE),
        &format!("--data-blocks={blocks}"),
        &format!("--salt={}", hex::encode(salt)),
        &format!("--uuid={}", uuid_text(&uuid)),
        t,
        t,
    ]);
    assert!(
        out.contains(&g.root_hash),
        "root hash differs: ours {} vs\n{out}",
        g.root_hash
    );
    let a = std::fs::read(&ours).expect("read");
    let b = std::fs::read(&theirs).expect("read");
    assert_eq!(a.len(), b.len(), "image sizes differ for {blocks} blocks");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "images differ at byte {i} (block {}) for {blocks} data blocks",
            i as u64 / verity::BLOCK_SIZE
        );
    }
    assert_eq!(g.image_size(), a.len() as u64);

    let o = ours.to_str().expect("utf8");
    veritysetup(&[
        "verify",
        &format!("--hash-offset={}", blocks * verity::BLOCK_SIZE),
        &format!("--data-blocks={blocks}"),
        o,
        o,
        &g.root_hash,
    ]);
}

#[test]
fn tree_is_identical_to_veritysetup_for_one_two_and_three_levels() {
    if !have_veritysetup("tree_is_identical_to_veritysetup_for_one_two_and_three_levels") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // 1 block (no tree level), 1 level, 2 levels with a partial last block, and 3 levels.
    for blocks in [1, 100, 129, 5000, 128 * 128 + 3] {
        cross_check(dir.path(), blocks);
    }
}

#[test]
fn veritysetup_rejects_our_image_after_a_bit_flip() {
    if !have_veritysetup("veritysetup_rejects_our_image_after_a_bit_flip") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("img");
    std::fs::write(&p, data(300, 9)).expect("write");
    let g = verity::format(&p, None, &[1; 32], &[2; 16]).expect("format");
    let mut bytes = std::fs::read(&p).expect("read");
    bytes[200 * 4096 + 17] ^= 0x01;
    std::fs::write(&p, &bytes).expect("write");
    let s = p.to_str().expect("utf8");
    let out = Command::new("veritysetup")
        .args([
            "verify",
            "--hash-offset=1228800",
            "--data-blocks=300",
            s,
            s,
            &g.root_hash,
        ])
        .output()
        .expect("run");
    // Any non-zero exit is not enough (a bad argument is one too): veritysetup must
    // say the data area failed, at the flipped block.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("Verification failed at position 819200.")
            && stderr.contains("Verification of data area failed."),
        "a flipped data bit (block 200, byte 819217) must fail verification there: {:?}\n{stderr}",
        out.status
    );
}
