//! The record the eBPF program writes for one system call, byte for byte.

/// Length of the path copied for path-taking syscalls (see the eBPF program).
pub const PATH_LEN: usize = 96;
const COMM_LEN: usize = 16;

/// The eBPF program's `struct event`, byte for byte.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct RawEvent {
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub tag: u32,
    pub nr: i32,
    pub ret: i64,
    pub args: [u64; 6],
    pub comm: [u8; COMM_LEN],
    pub path: [u8; PATH_LEN],
}

impl RawEvent {
    /// Size of a record with a path.
    pub const SIZE: usize = std::mem::size_of::<Self>();
    /// Size of a record without one (syscalls that take no path).
    pub const HEAD_SIZE: usize = Self::SIZE - PATH_LEN;

    /// Decodes one ring-buffer record (with or without the path); `None` if it is
    /// shorter than a head.
    pub fn parse(data: &[u8]) -> Option<Self> {
        if data.len() < Self::HEAD_SIZE {
            return None;
        }
        let u64_at = |o: usize| u64::from_ne_bytes(data[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_ne_bytes(data[o..o + 4].try_into().unwrap_or_default());
        let mut args = [0u64; 6];
        for (i, a) in args.iter_mut().enumerate() {
            *a = u64_at(32 + 8 * i);
        }
        let mut comm = [0u8; COMM_LEN];
        comm.copy_from_slice(&data[80..80 + COMM_LEN]);
        let mut path = [0u8; PATH_LEN];
        if data.len() >= Self::SIZE {
            path.copy_from_slice(&data[96..96 + PATH_LEN]);
        }
        Some(Self {
            ts_ns: u64_at(0),
            tgid: u32_at(8),
            tid: u32_at(12),
            tag: u32_at(16),
            nr: u32_at(20) as i32,
            ret: u64_at(24) as i64,
            args,
            comm,
            path,
        })
    }
}

/// Text up to the first NUL, lossily decoded.
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_event_layout_matches_the_c_struct() {
        // 8 + 4*4 + 8 + 6*8 + 16 + 96
        assert_eq!(RawEvent::SIZE, 192);
        let mut b = vec![0u8; RawEvent::SIZE];
        b[8..12].copy_from_slice(&42u32.to_ne_bytes());
        b[20..24].copy_from_slice(&110i32.to_ne_bytes());
        b[24..32].copy_from_slice(&(-2i64).to_ne_bytes());
        b[80..84].copy_from_slice(b"test");
        b[96..101].copy_from_slice(b"/x/y\0");
        let e = RawEvent::parse(&b).expect("parse");
        assert_eq!((e.tgid, e.nr, e.ret), (42, 110, -2));
        assert_eq!(c_str(&e.comm), "test");
        assert_eq!(c_str(&e.path), "/x/y");
        assert_eq!(RawEvent::HEAD_SIZE, 96);
        let head = RawEvent::parse(&b[..96]).expect("head only");
        assert_eq!((head.nr, c_str(&head.path).as_str()), (110, ""));
        assert!(RawEvent::parse(&b[..95]).is_none());
    }
}
