//! The host ↔ guest control channel (`clawos_guest_protocol::frames`): both sides read
//! frames the other wrote, and the guest is hostile. The input is a byte stream read
//! frame by frame.
//!
//! Invariants: no panic; a frame that decodes re-encodes to exactly the bytes it was
//! read from; `parse_header` agrees with `read_frame`; a control payload that parses
//! as a `Request` or a `Reply` survives a JSON round trip (and a frame round trip).

#![no_main]

use clawos_guest_protocol::frames::{
    self, Kind, MAX_FRAME, Reply, Request, encode, encode_json, parse_header, read_frame,
};
use libfuzzer_sys::fuzz_target;

fn json_round_trip<T>(payload: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(v) = serde_json::from_slice::<T>(payload) else {
        return;
    };
    let again: T = serde_json::from_slice(&serde_json::to_vec(&v).expect("serialize"))
        .expect("a message this crate wrote must parse");
    assert_eq!(v, again, "JSON round trip changed the message");
    let wire = encode_json(&v);
    let (kind, body) = read_frame(&mut &wire[..])
        .expect("own frame")
        .expect("one frame");
    assert_eq!(kind, Kind::Control);
    assert_eq!(serde_json::from_slice::<T>(&body).expect("parse"), v);
}

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..5) {
        let header: [u8; 5] = h.try_into().expect("5 bytes");
        if let Ok((_, len)) = parse_header(header) {
            assert!(len <= MAX_FRAME);
        }
    }
    let mut rest = data;
    // A stream of frames, as the host reads a guest's answers.
    loop {
        let before = rest;
        let header_ok = before
            .get(..5)
            .map(|h| parse_header(h.try_into().expect("5 bytes")));
        match read_frame(&mut rest) {
            Ok(None) => {
                assert!(before.len() < 5, "clean end with a whole header left");
                break;
            }
            Ok(Some((kind, payload))) => {
                let (hk, hlen) = header_ok
                    .expect("a frame was read, so a header was there")
                    .expect("read_frame accepted a header parse_header refuses");
                assert_eq!((hk, hlen), (kind, payload.len()));
                let consumed = &before[..before.len() - rest.len()];
                assert_eq!(
                    encode(kind, &payload),
                    consumed,
                    "a frame re-encodes to other bytes"
                );
                let mut written = Vec::new();
                frames::write_frame(&mut written, kind, &payload).expect("write to a Vec");
                assert_eq!(written, consumed);
                if kind == Kind::Control {
                    json_round_trip::<Request>(&payload);
                    json_round_trip::<Reply>(&payload);
                }
            }
            Err(_) => break,
        }
    }
    // The payload as JSON on its own too (what a control frame would carry).
    json_round_trip::<Request>(data);
    json_round_trip::<Reply>(data);
});
