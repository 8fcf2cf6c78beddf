//! The link feeds the HA lease: a scripted server (real QUIC and mutual
//! TLS, in this process) speaks to the agent's real session loop, and the
//! test watches the lease and the VM loop's desired state.
//!
//! Real time and sockets (quinn does not run under paused time), so it
//! checks order and values, never durations: every wait is a poll with a
//! generous limit that fails loudly.

#[allow(dead_code)] // each test binary uses its own part of it
mod common;

use std::time::{Duration, Instant};

use novacron_agent::ha::LeaseHandle;
use novacron_agent::hypervisor::Hypervisor;
use novacron_agent::identity::{Identity, Paths};
use novacron_agent::lease::{FenceMode, State};
use novacron_agent::link::{self, LinkConfig, VmChannels};
use novacron_shared::clock::Clock;
use novacron_shared::framing::{self, FramedRecv, MAX_FRAME_LEN};
use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::lease::LeaseTiming;
use novacron_shared::pki::{self, FleetCa, Validity};
use novacron_shared::protocol::{
    AgentMessage, DesiredState, FenceStyle, HeartbeatAck, IsolationResponse, LeaseTerms, ServerMessage,
    Welcome, HANDSHAKE_VERSION, PROTOCOL_VERSION_MAX,
};
use novacron_shared::spec::{DesiredVm, Power, VmSpec};

const LIMIT: Duration = Duration::from_secs(20);

/// Polls `f` until it holds, or fails naming `what`.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let clock = Clock::system();
    let start = clock.now();
    while !f() {
        assert!(clock.since(start) < LIMIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

struct Session {
    send: quinn::SendStream,
    recv: FramedRecv,
    buf: Vec<u8>,
    _conn: quinn::Connection,
}

impl Session {
    async fn accept(ep: &quinn::Endpoint, host_id: HostId) -> Session {
        let incoming = tokio::time::timeout(LIMIT, ep.accept())
            .await
            .unwrap_or_else(|_| panic!("the agent did not connect"))
            .unwrap_or_else(|| panic!("endpoint closed"));
        let conn = ok(incoming.await);
        let (send, recv) = ok(conn.accept_bi().await);
        let mut s = Session {
            send,
            recv: FramedRecv::new(recv, MAX_FRAME_LEN),
            buf: Vec::new(),
            _conn: conn,
        };
        let hello = s.next().await;
        assert!(matches!(hello, AgentMessage::Hello(_)), "{hello:?}");
        let welcome = ServerMessage::Welcome(Welcome {
            version: PROTOCOL_VERSION_MAX,
            host_id,
            heartbeat_interval_ms: 100,
        });
        ok(framing::write_frame(&mut s.send, HANDSHAKE_VERSION, &welcome, &mut s.buf).await);
        s
    }

    async fn next(&mut self) -> AgentMessage {
        let frame = tokio::time::timeout(LIMIT, self.recv.next::<AgentMessage>())
            .await
            .unwrap_or_else(|_| panic!("no frame from the agent"));
        ok(frame)
            .unwrap_or_else(|| panic!("the agent closed the stream"))
            .1
    }

    /// The next heartbeat's number (other frames are skipped).
    async fn heartbeat(&mut self) -> u64 {
        loop {
            if let AgentMessage::Heartbeat(h) = self.next().await {
                return h.seq;
            }
        }
    }

    async fn send(&mut self, m: ServerMessage) {
        ok(framing::write_frame(&mut self.send, PROTOCOL_VERSION_MAX, &m, &mut self.buf).await);
    }
}

fn desired(generation: u64) -> DesiredState {
    let mut spec = VmSpec::minimal("ha-1", 1, 64);
    spec.ha = true;
    DesiredState {
        generation,
        vms: vec![DesiredVm {
            id: VmId(7),
            op_id: OpId(8),
            spec,
            power: Power::Stopped,
            epoch: 1,
        }],
        migrating: vec![],
        departed: vec![],
    }
}

fn renewed_from(s: State) -> Option<Instant> {
    match s {
        State::Leased { renewed_from } | State::Renewing { renewed_from } => Some(renewed_from),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_feeds_the_lease_terms_heartbeats_acks_and_forgets_the_old_desired_state() {
    let clock = Clock::system();
    let ttl = Duration::from_secs(3600);
    let (ca, _) = ok(FleetCa::generate("lease-test-ca", clock.wall(), ttl));
    let server = ok(ca.issue_server(&["localhost".into()], Validity::for_ttl(clock.wall(), ttl)));
    let host_id = HostId::random();
    let (key, csr) = ok(pki::make_csr("lease-host"));
    let cert = ok(ca.sign_host_csr(&csr, host_id, Validity::for_ttl(clock.wall(), ttl)));
    let identity = ok(Identity::new(
        cert.to_vec(),
        key.serialize_pem(),
        ca.cert_der().to_vec(),
    ));
    let chain = vec![
        ok(pki::certs_from_pem(&server.cert_pem)).remove(0),
        ca.cert_der().clone(),
    ];
    let server_cfg = ok(novacron_shared::tls::server_config(
        ca.cert_der().clone(),
        chain,
        ok(pki::key_from_pem(&server.key_pem)),
        Duration::from_secs(10),
    ));
    let ep = ok(quinn::Endpoint::server(server_cfg, ([127, 0, 0, 1], 0).into()));
    let port = ok(ep.local_addr()).port();

    let dir = ok(tempfile::tempdir());
    let terms_file = Paths::new(dir.path()).lease_terms();
    let (lease, _driver) = ok(LeaseHandle::new(
        LeaseTiming::new(Duration::from_secs(5)),
        FenceMode::Kill,
        clock.clone(),
        Some(terms_file.clone()),
    ));
    let mut cfg = LinkConfig::new(
        format!("127.0.0.1:{port}"),
        "localhost".into(),
        "lease-host".into(),
    );
    cfg.lease = Some(lease.clone());
    common::warm_up_schema();
    let uri = common::node_uri(dir.path(), "");
    let (hv, _events) = ok(Hypervisor::start(&uri, LIMIT, common::setup_in(dir.path())));
    let (channels, desired_rx) = VmChannels::new(64);
    // A desired state from an earlier session.
    channels.desired.send_replace(Some(desired(1)));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(link::run(
        cfg,
        identity,
        Paths::new(dir.path()),
        hv,
        channels,
        stop_rx,
    ));

    let mut s = Session::accept(&ep, host_id).await;
    until("the session start to forget the old desired state", || {
        desired_rx.borrow().is_none()
    })
    .await;
    s.send(ServerMessage::LeaseTerms(LeaseTerms {
        lease_ms: 3_000,
        fence_time_ms: 1_000,
        fence: FenceStyle::ShutdownThenKill { grace_ms: 500 },
        isolation: IsolationResponse::SelfFence,
    }))
    .await;
    // Out of range: refused, the terms above stay.
    s.send(ServerMessage::LeaseTerms(LeaseTerms {
        lease_ms: 10,
        fence_time_ms: 1_000,
        fence: FenceStyle::Kill,
        isolation: IsolationResponse::SelfFence,
    }))
    .await;
    s.send(ServerMessage::DesiredState(desired(2))).await;
    until("the new desired state", || {
        desired_rx.borrow().as_ref().is_some_and(|d| d.generation == 2)
    })
    .await;
    assert_eq!(lease.timing().lease, Duration::from_millis(3_000));
    assert_eq!(
        novacron_agent::ha::load_terms(&terms_file).map(|t| t.lease_ms),
        Some(3_000),
        "the accepted terms are saved for the next start"
    );

    // Heartbeats count from 1; no lease before the first ack.
    assert_eq!(s.heartbeat().await, 1);
    assert!(
        matches!(lease.state(), State::NoLease { .. }),
        "{:?}",
        lease.state()
    );
    let sent_by = clock.now();
    s.send(ServerMessage::HeartbeatAck(HeartbeatAck { seq: 1 })).await;
    until("the ack to give a lease", || {
        matches!(lease.state(), State::Leased { .. })
    })
    .await;
    let first = renewed_from(lease.state()).unwrap_or_else(|| panic!("no lease"));
    assert!(first <= sent_by, "the lease counts from the send, not the ack");
    assert_eq!(s.heartbeat().await, 2);

    // A new session: numbers start at 1 again, and its acks renew.
    drop(s);
    let mut s = Session::accept(&ep, host_id).await;
    assert_eq!(s.heartbeat().await, 1);
    s.send(ServerMessage::HeartbeatAck(HeartbeatAck { seq: 1 })).await;
    until("an ack of the new session to renew", || {
        renewed_from(lease.state()).is_some_and(|r| r > first)
    })
    .await;

    ok(stop.send(true));
    let _ = tokio::time::timeout(LIMIT, agent).await;
}
