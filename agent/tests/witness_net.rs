//! The peer witness's endpoints over real QUIC on loopback: hosts with
//! certificates from one fleet CA answer each other, each answer named by
//! the answering certificate; a host with a foreign CA's certificate gets
//! no answer and gives none that counts; a listed host id served by
//! another host's certificate does not answer as that id; a bad frame
//! closes its stream and nothing else.
//!
//! Answers are computed from a manual clock (the contact's `for_ms` is
//! exact); sockets run in real time, so waits are polls with a generous
//! limit, and "no answer" is checked after the round's timeout, past which
//! the worker has given up.

use std::net::SocketAddr;
use std::time::Duration;

use novacron_agent::ha::LeaseViews;
use novacron_agent::identity::Identity;
use novacron_agent::witness::{self, net};
use novacron_shared::clock::Clock;
use novacron_shared::framing::{self, FramedRecv};
use novacron_shared::ids::HostId;
use novacron_shared::pki::{self, FleetCa, Validity};
use novacron_shared::protocol::WitnessPeer;
use novacron_shared::witness::{Answer, Contact, LeaseView, Query, ROUND_TIMEOUT};
use tokio::sync::{mpsc, watch};

const LIMIT: Duration = Duration::from_secs(20);

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

// Certificates are checked by TLS against the system's wall clock.
fn ca(name: &str) -> FleetCa {
    ok(FleetCa::generate(
        name,
        Clock::system().wall(),
        Duration::from_secs(3600),
    ))
    .0
}

fn identity(ca: &FleetCa, host: HostId) -> Identity {
    let (key, csr) = ok(pki::make_csr("witness-host"));
    let valid = Validity::for_ttl(Clock::system().wall(), Duration::from_secs(3600));
    let cert = ok(ca.sign_host_csr(&csr, host, valid));
    ok(Identity::new(
        cert.to_vec(),
        key.serialize_pem(),
        ca.cert_der().to_vec(),
    ))
}

/// A host's witness endpoint, answering with the lease view it is set to.
struct Host {
    id: HostId,
    ep: quinn::Endpoint,
    addr: SocketAddr,
    view: watch::Sender<LeaseViews>,
    _stop: watch::Sender<bool>,
}

impl Host {
    fn start(ca: &FleetCa, clock: &Clock) -> Host {
        let id = HostId::random();
        let w = ok(witness::start(
            &identity(ca, id),
            ([127, 0, 0, 1], 0).into(),
            None,
        ));
        let addr = ok(w.endpoint.local_addr());
        let (view, rx) = watch::channel(LeaseViews {
            rounds: LeaseView::Idle,
            peers: LeaseView::Idle,
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(net::serve(w.endpoint.clone(), rx, clock.clone(), stop_rx));
        Host {
            id,
            ep: w.endpoint,
            addr,
            view,
            _stop: stop,
        }
    }

    fn peer(&self) -> WitnessPeer {
        WitnessPeer {
            host: self.id,
            addr: self.addr,
        }
    }

    fn set(&self, peers: LeaseView) {
        self.view.send_replace(LeaseViews {
            rounds: LeaseView::Idle,
            peers,
        });
    }
}

/// Asks `peers` from `asker` in round `round`; returns every reply that
/// came before the round's timeout had passed for sure.
async fn round(asker: &Host, clock: &Clock, round: u64, peers: &[WitnessPeer]) -> Vec<net::Reply> {
    let (tx, mut rx) = mpsc::channel(16);
    let mut askers = net::Askers::new(asker.ep.clone(), clock.clone(), tx);
    askers.set_peers(peers);
    askers.ask(round, clock.now(), peers);
    let mut out = Vec::new();
    // The workers give up ROUND_TIMEOUT (real time: the manual clock
    // stands still) after the round's start; wait past that.
    let wait = tokio::time::sleep(ROUND_TIMEOUT + Duration::from_millis(500));
    tokio::pin!(wait);
    loop {
        tokio::select! {
            Some(r) = rx.recv() => out.push(r),
            _ = &mut wait => return out,
        }
    }
}

fn from(replies: &[net::Reply]) -> Vec<HostId> {
    let mut v: Vec<_> = replies.iter().map(|r| r.from).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_of_one_fleet_answer_each_other_each_named_by_its_certificate() {
    let (clock, time) = Clock::manual();
    let fleet = ca("fleet");
    let (a, b, c) = (
        Host::start(&fleet, &clock),
        Host::start(&fleet, &clock),
        Host::start(&fleet, &clock),
    );
    let lost_at = clock.now();
    time.advance(Duration::from_millis(1_500));
    b.set(LeaseView::Lost { since: lost_at });
    c.set(LeaseView::Leased {
        until: clock.now() + Duration::from_secs(5),
    });
    // A still holds none this run: it vouches for nothing.
    a.set(LeaseView::Idle);
    let replies = round(&a, &clock, 7, &[b.peer(), c.peer()]).await;
    let mut want = vec![b.id, c.id];
    want.sort();
    assert_eq!(from(&replies), want, "{replies:?}");
    for r in &replies {
        assert_eq!(r.round, 7);
        let expected = if r.from == b.id {
            Contact::Lost { for_ms: 1_500 }
        } else {
            Contact::Leased
        };
        assert_eq!(r.contact, expected, "{r:?}");
    }
    // The other way round, and again over the connection already made.
    let replies = round(&b, &clock, 8, &[a.peer()]).await;
    assert_eq!(from(&replies), vec![a.id]);
    assert_eq!(replies[0].contact, Contact::NeverLeased);
    let (tx, mut rx) = mpsc::channel(16);
    let mut askers = net::Askers::new(a.ep.clone(), clock.clone(), tx);
    askers.set_peers(&[b.peer()]);
    for n in 1..=3 {
        askers.ask(n, clock.now(), &[b.peer()]);
        let r = tokio::time::timeout(LIMIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no answer to round {n}"))
            .unwrap_or_else(|| panic!("replies closed"));
        assert_eq!((r.round, r.from), (n, b.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_ca_certificate_gets_no_answer_and_gives_none() {
    let (clock, _time) = Clock::manual();
    let fleet = ca("fleet");
    let other = ca("another fleet");
    let a = Host::start(&fleet, &clock);
    let b = Host::start(&fleet, &clock);
    let stranger = Host::start(&other, &clock);
    for h in [&a, &b, &stranger] {
        h.set(LeaseView::Lost { since: clock.now() });
    }
    // Listed, but its certificate is not the fleet's: no answer counts.
    let replies = round(&a, &clock, 1, &[b.peer(), stranger.peer()]).await;
    assert_eq!(from(&replies), vec![b.id], "{replies:?}");
    // It asks a fleet host: refused (no fleet client certificate).
    let replies = round(&stranger, &clock, 2, &[b.peer()]).await;
    assert!(replies.is_empty(), "{replies:?}");
    // A fleet host at a listed address under another host's id: the
    // certificate does not name the id dialled.
    let impostor = WitnessPeer {
        host: HostId::random(),
        addr: b.addr,
    };
    let replies = round(&a, &clock, 3, &[impostor]).await;
    assert!(replies.is_empty(), "{replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_closes_its_stream_and_nothing_else() {
    let (clock, _time) = Clock::manual();
    let fleet = ca("fleet");
    let a = Host::start(&fleet, &clock);
    let b = Host::start(&fleet, &clock);
    b.set(LeaseView::Lost { since: clock.now() });
    let conn = ok(ok(a.ep.connect(b.addr, &b.id.to_string())).await);
    // Garbage, an oversized frame and a frame of another version: each
    // stream is closed without an answer.
    let oversized = {
        let mut v = (net::MAX_FRAME + 1).to_be_bytes().to_vec();
        v.extend_from_slice(&[0, 1]);
        v
    };
    let wrong_version = {
        let mut v = Vec::new();
        ok(framing::encode_frame(
            9,
            &Query { nonce: 1 },
            net::MAX_FRAME,
            &mut v,
        ));
        v
    };
    for bad in [vec![0xff; 40], oversized, wrong_version] {
        let (mut send, recv) = ok(conn.open_bi().await);
        ok(send.write_all(&bad).await);
        let _ = send.finish();
        let mut recv = FramedRecv::new(recv, net::MAX_FRAME);
        let got = tokio::time::timeout(LIMIT, recv.next::<Answer>())
            .await
            .unwrap_or_else(|_| panic!("the stream stayed open"));
        assert!(!matches!(got, Ok(Some(_))), "answered a bad frame: {got:?}");
    }
    // The same connection still answers a good query.
    let (mut send, recv) = ok(conn.open_bi().await);
    let mut buf = Vec::new();
    ok(framing::write_frame(&mut send, net::FRAME_VERSION, &Query { nonce: 42 }, &mut buf).await);
    let _ = send.finish();
    let mut recv = FramedRecv::new(recv, net::MAX_FRAME);
    let got = tokio::time::timeout(LIMIT, recv.next::<Answer>())
        .await
        .unwrap_or_else(|_| panic!("no answer"));
    let (_, answer) = ok(got).unwrap_or_else(|| panic!("stream closed"));
    assert_eq!(
        answer,
        Answer {
            nonce: 42,
            contact: Contact::Lost { for_ms: 0 }
        }
    );
}
