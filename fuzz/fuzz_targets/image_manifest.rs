//! The image manifest (`clawos_image::manifest`): the launcher parses `manifest.json`
//! of a bundle before every boot, signed or (without a configured key) not. The input
//! is the manifest's bytes, written into a temporary bundle whose other files are
//! fixed; `verify` runs on it as the launcher runs it, without and with a signing key.
//!
//! Invariants: no panic; a manifest that verifies names the bundle's hashes and exact
//! rootfs size, has the current format version and survives a JSON round trip;
//! `read_manifest` agrees with `verify`; a signature by another key, or over other
//! bytes, never verifies; a pinned root hash is honoured.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use clawos_image::manifest::{self, ImageError, MANIFEST_VERSION, parse_public_key};
use clawos_image::{ImagePaths, Manifest, VerifyPolicy, files, verify};
use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;

/// The bundle's fixed files; the seed corpus's manifests name their hashes.
const KERNEL: &[u8] = b"clawos fuzz kernel\n";
const INITRAMFS: &[u8] = b"clawos fuzz initramfs\n";
const VMLINUX: &[u8] = b"clawos fuzz vmlinux\n";
const ROOTFS_SIZE: u64 = 8192;

struct Bundle {
    _dir: tempfile::TempDir,
    path: PathBuf,
    trusted: SigningKey,
    other: SigningKey,
    /// The trusted key configured, no pin.
    policy: VerifyPolicy,
    hashes: [String; 3],
}

fn bundle() -> &'static Bundle {
    static B: OnceLock<Bundle> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().to_owned();
        std::fs::write(path.join(files::KERNEL), KERNEL).expect("kernel");
        std::fs::write(path.join(files::INITRAMFS), INITRAMFS).expect("initramfs");
        std::fs::write(path.join(files::VMLINUX), VMLINUX).expect("vmlinux");
        std::fs::write(path.join(files::ROOTFS), vec![0u8; ROOTFS_SIZE as usize]).expect("rootfs");
        let hash = |f: &str| manifest::sha256_file(&path.join(f)).expect("hash");
        let hashes = [
            hash(files::KERNEL),
            hash(files::INITRAMFS),
            hash(files::VMLINUX),
        ];
        let trusted = SigningKey::from_bytes(&[5; 32]);
        Bundle {
            _dir: dir,
            path,
            policy: policy(&trusted, None),
            trusted,
            other: SigningKey::from_bytes(&[6; 32]),
            hashes,
        }
    })
}

fn policy(key: &SigningKey, pin: Option<String>) -> VerifyPolicy {
    VerifyPolicy {
        public_key: Some(
            parse_public_key(&hex(key.verifying_key().as_bytes())).expect("public key"),
        ),
        pinned_root_hash: pin,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn write_signature(b: &Bundle, key: &SigningKey, over: &[u8]) {
    let sig = key.sign(over);
    std::fs::write(
        b.path.join(files::SIGNATURE),
        format!("{}\n", hex(&sig.to_bytes())),
    )
    .expect("signature");
}

fn check_ok(b: &Bundle, m: &Manifest) {
    assert_eq!(m.manifest_version, MANIFEST_VERSION);
    // Hex digits in either case name the same hash.
    assert!(m.kernel_sha256.eq_ignore_ascii_case(&b.hashes[0]));
    assert!(m.initramfs_sha256.eq_ignore_ascii_case(&b.hashes[1]));
    if let Some(v) = &m.vmlinux_sha256 {
        assert!(v.eq_ignore_ascii_case(&b.hashes[2]));
    }
    assert_eq!(m.rootfs_size, ROOTFS_SIZE);
    let again: Manifest =
        serde_json::from_slice(&serde_json::to_vec(m).expect("serialize")).expect("reparse");
    assert_eq!(&again, m, "JSON round trip changed the manifest");
}

fuzz_target!(|data: &[u8]| {
    let b = bundle();
    let paths = ImagePaths::bundle(&b.path);
    std::fs::write(&paths.manifest, data).expect("manifest");

    // No key configured: the bytes are parsed as they are.
    let _ = std::fs::remove_file(&paths.signature);
    let unsigned = verify(&paths, &VerifyPolicy::default());
    let read = manifest::read_manifest(&paths.manifest);
    match (&unsigned, &read) {
        (Ok(m), Ok((r, bytes))) => {
            check_ok(b, m);
            assert_eq!(m, r);
            assert_eq!(bytes.as_slice(), data);
        }
        (Ok(_), Err(e)) => panic!("verify accepted what read_manifest refuses: {e}"),
        (Err(ImageError::ManifestSyntax { .. } | ImageError::ManifestVersion { .. }), Ok(_)) => {
            panic!("verify refused the syntax read_manifest accepts")
        }
        _ => {}
    }

    // A key configured and no signature: refused before parsing.
    assert!(matches!(
        verify(&paths, &b.policy),
        Err(ImageError::Unsigned { .. })
    ));
    // A signature file that is not 64 hex bytes.
    std::fs::write(&paths.signature, &data[..data.len().min(200)]).expect("sig");
    assert!(verify(&paths, &b.policy).is_err());

    // Signatures are over the raw bytes, whatever they hold: checked (at some cost in
    // speed) only for inputs that parse, where the verdicts below are worth comparing.
    if read.is_err() {
        return;
    }
    // Signed by the trusted key: the same answer as unsigned.
    write_signature(b, &b.trusted, data);
    let signed = verify(&paths, &b.policy);
    assert_eq!(
        signed.as_ref().ok(),
        unsigned.as_ref().ok(),
        "a valid signature changed the verdict"
    );
    if let Ok(m) = &signed {
        // A pin equal to the root hash (in any case) passes; another one does not.
        let pin = m.verity.root_hash.to_ascii_uppercase();
        assert!(verify(&paths, &policy(&b.trusted, Some(pin))).is_ok());
        let other = if m.verity.root_hash == "0".repeat(64) {
            "1".repeat(64)
        } else {
            "0".repeat(64)
        };
        assert!(matches!(
            verify(&paths, &policy(&b.trusted, Some(other))),
            Err(ImageError::RootHashPin { .. })
        ));
    }
    // The same bytes with one more: the signature no longer verifies.
    let mut tampered = data.to_vec();
    tampered.push(b' ');
    std::fs::write(&paths.manifest, &tampered).expect("manifest");
    assert!(matches!(
        verify(&paths, &b.policy),
        Err(ImageError::SignatureMismatch { .. })
    ));
    std::fs::write(&paths.manifest, data).expect("manifest");
    // Signed by another key: never verifies.
    write_signature(b, &b.other, data);
    assert!(matches!(
        verify(&paths, &b.policy),
        Err(ImageError::SignatureMismatch { .. })
    ));
});
