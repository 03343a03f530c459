//! The guest → host audit stream: what `clawos-audit` inside a VM sends to the host's
//! monitor-daemon over vsock (host port 2084, `clawos_guest_protocol::frames::AUDIT_PORT`;
//! vm-launcher relays it).
//!
//! Every frame is a little-endian `u32` body length, then the body, whose first byte is
//! the kind:
//!
//! | kind | body after the kind byte | |
//! |---|---|---|
//! | 1 hello | `u32` version, 36-byte boot id, `i64` realtime − boottime (ns) | first frame of every connection |
//! | 2 event | `u64` sequence number, one [`RawEvent`] record (96 or 192 bytes) | |
//! | 3 drops | `u64` events the guest kernel dropped since boot | when it grows |
//!
//! Sequence numbers count every record the guest's ring buffer handed over since boot,
//! starting at 1. The host answers with acknowledgements: a little-endian `u64`, the
//! highest sequence number it has written to its trail ([`read_ack`]). The guest keeps
//! every record until it is acknowledged and sends the unacknowledged ones again on
//! the next connection, so the host skips sequence numbers it has already seen, and
//! reports a gap (records the guest had to discard from its full queue) as drops.
//!
//! The host treats every byte as hostile: lengths, kinds and sizes are checked, and
//! nothing in a record decides which agent or VM it is filed under.

use std::io::{self, Read};

use crate::record::RawEvent;

/// Version in the hello frame.
pub const VERSION: u32 = 1;

/// Length of a boot id (`/proc/sys/kernel/random/boot_id`, a UUID in text).
pub const BOOT_ID_LEN: usize = 36;

const KIND_HELLO: u8 = 1;
const KIND_EVENT: u8 = 2;
const KIND_DROPS: u8 = 3;

/// The largest body a valid frame has (an event with a path).
pub const MAX_BODY: usize = 1 + 8 + RawEvent::SIZE;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u32,
        boot_id: String,
        /// Realtime minus boottime in the guest, nanoseconds: turns the records'
        /// boot-time stamps into wall-clock time.
        clock_offset_ns: i64,
    },
    /// `record`: the raw bytes, checked to parse as a [`RawEvent`].
    Event {
        seq: u64,
        record: Vec<u8>,
    },
    Drops {
        total: u64,
    },
}

/// A stream that does not follow this format.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("audit stream: frame of {0} bytes (at most {MAX_BODY})")]
    Length(usize),
    #[error("audit stream: unknown frame kind {0}")]
    Kind(u8),
    #[error("audit stream: {what} frame of the wrong size ({len} bytes)")]
    Size { what: &'static str, len: usize },
    #[error("audit stream: boot id is not text")]
    BootId,
    #[error("audit stream: {0}")]
    Io(#[from] io::Error),
}

impl Frame {
    /// Appends the frame's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Hello {
                version,
                boot_id,
                clock_offset_ns,
            } => {
                out.push(KIND_HELLO);
                out.extend_from_slice(&version.to_le_bytes());
                let mut id = [b' '; BOOT_ID_LEN];
                let n = boot_id.len().min(BOOT_ID_LEN);
                id[..n].copy_from_slice(&boot_id.as_bytes()[..n]);
                out.extend_from_slice(&id);
                out.extend_from_slice(&clock_offset_ns.to_le_bytes());
            }
            Frame::Event { seq, record } => {
                out.push(KIND_EVENT);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(record);
            }
            Frame::Drops { total } => {
                out.push(KIND_DROPS);
                out.extend_from_slice(&total.to_le_bytes());
            }
        }
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes one body (the bytes after the length).
    pub fn decode(body: &[u8]) -> Result<Self, StreamError> {
        let (&kind, rest) = body.split_first().ok_or(StreamError::Size {
            what: "empty",
            len: 0,
        })?;
        let u64_at = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        match kind {
            KIND_HELLO => {
                if rest.len() != 4 + BOOT_ID_LEN + 8 {
                    return Err(StreamError::Size {
                        what: "hello",
                        len: body.len(),
                    });
                }
                // One wire form per hello: the id (hex digits and `-`, not empty) padded
                // with spaces only, as `encode` writes it.
                let boot_id = std::str::from_utf8(&rest[4..4 + BOOT_ID_LEN])
                    .map_err(|_| StreamError::BootId)?
                    .trim_end_matches(' ')
                    .to_owned();
                if boot_id.is_empty()
                    || !boot_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
                {
                    return Err(StreamError::BootId);
                }
                Ok(Frame::Hello {
                    version: u32::from_le_bytes(rest[..4].try_into().unwrap_or_default()),
                    boot_id,
                    clock_offset_ns: u64_at(&rest[4 + BOOT_ID_LEN..]) as i64,
                })
            }
            KIND_EVENT => {
                let len = rest.len();
                if len != 8 + RawEvent::HEAD_SIZE && len != 8 + RawEvent::SIZE {
                    return Err(StreamError::Size {
                        what: "event",
                        len: body.len(),
                    });
                }
                Ok(Frame::Event {
                    seq: u64_at(rest),
                    record: rest[8..].to_vec(),
                })
            }
            KIND_DROPS => {
                if rest.len() != 8 {
                    return Err(StreamError::Size {
                        what: "drops",
                        len: body.len(),
                    });
                }
                Ok(Frame::Drops {
                    total: u64_at(rest),
                })
            }
            k => Err(StreamError::Kind(k)),
        }
    }

    /// Reads the next frame; `None` at a clean end of stream (between frames).
    pub fn read_from(r: &mut impl Read) -> Result<Option<Self>, StreamError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_BODY {
            return Err(StreamError::Length(len));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        Self::decode(&body).map(Some)
    }
}

/// Reads one acknowledgement (host → guest); `None` at the end of the stream.
pub fn read_ack(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut b = [0u8; 8];
    match r.read_exact(&mut b) {
        Ok(()) => Ok(Some(u64::from_le_bytes(b))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Realtime minus boottime on this machine, nanoseconds.
pub fn boot_clock_offset_ns() -> i64 {
    fn now(id: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        unsafe { libc::clock_gettime(id, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
    (now(libc::CLOCK_REALTIME) - now(libc::CLOCK_BOOTTIME)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: usize) -> Vec<u8> {
        let mut r = vec![0u8; len];
        r[8..12].copy_from_slice(&7u32.to_ne_bytes());
        r
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Hello {
                version: VERSION,
                boot_id: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
                clock_offset_ns: 1_700_000_000_000_000_000,
            },
            Frame::Event {
                seq: 1,
                record: record(RawEvent::HEAD_SIZE),
            },
            Frame::Event {
                seq: u64::MAX,
                record: record(RawEvent::SIZE),
            },
            Frame::Drops { total: 42 },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(Frame::read_from(&mut r).expect("frame").as_ref(), Some(f));
        }
        assert!(Frame::read_from(&mut r).expect("end").is_none());
    }

    #[test]
    fn hostile_frames_are_refused() {
        let body = |b: &[u8]| {
            let mut w = (b.len() as u32).to_le_bytes().to_vec();
            w.extend_from_slice(b);
            w
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                (1u32 << 20).to_le_bytes().to_vec(),
                "frame of 1048576 bytes",
            ),
            (0u32.to_le_bytes().to_vec(), "frame of 0 bytes"),
            (body(&[9, 0, 0]), "unknown frame kind 9"),
            (body(&[2; 50]), "event frame of the wrong size"),
            (body(&[3; 3]), "drops frame of the wrong size"),
            (
                body(&[&[1u8, 1, 0, 0, 0][..], &[b'/'; 36], &[0; 8]].concat()),
                "boot id",
            ),
            // Found by fuzz/fuzz_targets/audit_stream.rs: an id padded with other
            // whitespace than spaces decoded to the same hello as the canonical form.
            (
                body(&[&[1u8, 1, 0, 0, 0][..], b"0f1e2d3c", &[b'\r'; 28], &[0; 8]].concat()),
                "boot id",
            ),
            (
                body(&[&[1u8, 1, 0, 0, 0][..], &[b' '; 36], &[0; 8]].concat()),
                "boot id",
            ),
        ];
        for (wire, want) in cases {
            let err = Frame::read_from(&mut &wire[..]).expect_err(want);
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
        // A frame cut short is an error, not a clean end.
        let mut wire = Vec::new();
        Frame::Drops { total: 1 }.encode(&mut wire);
        assert!(Frame::read_from(&mut &wire[..6]).is_err());
    }
}
