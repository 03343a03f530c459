//! The JSONL trail on disk: the live file (`audit.jsonl`) and the closed segments it
//! was rotated into (`audit.jsonl.1`, `.2`, …: a higher number is newer, and numbers
//! are never reused, so a forwarder's place survives a rotation).
//!
//! A place in the trail is (inode, offset): a rename keeps the inode, so the place
//! stays right when the live file becomes a segment.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One file of the trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub path: PathBuf,
    /// `None`: the live file.
    pub generation: Option<u64>,
    pub inode: u64,
    pub len: u64,
}

/// The closed segments of `live`, oldest first.
pub fn segments(live: &Path) -> Vec<(u64, PathBuf)> {
    let (Some(dir), Some(name)) = (live.parent(), live.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{name}.");
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let generation = n.strip_prefix(&prefix)?.parse().ok()?;
            Some((generation, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Every file of the trail, oldest first, the live file last (if it exists).
pub fn pieces(live: &Path) -> Vec<Piece> {
    let mut out: Vec<Piece> = segments(live)
        .into_iter()
        .filter_map(|(g, p)| {
            let m = std::fs::metadata(&p).ok()?;
            Some(Piece {
                path: p,
                generation: Some(g),
                inode: m.ino(),
                len: m.len(),
            })
        })
        .collect();
    if let Ok(m) = std::fs::metadata(live) {
        out.push(Piece {
            path: live.to_owned(),
            generation: None,
            inode: m.ino(),
            len: m.len(),
        });
    }
    out
}

/// The newest closed segment (if any), then the live file: where the latest events are
/// even right after a rotation.
pub fn recent(live: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = segments(live).pop().map(|(_, p)| p).into_iter().collect();
    out.push(live.to_owned());
    out
}

/// Renames the live file to the next segment. The caller has flushed it and opens a
/// new live file after.
pub fn rotate(live: &Path) -> std::io::Result<PathBuf> {
    let next = segments(live).last().map_or(1, |(g, _)| g + 1);
    let mut name = live.as_os_str().to_owned();
    name.push(format!(".{next}"));
    let seg = PathBuf::from(name);
    std::fs::rename(live, &seg)?;
    Ok(seg)
}

/// Deletes the oldest segments beyond `keep`, but none at or after a segment a reader
/// (a SIEM forwarder, by the inode it reads) has not finished. Returns what it deleted.
pub fn prune(live: &Path, keep: usize, readers: &[u64]) -> Vec<PathBuf> {
    let all = pieces(live);
    let closed: Vec<&Piece> = all.iter().filter(|p| p.generation.is_some()).collect();
    let needed = closed
        .iter()
        .position(|p| readers.contains(&p.inode))
        .unwrap_or(closed.len());
    let excess = closed.len().saturating_sub(keep);
    let mut gone = Vec::new();
    for p in closed.iter().take(excess.min(needed)) {
        if std::fs::remove_file(&p.path).is_ok() {
            gone.push(p.path.clone());
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_numbers_segments_upwards_and_pruning_spares_unread_ones() {
        let d = tempfile::tempdir().expect("tmp");
        let live = d.path().join("audit.jsonl");
        let mut inodes = Vec::new();
        for i in 0..4 {
            std::fs::write(&live, format!("line {i}\n")).expect("write");
            inodes.push(std::fs::metadata(&live).expect("meta").ino());
            let seg = rotate(&live).expect("rotate");
            assert_eq!(seg, d.path().join(format!("audit.jsonl.{}", i + 1)));
        }
        std::fs::write(&live, "live\n").expect("write");
        std::fs::write(d.path().join("audit.jsonl.x"), "not a segment").expect("write");
        let p = pieces(&live);
        assert_eq!(p.len(), 5);
        assert_eq!(p[0].generation, Some(1));
        assert_eq!(p[4].generation, None);
        // A reader still in segment 2: only segment 1 may go, though keep=1.
        let gone = prune(&live, 1, &[inodes[1]]);
        assert_eq!(gone, [d.path().join("audit.jsonl.1")]);
        // Readers done (in the live file): keep the newest one segment.
        let live_inode = std::fs::metadata(&live).expect("meta").ino();
        let gone = prune(&live, 1, &[live_inode]);
        assert_eq!(gone.len(), 2);
        assert_eq!(
            segments(&live),
            [(4, d.path().join("audit.jsonl.4"))],
            "numbers are never reused"
        );
        rotate(&live).expect("rotate");
        assert_eq!(segments(&live).last().map(|s| s.0), Some(5));
    }
}
