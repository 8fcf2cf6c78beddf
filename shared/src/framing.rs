//! Length-prefixed, versioned frames with a hard size cap.
//!
//! A frame is `[len: u32 BE][version: u16 BE][payload]`, where `len` counts
//! the version and the payload. The header is checked against the cap before
//! a single payload byte is buffered, and the payload is decoded through
//! [`crate::codec`] with its own limit.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, CodecError};
use crate::protocol::ErrorCode;

/// Bytes of header before every payload.
pub const HEADER_LEN: usize = 6;
/// The default cap on one frame (version plus payload), in bytes.
pub const MAX_FRAME_LEN: u32 = 4 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length field announces more than the cap allows.
    #[error("frame of {len} bytes exceeds the {max} byte cap")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The cap.
        max: u32,
    },
    /// The length field is too short to hold a version.
    #[error("frame length {0} is too short for a header")]
    TooShort(u32),
    /// The frame is of a protocol version this side does not accept here.
    #[error("frame version {got} is not spoken here (expected {expected})")]
    Version {
        /// What the frame said.
        got: u16,
        /// What this side expected.
        expected: u16,
    },
    /// The payload did not decode.
    #[error("malformed frame payload")]
    Payload(#[source] CodecError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("stream I/O failed")]
    Io(#[source] std::io::Error),
}

impl FrameError {
    /// The protocol error code that reports this failure to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Version { .. } => ErrorCode::UnsupportedVersion,
            FrameError::TooShort(_) | FrameError::Payload(_) | FrameError::Truncated => {
                ErrorCode::MalformedFrame
            }
            FrameError::Io(_) => ErrorCode::Internal,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload bytes that follow the header.
    pub payload_len: u32,
    /// The frame's protocol version.
    pub version: u16,
}

/// Checks a header against the cap.
pub fn parse_header(h: [u8; HEADER_LEN], max: u32) -> Result<Header, FrameError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    if len < 2 {
        return Err(FrameError::TooShort(len));
    }
    Ok(Header {
        payload_len: len - 2,
        version: u16::from_be_bytes([h[4], h[5]]),
    })
}

/// Encodes one frame into `out` (appending).
pub fn encode_frame<T: Serialize>(
    version: u16,
    msg: &T,
    max: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    codec::encode_into(msg, out).map_err(FrameError::Payload)?;
    let len = out.len() - start - 4;
    if len > max as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge { len: len as u64, max });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    out[start + 4..start + 6].copy_from_slice(&version.to_be_bytes());
    Ok(())
}

/// A sans-IO frame decoder: push bytes in, take whole messages out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: u32,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max`.
    pub fn new(max: u32) -> Self {
        Self { buf: Vec::new(), max }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, if one is buffered. An error means the stream is
    /// unusable from here on: close it.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<(u16, T)>, FrameError> {
        let Some(h) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = parse_header(*h, self.max)?;
        let end = HEADER_LEN + header.payload_len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let msg = codec::decode(&self.buf[HEADER_LEN..end]).map_err(FrameError::Payload)?;
        self.buf.drain(..end);
        Ok(Some((header.version, msg)))
    }
}

/// A QUIC receive stream with a frame decoder: [`FramedRecv::next`] is
/// cancel-safe, so it can sit in a `select!` beside timers and outboxes.
#[derive(Debug)]
pub struct FramedRecv {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FramedRecv {
    /// Wraps `recv`, refusing frames longer than `max`.
    pub fn new(recv: quinn::RecvStream, max: u32) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(max),
        }
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly
    /// between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<(u16, T)>, FrameError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) if self.decoder.buffered() == 0 => return Ok(None),
                Ok(None) => return Err(FrameError::Truncated),
                Err(e) => return Err(FrameError::Io(e.into())),
            }
        }
    }
}

/// Reads one frame from a QUIC stream (not cancel-safe: see [`FramedRecv`]). `Ok(None)` means the peer finished
/// the stream cleanly between frames.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: u32,
    buf: &mut Vec<u8>,
) -> Result<Option<(u16, T)>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    match recv.read_exact(&mut h).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Io(e.into())),
    }
    let header = parse_header(h, max)?;
    buf.clear();
    buf.resize(header.payload_len as usize, 0);
    match recv.read_exact(buf).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Io(e.into())),
    }
    let msg = codec::decode(buf).map_err(FrameError::Payload)?;
    Ok(Some((header.version, msg)))
}

/// Writes one frame to a QUIC stream.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    version: u16,
    msg: &T,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    buf.clear();
    encode_frame(version, msg, MAX_FRAME_LEN, buf)?;
    send.write_all(buf).await.map_err(|e| FrameError::Io(e.into()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ids::{HostId, OpId, VmId};
    use crate::protocol::*;

    fn sample_messages() -> Vec<AgentMessage> {
        vec![
            AgentMessage::Hello(Hello {
                min_version: 1,
                max_version: 1,
                agent_version: "0.1.0".into(),
                hostname: "h1".into(),
            }),
            AgentMessage::Heartbeat(Heartbeat {
                seq: 42,
                lease_left_ms: Some(4_200),
            }),
            AgentMessage::Inventory(Inventory {
                capacity: Capacity {
                    cpus: 8,
                    memory_mib: 16384,
                    ..Capacity::default()
                },
                hypervisor: "test:///default".into(),
                vms: vec![VmObserved {
                    name: "web-1".into(),
                    uuid: "u".into(),
                    state: VmState::Running,
                    managed: true,
                    snapshots: Vec::new(),
                }],
                migration_uri: Some("qemu+tls://h1/system".into()),
                labels: [("rack".to_string(), "r1".to_string())].into(),
                shared_storage: Some("/srv/novacron/pool".into()),
                disk_locks: Some("/srv/novacron/pool".into()),
                witness: Some("10.0.0.1:7444".parse().unwrap()),
            }),
            AgentMessage::Progress(CommandProgress {
                op_id: OpId(8),
                percent: 40,
                message: "memory 40 %".into(),
            }),
            AgentMessage::CommandResult(CommandResult {
                op_id: OpId(7),
                outcome: CommandOutcome::Failed { message: "no".into() },
            }),
            AgentMessage::Metrics(MetricBatch {
                epoch: 3,
                seq: 9,
                dropped: 0,
                interval_ms: 1000,
                vms: vec![VmId(5)],
                labels: vec!["user".into()],
                series: vec![
                    crate::metrics::SeriesRef {
                        scope: 0,
                        metric: 1,
                        label: 1,
                    },
                    crate::metrics::SeriesRef {
                        scope: 1,
                        metric: 32,
                        label: 0,
                    },
                ],
                ticks: vec![1_760_000_000_000, 1000],
                values: vec![10, 2, 500, -3],
            }),
        ]
    }

    #[test]
    fn round_trip_through_decoder_byte_by_byte() {
        let msgs = sample_messages();
        let mut wire = Vec::new();
        for m in &msgs {
            encode_frame(1, m, MAX_FRAME_LEN, &mut wire).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
        let mut out = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some((v, m)) = dec.next_frame::<AgentMessage>().unwrap_or_else(|e| panic!("{e}")) {
                assert_eq!(v, 1);
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_header_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&2048u32.to_be_bytes());
        dec.push(&1u16.to_be_bytes());
        let err = dec.next_frame::<AgentMessage>().unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 2048, max: 1024 }));
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    }

    #[test]
    fn encode_refuses_oversized_message() {
        let msg = ServerMessage::Error(WireError {
            code: ErrorCode::Internal,
            message: "x".repeat(100),
        });
        let mut out = vec![1, 2, 3];
        assert!(encode_frame(1, &msg, 50, &mut out).is_err());
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
        dec.push(&6u32.to_be_bytes());
        dec.push(&1u16.to_be_bytes());
        dec.push(&[0xff, 0xff, 0xff, 0xff]);
        let err = dec.next_frame::<AgentMessage>().unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
    }

    #[test]
    fn welcome_and_ids_round_trip() {
        let m = ServerMessage::Welcome(Welcome {
            version: 1,
            host_id: HostId(u128::MAX),
            heartbeat_interval_ms: 1000,
        });
        let mut wire = Vec::new();
        encode_frame(1, &m, MAX_FRAME_LEN, &mut wire).unwrap_or_else(|e| panic!("{e}"));
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
        dec.push(&wire);
        assert_eq!(dec.next_frame::<ServerMessage>().ok().flatten(), Some((1, m)));
    }

    fn arb_agent_message() -> impl Strategy<Value = AgentMessage> {
        prop_oneof![
            (any::<u16>(), any::<u16>(), ".{0,40}", ".{0,40}").prop_map(|(a, b, v, h)| {
                AgentMessage::Hello(Hello {
                    min_version: a,
                    max_version: b,
                    agent_version: v,
                    hostname: h,
                })
            }),
            (any::<u64>(), any::<Option<u32>>())
                .prop_map(|(seq, lease_left_ms)| AgentMessage::Heartbeat(Heartbeat { seq, lease_left_ms })),
            (
                ".{0,64}",
                proptest::collection::vec(any::<u8>(), 0..512),
                ".{0,20}"
            )
                .prop_map(|(token, csr_der, hostname)| AgentMessage::Join(JoinRequest {
                    min_version: 1,
                    max_version: 1,
                    token,
                    csr_der,
                    hostname,
                    agent_version: "x".into(),
                })),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec((any::<u32>(), any::<u16>(), any::<u32>()), 0..16),
                proptest::collection::vec(any::<u64>(), 0..8),
                proptest::collection::vec(any::<i64>(), 0..64),
            )
                .prop_map(|(epoch, seq, series, ticks, values)| AgentMessage::Metrics(
                    MetricBatch {
                        epoch,
                        seq,
                        dropped: 0,
                        interval_ms: 100,
                        vms: vec![VmId(1)],
                        labels: vec!["eth0".into()],
                        series: series
                            .into_iter()
                            .map(|(scope, metric, label)| crate::metrics::SeriesRef { scope, metric, label })
                            .collect(),
                        ticks,
                        values,
                    }
                )),
            (
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(".{0,16}", 0..16)
            )
                .prop_map(|(cpus, memory_mib, names)| AgentMessage::Inventory(Inventory {
                    capacity: Capacity {
                        cpus,
                        memory_mib,
                        ..Capacity::default()
                    },
                    hypervisor: "test:///default".into(),
                    vms: names
                        .into_iter()
                        .map(|name| VmObserved {
                            uuid: name.clone(),
                            name,
                            state: VmState::Paused,
                            managed: true,
                            snapshots: Vec::new(),
                        })
                        .collect(),
                    migration_uri: None,
                    labels: Default::default(),
                    shared_storage: None,
                    disk_locks: None,
                    witness: None,
                })),
        ]
    }

    proptest! {
        #[test]
        fn prop_round_trip(msgs in proptest::collection::vec(arb_agent_message(), 1..8), chunk in 1usize..64) {
            let mut wire = Vec::new();
            for m in &msgs {
                encode_frame(3, m, MAX_FRAME_LEN, &mut wire).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
            let mut out = Vec::new();
            for c in wire.chunks(chunk) {
                dec.push(c);
                while let Some((v, m)) = dec.next_frame::<AgentMessage>().map_err(|e| TestCaseError::fail(e.to_string()))? {
                    prop_assert_eq!(v, 3);
                    out.push(m);
                }
            }
            prop_assert_eq!(out, msgs);
        }

        #[test]
        fn prop_truncated_never_yields_and_never_panics(m in arb_agent_message(), cut in any::<prop::sample::Index>()) {
            let mut wire = Vec::new();
            encode_frame(1, &m, MAX_FRAME_LEN, &mut wire).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let cut = cut.index(wire.len());
            let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
            dec.push(&wire[..cut]);
            // A prefix of a frame is never a whole frame.
            prop_assert!(matches!(dec.next_frame::<AgentMessage>(), Ok(None)));
        }

        #[test]
        fn prop_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = FrameDecoder::new(64 * 1024);
            dec.push(&bytes);
            for _ in 0..64 {
                match dec.next_frame::<AgentMessage>() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            let mut dec = FrameDecoder::new(64 * 1024);
            dec.push(&bytes);
            let _ = dec.next_frame::<ServerMessage>();
        }

        #[test]
        fn prop_payload_garbage_with_valid_header(payload in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let mut wire = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(&1u16.to_be_bytes());
            wire.extend_from_slice(&payload);
            let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
            dec.push(&wire);
            // Either a valid message or a clean error; never a panic, never "need more".
            prop_assert!(!matches!(dec.next_frame::<AgentMessage>(), Ok(None)));
        }
    }
}
