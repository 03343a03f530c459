//! Ed25519 signing keys on disk: the private key is a hex seed in a 0600 file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::SigningKey;

use crate::manifest::ImageError;

/// Creates a new key at `path` (mode 0600, never overwriting an existing file) and
/// returns it.
pub fn generate(path: &Path) -> Result<SigningKey, ImageError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| ImageError::Key {
        reason: format!("no randomness from the OS: {e}"),
    })?;
    let key = SigningKey::from_bytes(&seed);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| ImageError::Write {
            path: path.to_owned(),
            source,
        })?;
    f.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| ImageError::Write {
            path: path.to_owned(),
            source,
        })?;
    Ok(key)
}

/// Loads a private key, refusing one that group or others can read.
pub fn load(path: &Path) -> Result<SigningKey, ImageError> {
    let read_err = |source| ImageError::Read {
        what: "signing key",
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(read_err)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ImageError::Key {
            reason: format!(
                "{} has mode {:o}; a private key must be readable by its owner only (chmod 600)",
                path.display(),
                mode & 0o777
            ),
        });
    }
    let text = fs::read_to_string(path).map_err(read_err)?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ImageError::Key {
            reason: format!("{} does not hold a 64-hex-character seed", path.display()),
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key of `key`, hex (the form `CLAWOS_SIGNING_PUBKEY` takes).
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_private_and_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        let k = generate(&p).expect("generate");
        assert_eq!(
            fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load(&p).expect("load").to_bytes(), k.to_bytes());
        // Never overwrites.
        assert!(generate(&p).is_err());
        // A key others can read is refused.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load(&p).expect_err("world-readable key must be refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
