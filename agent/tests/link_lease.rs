//! The link feeds the HA lease: a scripted server (real QUIC and mutual
//! TLS, in this process) speaks to the agent's real session loop, and the
//! test watches the lease and the VM loop's desired state.
//!
//! Real time and sockets (quinn does not run under paused time), so it
//! checks order and values, never durations: every wait is a poll with a
//! generous limit that fails loudly. The peer-witness tests at the end run
//! the lease and the witness on a manual clock the test moves, so their
//! deadlines are exact instants.

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

// The peer witness, end to end: the agent's real link, lease driver and
// witness against a scripted server that pushes the terms and then stops
// acking, and peers (real witness endpoints) whose answers the test sets.
// The lease and the witness run on a manual clock the test advances, so a
// round's answers always arrive "within the round's timeout" however slow
// the machine; sockets and heartbeats run in real time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use novacron_agent::ha::{self, Fencer, LeaseViews};
use novacron_agent::witness;
use novacron_shared::clock::ManualClock;
use novacron_shared::protocol::{Heartbeat, WitnessPeer, WitnessTerms};
use novacron_shared::witness::{LeaseView, CONFIRMATION_VALID, ROUND_EVERY, ROUND_TIMEOUT};

/// The one HA VM of the model host.
const HA_VM: VmId = VmId(7);

/// A model host for the fence: one HA VM, running until killed; when
/// (on the manual clock) it was killed.
#[derive(Clone)]
struct Model {
    killed: Arc<Mutex<Option<Instant>>>,
    clock: Clock,
}

impl Model {
    fn killed(&self) -> Option<Instant> {
        *self.killed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Fencer for Model {
    async fn running_ha(&self, _known: Vec<VmId>) -> Result<Vec<VmId>, novacron_agent::error::HvError> {
        Ok(if self.killed().is_none() {
            vec![HA_VM]
        } else {
            vec![]
        })
    }
    async fn kill(&self, _vm: VmId) -> Result<(), novacron_agent::error::HvError> {
        let now = self.clock.now();
        self.killed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(now);
        Ok(())
    }
    async fn shutdown(&self, vm: VmId, _grace: Duration) -> Result<bool, novacron_agent::error::HvError> {
        self.kill(vm).await.map(|()| true)
    }
}

struct Pki {
    ca: FleetCa,
    server_cfg: quinn::ServerConfig,
}

fn pki_for_tests() -> Pki {
    // TLS checks certificates against the system's wall clock.
    let wall = Clock::system().wall();
    let ttl = Duration::from_secs(3600);
    let (ca, _) = ok(FleetCa::generate("witness-test-ca", wall, ttl));
    let server = ok(ca.issue_server(&["localhost".into()], Validity::for_ttl(wall, ttl)));
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
    Pki { ca, server_cfg }
}

fn host_identity(ca: &FleetCa, host: HostId) -> Identity {
    let (key, csr) = ok(pki::make_csr("witness-host"));
    let valid = Validity::for_ttl(Clock::system().wall(), Duration::from_secs(3600));
    let cert = ok(ca.sign_host_csr(&csr, host, valid));
    ok(Identity::new(
        cert.to_vec(),
        key.serialize_pem(),
        ca.cert_der().to_vec(),
    ))
}

/// A peer's witness endpoint, answering with the view the test sets.
struct Peer {
    peer: WitnessPeer,
    view: tokio::sync::watch::Sender<LeaseViews>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Peer {
    fn start(ca: &FleetCa, clock: &Clock) -> Peer {
        let host = HostId::random();
        let w = ok(witness::start(
            &host_identity(ca, host),
            ([127, 0, 0, 1], 0).into(),
            None,
        ));
        let addr = ok(w.endpoint.local_addr());
        let (view, rx) = tokio::sync::watch::channel(LeaseViews {
            rounds: LeaseView::Idle,
            peers: LeaseView::Idle,
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(witness::net::serve(w.endpoint, rx, clock.clone(), stop_rx));
        Peer {
            peer: WitnessPeer { host, addr },
            view,
            _stop: stop,
        }
    }

    fn says(&self, peers: LeaseView) {
        self.view.send_replace(LeaseViews {
            rounds: LeaseView::Idle,
            peers,
        });
    }
}

/// The agent under test: link, lease driver and witness on a manual clock.
struct Rig {
    clock: Clock,
    time: Arc<ManualClock>,
    lease: LeaseHandle,
    model: Model,
    host_id: HostId,
    witness_addr: SocketAddr,
    ep: quinn::Endpoint,
    stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

const WL: Duration = Duration::from_secs(3);

fn start_agent(p: &Pki) -> Rig {
    let (clock, time) = Clock::manual();
    let host_id = HostId::random();
    let identity = host_identity(&p.ca, host_id);
    let ep = ok(quinn::Endpoint::server(
        p.server_cfg.clone(),
        ([127, 0, 0, 1], 0).into(),
    ));
    let port = ok(ep.local_addr()).port();
    let dir = ok(tempfile::tempdir());
    let (lease, driver) = ok(LeaseHandle::new(
        LeaseTiming {
            lease: WL,
            fence_time: Duration::from_secs(1),
        },
        FenceMode::Kill,
        clock.clone(),
        None,
    ));
    let model = Model {
        killed: Arc::default(),
        clock: clock.clone(),
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(ha::run(lease.clone(), driver, model.clone(), stop_rx.clone()));
    let w = ok(witness::start(&identity, ([127, 0, 0, 1], 0).into(), None));
    let witness_addr = ok(w.endpoint.local_addr());
    let mut cfg = LinkConfig::new(
        format!("127.0.0.1:{port}"),
        "localhost".into(),
        "witness-host".into(),
    );
    cfg.clock = clock.clone();
    cfg.lease = Some(lease.clone());
    cfg.witness = Some(w.handle.clone());
    tokio::spawn(witness::run(w, lease.clone(), clock.clone(), stop_rx.clone()));
    common::warm_up_schema();
    let uri = common::node_uri(dir.path(), "");
    let (hv, _events) = ok(Hypervisor::start(&uri, LIMIT, common::setup_in(dir.path())));
    let (channels, _desired) = VmChannels::new(64);
    tokio::spawn(link::run(
        cfg,
        identity,
        Paths::new(dir.path()),
        hv,
        channels,
        stop_rx,
    ));
    Rig {
        clock,
        time,
        lease,
        model,
        host_id,
        witness_addr,
        ep,
        stop,
        _dir: dir,
    }
}

impl Session {
    /// The next heartbeat (other frames are skipped).
    async fn heartbeat_msg(&mut self) -> Heartbeat {
        loop {
            if let AgentMessage::Heartbeat(h) = self.next().await {
                return h;
            }
        }
    }
}

impl Rig {
    /// The fence deadline the lease (and the fence guard) holds.
    fn deadline(&self) -> Option<Instant> {
        self.lease.guard_view().0
    }

    /// Accepts the session, checks the inventory's witness address,
    /// pushes the terms (`peers` plus this host itself, which the agent
    /// drops) and acks one heartbeat: the lease runs until the returned
    /// instant. The heartbeats before and after report the lease left.
    async fn leased(&self, listed: Vec<WitnessPeer>, quorum: u32) -> (Session, Instant) {
        self.leased_with_grace(listed, quorum, Duration::ZERO).await
    }

    /// [`Rig::leased`] with terms that give `grace` past the lease end.
    async fn leased_with_grace(
        &self,
        mut listed: Vec<WitnessPeer>,
        quorum: u32,
        grace: Duration,
    ) -> (Session, Instant) {
        let mut s = Session::accept(&self.ep, self.host_id).await;
        let inv = loop {
            if let AgentMessage::Inventory(i) = s.next().await {
                break i;
            }
        };
        assert_eq!(
            inv.witness,
            Some(self.witness_addr),
            "the inventory says where the witness listens"
        );
        s.send(ServerMessage::LeaseTerms(LeaseTerms {
            lease_ms: 3_000,
            fence_time_ms: 1_000,
            fence: FenceStyle::Kill,
            isolation: IsolationResponse::SelfFence,
        }))
        .await;
        listed.push(WitnessPeer {
            host: self.host_id,
            addr: self.witness_addr,
        });
        s.send(ServerMessage::Witness(WitnessTerms {
            peers: listed,
            quorum,
            grace_ms: ok(u32::try_from(grace.as_millis())),
        }))
        .await;
        let h = s.heartbeat_msg().await;
        assert_eq!(h.lease_left_ms, None, "no lease yet");
        // The manual clock stands still: the lease counts from this send.
        let end = self.clock.now() + WL;
        s.send(ServerMessage::HeartbeatAck(HeartbeatAck { seq: h.seq }))
            .await;
        until("the lease", || matches!(self.lease.state(), State::Leased { .. })).await;
        loop {
            let h = s.heartbeat_msg().await;
            if h.lease_left_ms.is_some() {
                assert_eq!(
                    h.lease_left_ms,
                    Some(3_000),
                    "sent at the acked heartbeat's instant"
                );
                break;
            }
        }
        self.time.advance(Duration::from_secs(1));
        loop {
            let h = s.heartbeat_msg().await;
            if h.lease_left_ms != Some(3_000) {
                assert_eq!(h.lease_left_ms, Some(2_000), "a second later");
                break;
            }
        }
        // From here on the server acks nothing.
        (s, end)
    }

    /// Moves the manual clock to `at` (a round is due there) and waits
    /// until the confirmation of the round started then holds.
    async fn confirmed_at(&self, at: Instant) {
        self.time.advance(at.saturating_duration_since(self.clock.now()));
        let want = at + CONFIRMATION_VALID;
        until("the round's confirmation", || self.deadline() == Some(want)).await;
    }

    fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_confirmation_keeps_the_ha_vm_past_the_lease_and_its_lapse_fences() {
    let p = pki_for_tests();
    let rig = start_agent(&p);
    let (b, c) = (Peer::start(&p.ca, &rig.clock), Peer::start(&p.ca, &rig.clock));
    let (_s, end) = rig.leased(vec![b.peer.clone(), c.peer.clone()], 2).await;
    assert_eq!(rig.deadline(), Some(end));
    // Both peers lost the server a moment ago.
    let lost = rig.clock.now();
    b.says(LeaseView::Lost { since: lost });
    c.says(LeaseView::Lost { since: lost });
    // Rounds from 1.5 s before the end, every 0.5 s, each confirming.
    let first = end - (CONFIRMATION_VALID - ROUND_TIMEOUT);
    for k in 0..4u32 {
        rig.confirmed_at(first + ROUND_EVERY * k).await;
    }
    // Now at the lease end (the last round started here): kept, not fenced.
    assert_eq!(rig.clock.now(), end);
    until("the lease to lapse", || {
        matches!(rig.lease.state(), State::Lapsed { .. })
    })
    .await;
    assert_eq!(rig.model.killed(), None, "the HA VM runs on");
    assert!(
        !rig.lease.may_start_ha(rig.clock.now()),
        "a confirmation starts nothing"
    );
    let last = end + CONFIRMATION_VALID;
    assert_eq!(rig.deadline(), Some(last), "the fence guard's deadline follows");
    // One peer regains the server: too few confirm from now on.
    b.says(LeaseView::Leased {
        until: rig.clock.now() + Duration::from_secs(60),
    });
    rig.time
        .advance(last.saturating_duration_since(rig.clock.now()) - Duration::from_millis(1));
    // Just before the last confirmation ends (the rounds due meanwhile
    // fail, and the drivers get real time to act wrongly): still running.
    tokio::time::sleep(ROUND_TIMEOUT + Duration::from_millis(200)).await;
    assert_eq!(rig.model.killed(), None);
    assert!(
        matches!(rig.lease.state(), State::Lapsed { .. }),
        "{:?}",
        rig.lease.state()
    );
    rig.time.advance(Duration::from_millis(1));
    until("the fence", || rig.model.killed().is_some()).await;
    assert_eq!(
        rig.model.killed(),
        Some(last),
        "fenced when the last confirmation ended"
    );
    until("the fence to finish", || {
        matches!(rig.lease.state(), State::Fenced { .. })
    })
    .await;
    rig.stop();
}

/// `n` listed peers that never answer: their sockets swallow every packet
/// (cut off), as the server does. Keep the sockets while the test runs.
fn unreachable_peers(n: usize) -> (Vec<std::net::UdpSocket>, Vec<WitnessPeer>) {
    let holes: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| ok(std::net::UdpSocket::bind("127.0.0.1:0")))
        .collect();
    let listed = holes
        .iter()
        .map(|h| WitnessPeer {
            host: HostId::random(),
            addr: ok(h.local_addr()),
        })
        .collect();
    (holes, listed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_its_peers_fences_at_the_lease_end() {
    let p = pki_for_tests();
    let rig = start_agent(&p);
    let (_holes, listed) = unreachable_peers(2);
    let (_s, end) = rig.leased(listed, 2).await;
    rig.fences_at_the_lease_end(end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_grace_an_agent_cut_off_from_its_peers_fences_at_its_end() {
    let p = pki_for_tests();
    let rig = start_agent(&p);
    let (_holes, listed) = unreachable_peers(2);
    let grace = Duration::from_millis(1_500);
    let (_s, end) = rig.leased_with_grace(listed, 2, grace).await;
    // The grace is a provisional confirmation: the fence (and the fence
    // guard's deadline) moves to the lease end plus the grace.
    until("the grace", || rig.deadline() == Some(end + grace)).await;
    rig.time.advance(end.saturating_duration_since(rig.clock.now()));
    tokio::time::sleep(ROUND_TIMEOUT + Duration::from_millis(200)).await;
    assert_eq!(rig.model.killed(), None, "kept through the grace");
    rig.time.advance(grace);
    until("the fence", || rig.model.killed().is_some()).await;
    assert_eq!(
        rig.model.killed(),
        Some(end + grace),
        "fenced when the grace ended"
    );
    rig.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_foreign_ca_certificate_does_not_count() {
    let p = pki_for_tests();
    let rig = start_agent(&p);
    let other = pki_for_tests();
    let (b, stranger) = (Peer::start(&p.ca, &rig.clock), Peer::start(&other.ca, &rig.clock));
    let (_s, end) = rig.leased(vec![b.peer.clone(), stranger.peer.clone()], 2).await;
    let lost = rig.clock.now();
    b.says(LeaseView::Lost { since: lost });
    stranger.says(LeaseView::Lost { since: lost });
    rig.fences_at_the_lease_end(end).await;
}

impl Rig {
    /// Steps through every round from the stake to the lease `end`: none
    /// confirms, and the HA VM is fenced at the end.
    async fn fences_at_the_lease_end(&self, end: Instant) {
        let first = end - (CONFIRMATION_VALID - ROUND_TIMEOUT);
        for k in 0..3u32 {
            let at = first + ROUND_EVERY * k;
            self.time.advance(at.saturating_duration_since(self.clock.now()));
            // Past the round's timeout (real time: its answers, if any,
            // would have come).
            tokio::time::sleep(ROUND_TIMEOUT + Duration::from_millis(200)).await;
            assert_eq!(self.deadline(), Some(end), "nothing confirmed");
            assert_eq!(self.model.killed(), None);
        }
        self.time.advance(end.saturating_duration_since(self.clock.now()));
        until("the fence", || self.model.killed().is_some()).await;
        assert_eq!(
            self.model.killed(),
            Some(end),
            "fenced at the lease end, as without a witness"
        );
        self.stop();
    }
}
