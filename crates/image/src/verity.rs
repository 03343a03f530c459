//! dm-verity hash tree, computed by ClawOS itself.
//!
//! The on-disk result is byte-identical to `veritysetup format --hash-offset=<data bytes>
//! --data-blocks=<n> --salt=<salt> --uuid=<uuid> img img` (format version 1, sha256,
//! 4096-byte blocks): the data is followed by one block holding the verity superblock,
//! then the tree with its top (root-most) level first and the level hashing data
//! blocks last. That is the layout the kernel's dm-verity target reads with
//! `hash_start = n + 1`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Data and hash block size. 4096 is what the guest kernel's page size and erofs use.
pub const BLOCK_SIZE: u64 = 4096;
const DIGEST_SIZE: usize = 32;
const HASHES_PER_BLOCK: u64 = BLOCK_SIZE / DIGEST_SIZE as u64;
const HASHES_PER_BLOCK_BITS: u32 = HASHES_PER_BLOCK.trailing_zeros();
const SUPERBLOCK_SIZE: usize = 512;
/// Salt size we use. The superblock allows up to 256 bytes.
pub const SALT_SIZE: usize = 32;

/// Errors building a verity tree.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The image could not be read or written.
    #[error("verity: I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The data area is not a whole number of verity blocks.
    #[error("verity: data size {size} of {path} is not a multiple of {BLOCK_SIZE} bytes")]
    Unaligned { path: PathBuf, size: u64 },
    /// An image with no data cannot be protected.
    #[error("verity: {path} holds no data blocks")]
    Empty { path: PathBuf },
}

/// Where the tree goes and what it was computed with: everything the guest needs to open
/// the device, and what the signed manifest records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerityGeometry {
    /// Hash algorithm (always `sha256`).
    pub algorithm: String,
    /// Data block size in bytes.
    pub data_block_size: u64,
    /// Hash block size in bytes.
    pub hash_block_size: u64,
    /// Number of data blocks protected (the erofs image size / block size).
    pub data_blocks: u64,
    /// Block (in hash-block units, from the start of the device) where the tree starts.
    pub hash_start_block: u64,
    /// Salt, hex.
    pub salt: String,
    /// Root hash, hex.
    pub root_hash: String,
}

impl VerityGeometry {
    /// Total bytes of the image: data, superblock block and tree.
    pub fn image_size(&self) -> u64 {
        (self.hash_start_block + tree_blocks(self.data_blocks)) * self.hash_block_size
    }
}

/// Number of hash blocks at each level, level 0 (hashing data) first.
fn level_sizes(data_blocks: u64) -> Vec<u64> {
    // Same level count as the kernel and cryptsetup: the smallest number of levels whose
    // fan-out covers every data block.
    let mut levels = 0u32;
    while HASHES_PER_BLOCK_BITS * levels < 64
        && (data_blocks - 1) >> (HASHES_PER_BLOCK_BITS * levels) != 0
    {
        levels += 1;
    }
    (0..levels)
        .map(|i| {
            let shift = (i + 1) * HASHES_PER_BLOCK_BITS;
            (data_blocks + (1u64 << shift) - 1) >> shift
        })
        .collect()
}

/// Total number of hash blocks in the tree for `data_blocks` data blocks.
pub fn tree_blocks(data_blocks: u64) -> u64 {
    level_sizes(data_blocks).iter().sum()
}

fn hash_block(salt: &[u8], block: &[u8]) -> [u8; DIGEST_SIZE] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Hashes `count` consecutive blocks of `file` starting at byte `offset`, and returns the
/// hash blocks they fill (each `BLOCK_SIZE`, zero padded). Splits the work over the
/// machine's cores, each thread producing whole hash blocks.
fn hash_level(
    file: &File,
    path: &Path,
    offset: u64,
    count: u64,
    salt: &[u8],
) -> Result<Vec<u8>, VerityError> {
    let out_blocks = count.div_ceil(HASHES_PER_BLOCK);
    let mut out = vec![0u8; (out_blocks * BLOCK_SIZE) as usize];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
        .min(out_blocks)
        .max(1);
    let per_thread = out_blocks.div_ceil(threads);
    let chunks: Vec<(u64, &mut [u8])> = out
        .chunks_mut((per_thread * BLOCK_SIZE) as usize)
        .enumerate()
        .map(|(i, c)| (i as u64 * per_thread, c))
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|(first_out_block, chunk)| {
                scope.spawn(move || {
                    let first = first_out_block * HASHES_PER_BLOCK;
                    let last = ((first_out_block + (chunk.len() as u64 / BLOCK_SIZE))
                        * HASHES_PER_BLOCK)
                        .min(count);
                    // Read a MiB at a time: one syscall per 256 blocks.
                    const BATCH: u64 = 256;
                    let mut buf = vec![0u8; (BATCH * BLOCK_SIZE) as usize];
                    let mut block = first;
                    while block < last {
                        let n = BATCH.min(last - block);
                        let bytes = &mut buf[..(n * BLOCK_SIZE) as usize];
                        file.read_exact_at(bytes, offset + block * BLOCK_SIZE)
                            .map_err(|source| VerityError::Io {
                                path: path.to_owned(),
                                source,
                            })?;
                        for (i, data) in bytes.chunks_exact(BLOCK_SIZE as usize).enumerate() {
                            let at = ((block - first) as usize + i) * DIGEST_SIZE;
                            chunk[at..at + DIGEST_SIZE].copy_from_slice(&hash_block(salt, data));
                        }
                        block += n;
                    }
                    Ok::<(), VerityError>(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("verity hashing thread panicked"))
    })?;
    Ok(out)
}

fn superblock(data_blocks: u64, salt: &[u8], uuid: &[u8; 16]) -> [u8; SUPERBLOCK_SIZE] {
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal (salt first)
    sb[16..32].copy_from_slice(uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

/// Computes the verity tree over the first `data_blocks` blocks of the file at `path`
/// (all of it when `None`) and writes superblock and tree right after the data.
/// Returns the geometry, including the root hash.
pub fn format(
    path: &Path,
    data_blocks: Option<u64>,
    salt: &[u8; SALT_SIZE],
    uuid: &[u8; 16],
) -> Result<VerityGeometry, VerityError> {
    let io_err = |source| VerityError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err)?;
    let data_blocks = match data_blocks {
        Some(n) => n,
        None => {
            let size = file.metadata().map_err(io_err)?.len();
            if size % BLOCK_SIZE != 0 {
                return Err(VerityError::Unaligned {
                    path: path.to_owned(),
                    size,
                });
            }
            size / BLOCK_SIZE
        }
    };
    if data_blocks == 0 {
        return Err(VerityError::Empty {
            path: path.to_owned(),
        });
    }
    let sizes = level_sizes(data_blocks);
    let hash_start = data_blocks + 1;
    // Position of each level in the file: the top level comes first.
    let mut level_start = vec![0u64; sizes.len()];
    let mut pos = hash_start;
    for i in (0..sizes.len()).rev() {
        level_start[i] = pos;
        pos += sizes[i];
    }
    // A fresh tree: drop whatever followed the data before.
    file.set_len(data_blocks * BLOCK_SIZE).map_err(io_err)?;
    file.write_all_at(
        &superblock(data_blocks, salt, uuid),
        data_blocks * BLOCK_SIZE,
    )
    .map_err(io_err)?;

    let root: [u8; DIGEST_SIZE] = if sizes.is_empty() {
        // One data block: its hash is the root.
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        file.read_exact_at(&mut block, 0).map_err(io_err)?;
        hash_block(salt, &block)
    } else {
        let (mut offset, mut count) = (0u64, data_blocks);
        let mut top = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let level = hash_level(&file, path, offset, count, salt)?;
            debug_assert_eq!(level.len() as u64, size * BLOCK_SIZE);
            file.write_all_at(&level, level_start[i] * BLOCK_SIZE)
                .map_err(io_err)?;
            offset = level_start[i] * BLOCK_SIZE;
            count = size;
            top = level;
        }
        hash_block(salt, &top[..BLOCK_SIZE as usize])
    };
    // The superblock occupies a whole block even when no tree follows it.
    let total = (hash_start + tree_blocks(data_blocks)) * BLOCK_SIZE;
    if file.metadata().map_err(io_err)?.len() < total {
        file.set_len(total).map_err(io_err)?;
    }
    file.sync_all().map_err(io_err)?;
    Ok(VerityGeometry {
        algorithm: "sha256".into(),
        data_block_size: BLOCK_SIZE,
        hash_block_size: BLOCK_SIZE,
        data_blocks,
        hash_start_block: hash_start,
        salt: hex::encode(salt),
        root_hash: hex::encode(root),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_sizes_match_kernel_fanout() {
        assert_eq!(level_sizes(1), Vec::<u64>::new());
        assert_eq!(level_sizes(2), vec![1]);
        assert_eq!(level_sizes(128), vec![1]);
        assert_eq!(level_sizes(129), vec![2, 1]);
        assert_eq!(level_sizes(128 * 128 + 1), vec![129, 2, 1]);
    }

    #[test]
    fn tree_changes_when_a_data_byte_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        let data: Vec<u8> = (0..300 * BLOCK_SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).expect("write");
        let a = format(&p, None, &[7; 32], &[1; 16]).expect("format");
        assert_eq!(a.image_size(), std::fs::metadata(&p).expect("meta").len());
        let mut data2 = data.clone();
        data2[299 * BLOCK_SIZE as usize + 5] ^= 1;
        std::fs::write(&p, &data2).expect("write");
        let b = format(&p, None, &[7; 32], &[1; 16]).expect("format");
        assert_ne!(a.root_hash, b.root_hash);
        // Reformatting the same data gives the same root.
        std::fs::write(&p, &data).expect("write");
        let c = format(&p, None, &[7; 32], &[1; 16]).expect("format");
        assert_eq!(a, c);
    }

    #[test]
    fn unaligned_and_empty_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 100]).expect("write");
        assert!(matches!(
            format(&p, None, &[0; 32], &[0; 16]),
            Err(VerityError::Unaligned { size: 100, .. })
        ));
        std::fs::write(&p, []).expect("write");
        assert!(matches!(
            format(&p, None, &[0; 32], &[0; 16]),
            Err(VerityError::Empty { .. })
        ));
    }
}
