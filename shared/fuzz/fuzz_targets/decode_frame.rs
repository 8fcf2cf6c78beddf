//! Fuzzes the decoding of untrusted bytes: the sans-IO [`FrameDecoder`] fed in
//! chunks, and [`codec::decode`] on the raw input.
//!
//! Input layout: the first byte picks the chunk size (1..=256) in which the
//! rest is pushed into the decoder. The whole input also goes straight to
//! `codec::decode`.
//!
//! Besides "never panics", it checks these properties:
//! - chunking does not matter: pushing the stream in chunks yields the same
//!   frames, the same error and the same leftover as pushing it at once;
//! - round trip: every decoded message re-encodes (within the same cap) and
//!   the re-encoding decodes back to the same version and message. Messages
//!   are compared by their canonical encoding, because an `f64` NaN in a
//!   metric sample is not equal to itself; when the message does equal
//!   itself, the values are compared too. The input bytes themselves are not
//!   compared: bincode accepts non-minimal varints, so the re-encoding may be
//!   shorter than what was decoded (never longer).

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use novacron_shared::codec;
use novacron_shared::framing::{encode_frame, FrameDecoder, FrameError, HEADER_LEN};
use novacron_shared::protocol::{AgentMessage, ServerMessage};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A small cap, so that length fields in the fuzzer's range get exercised.
const MAX: u32 = 64 * 1024;

/// What the message types under test must offer.
trait Msg: Serialize + DeserializeOwned + PartialEq + Debug {}
impl<T: Serialize + DeserializeOwned + PartialEq + Debug> Msg for T {}

fuzz_target!(|data: &[u8]| {
    check_codec::<AgentMessage>(data);
    check_codec::<ServerMessage>(data);

    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first) + 1;
    check_stream::<AgentMessage>(stream, chunk);
    check_stream::<ServerMessage>(stream, chunk);
});

/// `m == m` is false exactly when a NaN hides inside.
#[allow(clippy::eq_op)]
fn reflexive<T: PartialEq>(m: &T) -> bool {
    m == m
}

/// `codec::decode` on raw bytes, and the codec-level round trip.
fn check_codec<T: Msg>(data: &[u8]) {
    let Ok(m) = codec::decode::<T>(data) else {
        return;
    };
    let bytes = codec::encode(&m).expect("a decoded message must re-encode");
    assert!(
        bytes.len() <= data.len(),
        "re-encoding grew: {} > {} bytes",
        bytes.len(),
        data.len()
    );
    let again: T = codec::decode(&bytes).expect("a re-encoded message must decode");
    assert_eq!(
        codec::encode(&again).expect("re-encode"),
        bytes,
        "round trip changed the encoding of {m:?}"
    );
    if reflexive(&m) {
        assert_eq!(again, m);
    }
}

/// Frames out of a decoder until it needs more bytes or fails.
fn drain<T: Msg>(dec: &mut FrameDecoder, out: &mut Vec<(u16, T)>) -> Result<(), FrameError> {
    while let Some(frame) = dec.next_frame::<T>()? {
        out.push(frame);
    }
    Ok(())
}

/// The canonical frame for a decoded message; it must fit the cap the
/// original frame fitted.
fn frame_bytes<T: Msg>(version: u16, m: &T) -> Vec<u8> {
    let mut wire = Vec::new();
    encode_frame(version, m, MAX, &mut wire)
        .unwrap_or_else(|e| panic!("a decoded frame must re-encode within the cap: {e}"));
    wire
}

fn check_stream<T: Msg>(stream: &[u8], chunk: usize) {
    // In chunks, as a network would deliver it; an error ends the stream.
    let mut dec = FrameDecoder::new(MAX);
    let mut frames = Vec::new();
    let mut failed = None;
    for c in stream.chunks(chunk) {
        dec.push(c);
        if let Err(e) = drain::<T>(&mut dec, &mut frames) {
            failed = Some(e);
            break;
        }
    }

    // All at once.
    let mut whole = FrameDecoder::new(MAX);
    whole.push(stream);
    let mut whole_frames = Vec::new();
    let whole_result = drain::<T>(&mut whole, &mut whole_frames);

    assert_eq!(
        frames.len(),
        whole_frames.len(),
        "chunking changed the frame count"
    );
    match (&failed, &whole_result) {
        (None, Ok(())) => {
            assert_eq!(dec.buffered(), whole.buffered(), "chunking changed the leftover");
            assert!(dec.buffered() <= HEADER_LEN + MAX as usize);
        }
        (Some(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("chunking changed the outcome: {a:?} vs {b:?}"),
    }

    for ((v, m), (wv, wm)) in frames.iter().zip(&whole_frames) {
        let wire = frame_bytes(*v, m);
        assert_eq!(v, wv);
        assert_eq!(wire, frame_bytes(*wv, wm), "chunking changed a frame");

        // Round trip through a fresh decoder, byte by byte at the end.
        let mut rt = FrameDecoder::new(MAX);
        let (body, last) = wire.split_at(wire.len() - 1);
        rt.push(body);
        assert!(
            matches!(rt.next_frame::<T>(), Ok(None)),
            "a frame missing its last byte must not decode"
        );
        rt.push(last);
        let (v2, m2) = rt
            .next_frame::<T>()
            .unwrap_or_else(|e| panic!("a re-encoded frame must decode: {e}"))
            .expect("a whole re-encoded frame is buffered");
        assert_eq!(v2, *v);
        assert_eq!(rt.buffered(), 0);
        assert_eq!(frame_bytes(v2, &m2), wire, "round trip changed {m:?}");
        if reflexive(m) {
            assert_eq!(&m2, m);
        }
    }
}
