//! Creating a read-only dm-verity device with raw device-mapper ioctls (what
//! `dmsetup create` does), so the initramfs needs no userspace tools.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::cmdline::VerityParams;

const DM_IOCTL_SIZE: usize = 312;
const DM_TARGET_SPEC_SIZE: usize = 40;
const DM_NAME_OFFSET: usize = 48;
const DM_NAME_LEN: usize = 128;
const DM_READONLY_FLAG: u32 = 1 << 0;

// _IOWR(0xfd, nr, struct dm_ioctl): dir=3 (read|write), size=312.
const fn dm_iowr(nr: u32) -> u64 {
    ((3u64) << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | nr as u64
}
const DM_DEV_CREATE: u64 = dm_iowr(3);
const DM_DEV_SUSPEND: u64 = dm_iowr(6);
const DM_TABLE_LOAD: u64 = dm_iowr(9);

/// The device-mapper table line for a verity target over one device holding both data
/// and tree (`dev` is `major:minor`).
pub fn verity_table(dev: &str, p: &VerityParams) -> String {
    format!(
        "1 {dev} {dev} 4096 4096 {} {} sha256 {} {} 1 panic_on_corruption",
        p.data_blocks, p.hash_start, p.root_hash, p.salt
    )
}

/// Builds an ioctl buffer: the `dm_ioctl` header, optionally one target spec plus its
/// parameter string.
fn request(name: &str, flags: u32, target: Option<(u64, &str, &str)>) -> Vec<u8> {
    let mut buf = vec![0u8; DM_IOCTL_SIZE];
    if let Some((sectors, ty, params)) = target {
        let mut spec = vec![0u8; DM_TARGET_SPEC_SIZE];
        spec[8..16].copy_from_slice(&sectors.to_ne_bytes()); // length; start is 0
        spec[24..24 + ty.len()].copy_from_slice(ty.as_bytes());
        spec.extend_from_slice(params.as_bytes());
        spec.push(0);
        while !spec.len().is_multiple_of(8) {
            spec.push(0);
        }
        buf.extend_from_slice(&spec);
    }
    let total = buf.len() as u32;
    buf[0..4].copy_from_slice(&4u32.to_ne_bytes()); // interface version 4.0.0
    buf[12..16].copy_from_slice(&total.to_ne_bytes()); // data_size
    buf[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes()); // data_start
    buf[20..24].copy_from_slice(&u32::from(target.is_some()).to_ne_bytes()); // target_count
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    let n = name.len().min(DM_NAME_LEN - 1);
    buf[DM_NAME_OFFSET..DM_NAME_OFFSET + n].copy_from_slice(&name.as_bytes()[..n]);
    buf
}

fn ioctl(ctl: &File, cmd: u64, buf: &mut [u8], what: &str) -> io::Result<()> {
    // SAFETY: `buf` is at least DM_IOCTL_SIZE bytes and its data_size field says how
    // long it is; the kernel reads and writes only within that length.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), cmd as _, buf.as_mut_ptr()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("device-mapper {what}: {e}"),
        ));
    }
    Ok(())
}

/// Creates and activates a read-only verity device `name` over block device `dev`
/// (`major:minor`). Returns the new device's `(major, minor)`.
pub fn create_verity(name: &str, dev: &str, params: &VerityParams) -> io::Result<(u32, u32)> {
    let ctl = File::options()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")?;
    let mut create = request(name, 0, None);
    ioctl(&ctl, DM_DEV_CREATE, &mut create, "create")?;
    let encoded = u64::from_ne_bytes(create[40..48].try_into().unwrap_or_default());
    let major = ((encoded & 0xfff00) >> 8) as u32;
    let minor = ((encoded & 0xff) | ((encoded >> 12) & 0xfff00)) as u32;

    let table = verity_table(dev, params);
    let sectors = params.data_blocks * 8;
    let mut load = request(name, DM_READONLY_FLAG, Some((sectors, "verity", &table)));
    ioctl(&ctl, DM_TABLE_LOAD, &mut load, "table load")?;
    // SUSPEND without DM_SUSPEND_FLAG resumes: the loaded table becomes live.
    let mut resume = request(name, 0, None);
    ioctl(&ctl, DM_DEV_SUSPEND, &mut resume, "resume")?;
    Ok((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_headers() {
        assert_eq!(DM_DEV_CREATE, 0xc138_fd03);
        assert_eq!(DM_DEV_SUSPEND, 0xc138_fd06);
        assert_eq!(DM_TABLE_LOAD, 0xc138_fd09);
    }

    #[test]
    fn table_load_request_layout() {
        let b = request("root", DM_READONLY_FLAG, Some((80, "verity", "1 2 3")));
        assert_eq!(b.len() % 8, 0);
        assert_eq!(
            u32::from_ne_bytes(b[12..16].try_into().expect("4")),
            b.len() as u32
        );
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().expect("4")), 1);
        assert_eq!(&b[48..52], b"root");
        assert_eq!(&b[312 + 24..312 + 30], b"verity");
        assert_eq!(&b[352..357], b"1 2 3");
        assert_eq!(u64::from_ne_bytes(b[320..328].try_into().expect("8")), 80);
    }
}
