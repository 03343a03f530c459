//! The store on disk: its lock, the master-key canary, and the offline master-key
//! rotation that re-seals every private key.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::db_err;
use crate::IdentityError;
use crate::keystore::MasterKey;

/// Sealed with the master key at creation: a key that does not open it is the wrong one.
pub(super) const CANARY: &[u8] = b"clawos identity-manager store canary";

/// Takes the store's exclusive lock (`<db>.lock`), or says who holds it.
pub fn lock_store(path: &Path) -> Result<std::fs::File, IdentityError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let lock_path = path.with_extension("lock");
    // Like every file of the store: the owner's only (0600), whatever the umask.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| IdentityError::Io {
            what: format!("open {}", lock_path.display()),
            source,
        })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(IdentityError::Invalid(format!(
            "the key store {} is in use (is identity-manager running? stop it first)",
            path.display()
        )));
    }
    Ok(f)
}

/// Reads the canary without writing anything: `Some(version)` if `master` opens it,
/// `None` if it does not, `Ok(Some(0))` for a store that has no canary yet.
pub(super) fn probe_canary(path: &Path, master: &MasterKey) -> Result<Option<u32>, IdentityError> {
    // Without a WAL file the database is opened `immutable` (SQLite then creates no
    // -wal/-shm files); with one, read-only so its committed pages count.
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let ro = if Path::new(&wal).exists() {
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
    } else {
        Connection::open_with_flags(
            format!("file:{}?immutable=1", path.display()),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
    }
    .map_err(db_err)?;
    let has_meta: bool = ro
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE name = 'meta')",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if !has_meta {
        return Ok(Some(0));
    }
    let canary: Option<(Vec<u8>, u32)> = ro
        .query_row(
            "SELECT value, version FROM meta WHERE key = 'canary'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db_err)?;
    Ok(match canary {
        None => Some(0),
        Some((sealed, version)) => {
            (master.open(version, "canary", &sealed).as_deref() == Some(CANARY)).then_some(version)
        }
    })
}

/// Re-seals every private key and the canary under `new`, in one transaction: a crash
/// leaves the store entirely under the old key or entirely under the new one. The
/// service must be stopped (the store lock is taken). Returns (keys re-sealed, new
/// key version).
pub fn rotate_master_key(
    path: &Path,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<(usize, u32), IdentityError> {
    let _lock = lock_store(path)?;
    let version = match probe_canary(path, old)? {
        Some(v) if v > 0 => v,
        Some(_) => {
            return Err(IdentityError::Invalid(format!(
                "{} has no keys yet",
                path.display()
            )));
        }
        None => {
            return Err(IdentityError::MasterKey(
                "the current master key does not open the store".into(),
            ));
        }
    };
    let next = version + 1;
    let mut db = Connection::open(path).map_err(db_err)?;
    let tx = db.transaction().map_err(db_err)?;
    let mut count = 0;
    for (table, id_col, prefix) in [
        ("signing_keys", "kid", "signing"),
        ("agent_keys", "agent", "agent"),
    ] {
        let rows: Vec<(String, Vec<u8>, u32)> = {
            let mut st = tx
                .prepare(&format!(
                    "SELECT {id_col}, sealed, key_version FROM {table}"
                ))
                .map_err(db_err)?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?
        };
        for (owner, sealed, v) in rows {
            let aad = format!("{prefix}:{owner}");
            let plain = old.open(v, &aad, &sealed).ok_or_else(|| {
                IdentityError::MasterKey(format!("{aad} does not open with the current key"))
            })?;
            let resealed = new.seal(next, &aad, &plain)?;
            tx.execute(
                &format!("UPDATE {table} SET sealed = ?1, key_version = ?2 WHERE {id_col} = ?3"),
                params![resealed, next, owner],
            )
            .map_err(db_err)?;
            count += 1;
        }
    }
    tx.execute(
        "UPDATE meta SET value = ?1, version = ?2 WHERE key = 'canary'",
        params![new.seal(next, "canary", CANARY)?, next],
    )
    .map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    Ok((count, next))
}
