//! The master key and what it protects: every private key in the store is sealed with
//! AES-256-GCM under a key derived (HKDF-SHA256) from the master key and a key version,
//! with the owner (agent or signing key id) as associated data, so a sealed key moved
//! to another row does not open.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::IdentityError;

/// Where the master key comes from.
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// `CLAWOS_MASTER_KEY`: 64 hex characters.
    Hex(String),
    /// `CLAWOS_MASTER_KEY_PATH`: created 0600 on first start, reused afterwards.
    Path(PathBuf),
}

/// The 32-byte master key. Never logged, never leaves the process.
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

fn parse_hex_key(text: &str, origin: &str) -> Result<[u8; 32], IdentityError> {
    hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            IdentityError::MasterKey(format!("{origin} must be 64 hex characters (32 bytes)"))
        })
}

impl MasterKey {
    /// Loads (or, for a path that does not exist yet, creates) the master key.
    pub fn load(source: &MasterKeySource) -> Result<Self, IdentityError> {
        match source {
            MasterKeySource::Hex(h) => Ok(Self(parse_hex_key(h, "CLAWOS_MASTER_KEY")?)),
            MasterKeySource::Path(p) => Self::from_file(p),
        }
    }

    fn from_file(path: &Path) -> Result<Self, IdentityError> {
        match fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(IdentityError::MasterKey(format!(
                        "{} has mode {:o}: a master key file must be readable by its owner only (chmod 600)",
                        path.display(),
                        mode & 0o777
                    )));
                }
                let text = fs::read_to_string(path).map_err(|e| {
                    IdentityError::MasterKey(format!("read {}: {e}", path.display()))
                })?;
                Ok(Self(parse_hex_key(&text, &path.display().to_string())?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                key.write_new_file(path)?;
                tracing::info!(path = %path.display(), "created a new master key");
                Ok(key)
            }
            Err(e) => Err(IdentityError::MasterKey(format!("{}: {e}", path.display()))),
        }
    }

    /// Writes the key to `path` (0600), replacing a stale file: atomically, so a crash
    /// leaves the old file or the whole new key, never a truncated one.
    pub fn write_new_file(&self, path: &Path) -> Result<(), IdentityError> {
        let text = format!("{}\n", hex::encode(self.0));
        clawos_service::atomic_write(path, text.as_bytes(), 0o600)
            .map_err(|e| IdentityError::MasterKey(format!("write {}: {e}", path.display())))
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k)
            .map_err(|e| IdentityError::MasterKey(format!("no OS randomness: {e}")))?;
        Ok(Self(k))
    }

    /// The key-encryption key for a key version.
    fn kek(&self, version: u32) -> Aes256Gcm {
        let hk = Hkdf::<Sha256>::new(Some(b"clawos identity-manager"), &self.0);
        let mut okm = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's output limit.
        let _ = hk.expand(format!("key wrap v{version}").as_bytes(), &mut okm);
        Aes256Gcm::new(&okm.into())
    }

    /// Seals `plaintext` for `owner` (associated data) under key version `version`:
    /// `nonce (12) || ciphertext+tag`.
    pub fn seal(
        &self,
        version: u32,
        owner: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, IdentityError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce)
            .map_err(|e| IdentityError::MasterKey(format!("no OS randomness: {e}")))?;
        let ct = self
            .kek(version)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| IdentityError::Internal("seal failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend(ct);
        Ok(out)
    }

    /// Opens what [`MasterKey::seal`] produced; fails for another key, version or owner.
    pub fn open(&self, version: u32, owner: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 12 + 16 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(12);
        self.kek(version)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: owner.as_bytes(),
                },
            )
            .ok()
    }
}

/// Reads a secret file (refusing one others can read), or creates it (0600, random).
pub fn load_or_create_secret(path: &Path) -> Result<String, IdentityError> {
    match fs::metadata(path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(IdentityError::MasterKey(format!(
                    "{} must be readable by its owner only (chmod 600)",
                    path.display()
                )));
            }
            let s = fs::read_to_string(path)
                .map_err(|e| IdentityError::Internal(format!("read {}: {e}", path.display())))?;
            let s = s.trim().to_owned();
            if s.len() < 32 {
                return Err(IdentityError::Invalid(format!(
                    "{}: credential shorter than 32 characters",
                    path.display()
                )));
            }
            Ok(s)
        }
        Err(_) => {
            let mut b = [0u8; 32];
            getrandom::fill(&mut b)
                .map_err(|e| IdentityError::Internal(format!("no OS randomness: {e}")))?;
            let s = hex::encode(b);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| IdentityError::Internal(format!("create {}: {e}", path.display())))?;
            f.write_all(s.as_bytes())
                .map_err(|e| IdentityError::Internal(format!("write {}: {e}", path.display())))?;
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_for_their_owner_version_and_master() {
        let a = MasterKey::generate().expect("key");
        let b = MasterKey::generate().expect("key");
        let s = a.seal(1, "agent:x", b"secret seed").expect("seal");
        assert_eq!(
            a.open(1, "agent:x", &s).as_deref(),
            Some(&b"secret seed"[..])
        );
        assert!(a.open(1, "agent:y", &s).is_none(), "owner is bound");
        assert!(a.open(2, "agent:x", &s).is_none(), "version is bound");
        assert!(b.open(1, "agent:x", &s).is_none(), "master key is bound");
        assert!(!s.windows(11).any(|w| w == b"secret seed"));
    }

    #[test]
    fn key_files_are_created_private_and_checked() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("master.key");
        let k1 = MasterKey::load(&MasterKeySource::Path(p.clone())).expect("create");
        assert_eq!(
            fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let k2 = MasterKey::load(&MasterKeySource::Path(p.clone())).expect("reuse");
        assert_eq!(k1.0, k2.0);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = MasterKey::load(&MasterKeySource::Path(p)).expect_err("world-readable");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let e = MasterKey::load(&MasterKeySource::Hex("abc".into())).expect_err("malformed");
        assert!(e.to_string().contains("64 hex"), "{e}");
    }
}
