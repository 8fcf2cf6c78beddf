//! Writes the seed corpus for the `decode_frame` target.
//!
//! Run from `shared/fuzz`: `cargo run --example gen_seeds`. Each seed is the
//! target's input layout: one byte choosing the chunk size (`byte + 1`), then
//! a stream of valid frames made by the real encoder.

use std::path::Path;

use novacron_shared::framing::{encode_frame, MAX_FRAME_LEN};
use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::protocol::*;
use serde::Serialize;

fn stream<T: Serialize>(chunk_byte: u8, version: u16, msgs: &[T]) -> Vec<u8> {
    let mut out = vec![chunk_byte];
    for m in msgs {
        encode_frame(version, m, MAX_FRAME_LEN, &mut out).expect("seed message encodes");
    }
    out
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/decode_frame");
    std::fs::create_dir_all(&dir).expect("create seed dir");

    let seeds: [(&str, Vec<u8>); 5] = [
        (
            "agent_hello",
            stream(
                0,
                HANDSHAKE_VERSION,
                &[AgentMessage::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    agent_version: "0.1.0".into(),
                    hostname: "kvm-01".into(),
                })],
            ),
        ),
        (
            "agent_join_renew",
            stream(
                5,
                HANDSHAKE_VERSION,
                &[
                    AgentMessage::Join(JoinRequest {
                        min_version: 1,
                        max_version: 1,
                        token: "nvj_0123456789abcdef".into(),
                        csr_der: vec![0x30, 0x82, 0x01, 0x0a, 0x02, 0x01, 0x00],
                        hostname: "kvm-02".into(),
                        agent_version: "0.1.0".into(),
                    }),
                    AgentMessage::RenewCertificate(RenewRequest {
                        csr_der: vec![0x30, 0x03, 0x02, 0x01, 0x00],
                    }),
                ],
            ),
        ),
        (
            "agent_session",
            stream(
                6,
                1,
                &[
                    AgentMessage::Heartbeat(Heartbeat { seq: 300, lease_left_ms: None }),
                    AgentMessage::Inventory(Inventory {
                        capacity: Capacity {
                            cpus: 64,
                            memory_mib: 262_144,
                            ..Capacity::default()
                        },
                        hypervisor: "qemu:///system".into(),
                        vms: vec![
                            VmObserved {
                                name: "web-1".into(),
                                uuid: "6f1c2a4e-0b1d-4c3e-9a8f-1e2d3c4b5a69".into(),
                                state: VmState::Running,
                                managed: true,
                                snapshots: Vec::new(),
                            },
                            VmObserved {
                                name: "db-1".into(),
                                uuid: "0d9e8f7a-6b5c-4d3e-2f1a-0b9c8d7e6f5a".into(),
                                state: VmState::Crashed,
                                managed: true,
                                snapshots: Vec::new(),
                            },
                        ],
                    }),
                    AgentMessage::Metrics(MetricBatch {
                epoch: 3,
                seq: 9,
                dropped: 0,
                interval_ms: 1000,
                vms: vec![VmId(5)],
                labels: vec!["user".into()],
                series: vec![
                    novacron_shared::metrics::SeriesRef { scope: 0, metric: 1, label: 1 },
                    novacron_shared::metrics::SeriesRef { scope: 1, metric: 32, label: 0 },
                ],
                ticks: vec![1_760_000_000_000, 1000],
                values: vec![10, 2, 500, -3],
            }),
                    AgentMessage::CommandResult(CommandResult {
                        op_id: OpId(7),
                        outcome: CommandOutcome::Failed {
                            message: "domain not found".into(),
                        },
                    }),
                    AgentMessage::CommandResult(CommandResult {
                        op_id: OpId(u128::MAX),
                        outcome: CommandOutcome::Done,
                    }),
                ],
            ),
        ),
        (
            "server_session",
            stream(
                12,
                1,
                &[
                    ServerMessage::Welcome(Welcome {
                        version: 1,
                        host_id: HostId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
                        heartbeat_interval_ms: 5_000,
                    }),
                    ServerMessage::HeartbeatAck(HeartbeatAck { seq: 300 }),
                    ServerMessage::Command(Command {
                        op_id: OpId(8),
                        kind: CommandKind::RefreshInventory,
                    }),
                    ServerMessage::MetricsAck(MetricsAck { epoch: 3, upto_seq: 70_000 }),
                    ServerMessage::Error(WireError {
                        code: ErrorCode::Replaced,
                        message: "a newer connection replaced this one".into(),
                    }),
                ],
            ),
        ),
        (
            "server_joined_renewed",
            stream(
                255,
                HANDSHAKE_VERSION,
                &[
                    ServerMessage::Joined(JoinReply {
                        host_id: HostId(42),
                        cert_der: vec![0x30, 0x82, 0x02, 0x00],
                        ca_der: vec![0x30, 0x82, 0x01, 0x00],
                    }),
                    ServerMessage::CertificateRenewed(RenewReply {
                        cert_der: vec![0x30, 0x82, 0x02, 0x01],
                    }),
                ],
            ),
        ),
    ];

    for (name, bytes) in seeds {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).expect("write seed");
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
}
