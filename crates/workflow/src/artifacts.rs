//! The content-addressed artifact store: the files agents write under
//! `/workspace/out/`, kept by their SHA-256 so that steps pass small [`ArtifactRef`]s
//! around instead of files, the same file stored twice takes the room of one, and a
//! reader can check that what it got is what was written.
//!
//! Layout: `<dir>/sha256/<first 2 hex>/<64 hex>`, each file 0600 in 0700 directories
//! (artifacts hold whatever agents produced). A file is written to `<dir>/tmp/`,
//! fsynced, then renamed into place (and the directory fsynced), so a crash leaves
//! either the whole artifact or none; a reader never sees half a file under a hash.
//!
//! The API is blocking `std::fs`; async callers wrap it in `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stored artifact: what steps pass to each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// 64 lowercase hex: the content's SHA-256, and its key in the store.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// e.g. `text/markdown`.
    pub media_type: String,
    /// The file's path relative to `/workspace/out/` (e.g. `notes.md`,
    /// `figures/a.png`): where a later step finds it under `/workspace/in/<step>/`.
    pub name: String,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Not 64 lowercase hex characters (so never a path).
    #[error("not a sha256: {0:?} (want 64 lowercase hex characters)")]
    BadSha(String),
    /// An artifact name that could escape its directory or is unreadable.
    #[error("bad artifact name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    /// A media type that is not `type/subtype`.
    #[error("bad media type {0:?} (want e.g. text/markdown)")]
    BadMediaType(String),
    /// Nothing stored under that hash.
    #[error("no artifact {0}")]
    NotFound(String),
    /// The stored bytes no longer hash to their name.
    #[error("artifact {expected} is corrupt: its content hashes to {actual}")]
    Corrupt { expected: String, actual: String },
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Checks that `s` is a sha256 in lowercase hex.
pub fn validate_sha(s: &str) -> Result<(), ArtifactError> {
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ArtifactError::BadSha(s.chars().take(80).collect()))
    }
}

/// Checks an artifact name: a relative path of plain components, so that copying it
/// under `/workspace/in/<step>/` can never land elsewhere.
pub fn validate_name(name: &str) -> Result<(), ArtifactError> {
    let bad = |why| {
        Err(ArtifactError::BadName {
            name: name.chars().take(300).collect(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if name.starts_with('/') {
        return bad("absolute");
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control characters or backslashes");
    }
    for part in name.split('/') {
        match part {
            "" => return bad("empty path component"),
            "." | ".." => return bad("`.` or `..` component"),
            p if p.len() > 255 => return bad("a component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

fn validate_media_type(m: &str) -> Result<(), ArtifactError> {
    let ok = m.len() <= 255
        && m.split_once('/')
            .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty())
        && m.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if ok {
        Ok(())
    } else {
        Err(ArtifactError::BadMediaType(m.chars().take(300).collect()))
    }
}

/// Checks every field of a ref someone else built (an executor's outcome).
pub fn validate_ref(r: &ArtifactRef) -> Result<(), ArtifactError> {
    validate_sha(&r.sha256)?;
    validate_name(&r.name)?;
    validate_media_type(&r.media_type)
}

/// The store. Cheap to create; several instances on one directory are fine (writes
/// of the same content race harmlessly: both renames put identical bytes in place).
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

fn private_dir(p: &Path) -> Result<(), ArtifactError> {
    std::fs::create_dir_all(p).map_err(io_err("create", p))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", p))
}

impl ArtifactStore {
    /// Opens (creating) the store at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ArtifactError> {
        let root = dir.into();
        private_dir(&root)?;
        private_dir(&root.join("sha256"))?;
        private_dir(&root.join("tmp"))?;
        Ok(Self { root })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Where the artifact with this hash lives (whether or not it exists), e.g. for an
    /// executor copying it into a VM.
    pub fn path(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        validate_sha(sha256)?;
        Ok(self.root.join("sha256").join(&sha256[..2]).join(sha256))
    }

    /// Whether an artifact with this hash is stored.
    pub fn contains(&self, sha256: &str) -> Result<bool, ArtifactError> {
        let p = self.path(sha256)?;
        Ok(p.is_file())
    }

    /// Stores `bytes`.
    pub fn put(
        &self,
        bytes: &[u8],
        name: &str,
        media_type: &str,
    ) -> Result<ArtifactRef, ArtifactError> {
        self.put_reader(bytes, name, media_type)
    }

    /// Stores the file at `path`, streamed (never held in memory whole).
    pub fn put_file(
        &self,
        path: &Path,
        name: &str,
        media_type: &str,
    ) -> Result<ArtifactRef, ArtifactError> {
        let f = File::open(path).map_err(io_err("open", path))?;
        self.put_reader(f, name, media_type)
    }

    /// Stores everything `r` yields.
    pub fn put_reader(
        &self,
        mut r: impl Read,
        name: &str,
        media_type: &str,
    ) -> Result<ArtifactRef, ArtifactError> {
        validate_name(name)?;
        validate_media_type(media_type)?;
        let tmp_dir = self.root.join("tmp");
        let (tmp_path, mut tmp) = new_temp(&tmp_dir)?;
        let result = (|| {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_err("read", Path::new(name))(e)),
                };
                hasher.update(&buf[..n]);
                tmp.write_all(&buf[..n])
                    .map_err(io_err("write", &tmp_path))?;
                size += n as u64;
            }
            tmp.sync_all().map_err(io_err("fsync", &tmp_path))?;
            let sha = hex::encode(hasher.finalize());
            let dest = self.path(&sha)?;
            let Some(parent) = dest.parent() else {
                return Err(ArtifactError::BadSha(sha));
            };
            private_dir(parent)?;
            std::fs::rename(&tmp_path, &dest).map_err(io_err("rename", &dest))?;
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync", parent))?;
            Ok(ArtifactRef {
                sha256: sha,
                size,
                media_type: media_type.to_owned(),
                name: name.to_owned(),
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp_path);
        }
        result
    }

    /// Opens a stored artifact for reading.
    pub fn open(&self, sha256: &str) -> Result<File, ArtifactError> {
        let p = self.path(sha256)?;
        File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ArtifactError::NotFound(sha256.to_owned())
            } else {
                io_err("open", &p)(e)
            }
        })
    }

    /// Re-hashes a stored artifact: `Ok(size)` when its content still matches its name.
    pub fn verify(&self, sha256: &str) -> Result<u64, ArtifactError> {
        let mut f = self.open(sha256)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut size = 0u64;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read", &self.path(sha256)?)(e)),
            };
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let actual = hex::encode(hasher.finalize());
        if actual == sha256 {
            Ok(size)
        } else {
            Err(ArtifactError::Corrupt {
                expected: sha256.to_owned(),
                actual,
            })
        }
    }
}

/// A new, empty, 0600 file in `dir` with a random name.
fn new_temp(dir: &Path) -> Result<(PathBuf, File), ArtifactError> {
    loop {
        let mut r = [0u8; 12];
        getrandom::fill(&mut r).map_err(|e| ArtifactError::Io {
            op: "getrandom",
            path: dir.to_owned(),
            source: io::Error::other(e.to_string()),
        })?;
        let p = dir.join(hex::encode(r));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create", &p)(e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn put_open_verify() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::new(d.path().join("a")).unwrap();
        let r = s.put(b"hello", "notes.md", "text/markdown").unwrap();
        assert_eq!(
            r.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(r.size, 5);
        let p = s.path(&r.sha256).unwrap();
        assert!(p.ends_with(format!("sha256/2c/{}", r.sha256)));
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let mut got = String::new();
        s.open(&r.sha256).unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        assert_eq!(s.verify(&r.sha256).unwrap(), 5);
        // Same content again: same ref, one file.
        assert_eq!(s.put(b"hello", "notes.md", "text/markdown").unwrap(), r);
        assert_eq!(
            std::fs::read_dir(d.path().join("a/tmp")).unwrap().count(),
            0
        );

        std::fs::write(&p, b"jello").unwrap();
        assert!(matches!(
            s.verify(&r.sha256),
            Err(ArtifactError::Corrupt { .. })
        ));
    }

    #[test]
    fn put_file_streams() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::new(d.path()).unwrap();
        let src = d.path().join("big");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let r = s
            .put_file(&src, "out/big.bin", "application/octet-stream")
            .unwrap();
        assert_eq!(r.size, 300_000);
        assert_eq!(r.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(s.verify(&r.sha256).unwrap(), 300_000);
    }

    #[test]
    fn refuses_paths_and_bad_input() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::new(d.path()).unwrap();
        for sha in [
            "../../etc/passwd",
            "",
            &"A".repeat(64),
            &"a".repeat(63),
            &format!("{}/", "a".repeat(63)),
        ] {
            assert!(
                matches!(s.open(sha), Err(ArtifactError::BadSha(_))),
                "{sha}"
            );
            assert!(matches!(s.verify(sha), Err(ArtifactError::BadSha(_))));
        }
        assert!(matches!(
            s.open(&"a".repeat(64)),
            Err(ArtifactError::NotFound(_))
        ));
        for name in ["", "/etc/x", "a/../b", "./a", "a//b", "a\\b", "a\nb"] {
            assert!(
                matches!(
                    s.put(b"x", name, "text/plain"),
                    Err(ArtifactError::BadName { .. })
                ),
                "{name:?}"
            );
        }
        for mt in ["", "text", "/x", "text/"] {
            assert!(
                matches!(s.put(b"x", "a", mt), Err(ArtifactError::BadMediaType(_))),
                "{mt}"
            );
        }
    }
}
