//! The guest → host audit stream (`clawos_syscall_probe::stream`): monitor-daemon reads
//! what a hostile guest's `clawos-audit` sends. The input is the byte stream.
//!
//! Invariants: no panic; at most `MAX_BODY` bytes per frame; a frame that decodes
//! re-encodes to exactly the bytes it was read from (one wire form per frame); an
//! event's record parses as a `RawEvent`; `decode` of a body agrees with `read_from`.

#![no_main]

use clawos_syscall_probe::RawEvent;
use clawos_syscall_probe::stream::{Frame, MAX_BODY, read_ack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        let before = rest;
        match Frame::read_from(&mut rest) {
            Ok(None) => {
                assert!(before.is_empty(), "clean end with bytes left");
                break;
            }
            Ok(Some(frame)) => {
                let consumed = &before[..before.len() - rest.len()];
                assert!(consumed.len() <= 4 + MAX_BODY);
                let mut wire = Vec::new();
                frame.encode(&mut wire);
                assert_eq!(wire, consumed, "{frame:?} re-encodes to other bytes");
                assert_eq!(Frame::decode(&consumed[4..]).expect("decodes again"), frame);
                if let Frame::Event { record, .. } = &frame {
                    let e = RawEvent::parse(record).expect("an accepted record parses");
                    let _ = clawos_syscall_probe::c_str(&e.comm);
                    let _ = clawos_syscall_probe::c_str(&e.path);
                }
            }
            Err(_) => break,
        }
    }
    // Bodies on their own, as the decoder sees them.
    if let Ok(frame) = Frame::decode(data) {
        let mut wire = Vec::new();
        frame.encode(&mut wire);
        assert_eq!(&wire[4..], data, "{frame:?} re-encodes to other bytes");
    }
    // Acknowledgements (host → guest), read by the guest.
    let mut acks = data;
    while let Ok(Some(_)) = read_ack(&mut acks) {}
});
