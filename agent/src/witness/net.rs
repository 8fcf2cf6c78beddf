//! The peer witness's networking: one QUIC endpoint per agent that both
//! answers peers and asks them (mutual TLS against the fleet CA, ALPN
//! `novacron-witness/1`, builders in `novacron_shared::tls`), and the
//! per-peer workers that ask.
//!
//! Wire: each question is one bidirectional stream carrying one
//! [`Query`] frame, answered by one [`Answer`] frame, in the shared
//! framing (`novacron_shared::framing`) with version [`FRAME_VERSION`] and
//! a cap of [`MAX_FRAME`] bytes. A bad frame (too long, undecodable, of
//! another version, or not there within [`STREAM_TIMEOUT`]) closes that
//! stream with a rate-limited log line, and nothing else: the connection
//! and the other streams go on.
//!
//! Who is who: the answering host is verified with standard server
//! verification (the name dialled is the listed peer's host id, which its
//! certificate carries as a DNS name); the asker must present a
//! certificate the fleet CA signed, and its host id (the common name) is
//! only used in logs. The answer is the answerer's lease as it stands when
//! the answer is written (`Contact::of`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;
use novacron_shared::framing::{self, FrameError, FramedRecv};
use novacron_shared::ids::HostId;
use novacron_shared::pki::CertInfo;
use novacron_shared::protocol::WitnessPeer;
use novacron_shared::tls::ReloadableCert;
use novacron_shared::witness::{Answer, Contact, Query, ROUND_TIMEOUT};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch, Semaphore};

use super::WitnessError;
use crate::ha::{LeaseViews, WarnLimit};

/// The frame version of witness queries and answers.
pub const FRAME_VERSION: u16 = 1;
/// The largest witness frame either side accepts (version plus payload).
pub const MAX_FRAME: u32 = 256;
/// How long a stream may take to bring its query.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle witness connection is kept (the asker sends
/// keep-alives at a third of it, so connections to peers stay up between
/// rounds and a round needs no handshake).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Most connections the endpoint serves at once; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// At most one log line per this interval for what peers (or would-be
/// peers) do wrong.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The endpoint, listening on `listen` and presenting `cert`, with the
/// client config that asks peers set as its default.
pub fn endpoint(
    listen: SocketAddr,
    ca: CertificateDer<'static>,
    cert: Arc<ReloadableCert>,
) -> Result<quinn::Endpoint, WitnessError> {
    let server = novacron_shared::tls::witness_server_config(ca.clone(), cert.clone(), IDLE_TIMEOUT)
        .map_err(WitnessError::Tls)?;
    let client =
        novacron_shared::tls::witness_client_config(ca, cert, IDLE_TIMEOUT).map_err(WitnessError::Tls)?;
    let mut ep = quinn::Endpoint::server(server, listen)
        .map_err(|source| WitnessError::Bind { addr: listen, source })?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// The host id a connection's peer certificate names.
fn peer_host(conn: &quinn::Connection) -> Option<HostId> {
    let leaf = novacron_shared::tls::peer_leaf(conn)?;
    CertInfo::parse(&leaf).ok()?.host_id().ok()
}

/// A rate-limited log shared by the endpoint's tasks.
#[derive(Clone)]
struct Limited {
    limit: Arc<Mutex<WarnLimit>>,
    clock: Clock,
}

impl Limited {
    fn new(clock: Clock) -> Self {
        Self {
            limit: Arc::new(Mutex::new(WarnLimit::new(LOG_EVERY))),
            clock,
        }
    }

    /// `Some(suppressed)` when a line may go out now.
    fn allow(&self) -> Option<u64> {
        let now = self.clock.now();
        self.limit.lock().unwrap_or_else(|p| p.into_inner()).allow(now)
    }
}

/// Answers peers until `shutdown`: every query gets the lease as
/// `views` holds it at that moment.
pub async fn serve(
    ep: quinn::Endpoint,
    views: watch::Receiver<LeaseViews>,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let log = Limited::new(clock.clone());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => match i {
                Some(i) => i,
                None => return,
            },
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    return;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            incoming.refuse();
            if let Some(held) = log.allow() {
                tracing::warn!(
                    suppressed = held,
                    "witness: too many peer connections; one refused"
                );
            }
            continue;
        };
        let views = views.clone();
        let clock = clock.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(STREAM_TIMEOUT, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    // A host without a fleet certificate ends here.
                    if let Some(held) = log.allow() {
                        tracing::warn!(%remote, error = %e, suppressed = held, "witness: a peer connection failed its handshake");
                    }
                    return;
                }
                Err(_) => return,
            };
            let asker = peer_host(&conn);
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (views, clock, log) = (views.clone(), clock.clone(), log.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(send, recv, &views, &clock).await {
                        if let Some(held) = log.allow() {
                            tracing::warn!(%remote, asker = ?asker, error = %crate::link::error_chain(&e), suppressed = held, "witness: a bad query; stream closed");
                        }
                    }
                });
            }
        });
    }
}

/// Reads one query from a stream and answers it; on a bad frame the
/// stream is closed both ways.
async fn answer(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    views: &watch::Receiver<LeaseViews>,
    clock: &Clock,
) -> Result<(), WitnessError> {
    let mut recv = FramedRecv::new(recv, MAX_FRAME);
    let read = tokio::time::timeout(STREAM_TIMEOUT, recv.next::<Query>()).await;
    let query = match read {
        Ok(Ok(Some((FRAME_VERSION, q)))) => q,
        other => {
            let _ = send.reset(1u32.into());
            return Err(match other {
                Ok(Ok(Some((v, _)))) => WitnessError::Frame(FrameError::Version {
                    got: v,
                    expected: FRAME_VERSION,
                }),
                Ok(Ok(None)) => WitnessError::Frame(FrameError::Truncated),
                Ok(Err(e)) => WitnessError::Frame(e),
                Err(_) => WitnessError::Timeout(STREAM_TIMEOUT),
            });
        }
    };
    let contact = Contact::of(views.borrow().peers, clock.now());
    let mut buf = Vec::new();
    framing::write_frame(
        &mut send,
        FRAME_VERSION,
        &Answer {
            nonce: query.nonce,
            contact,
        },
        &mut buf,
    )
    .await?;
    let _ = send.finish();
    Ok(())
}

/// A peer's answer to a round, as a worker hands it to the driver.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    /// The round (the query's nonce).
    pub round: u64,
    /// The host the answering certificate names.
    pub from: HostId,
    /// What it said.
    pub contact: Contact,
}

/// A question for a worker: round `round`, which started at `started`.
#[derive(Debug, Clone, Copy)]
struct Ask {
    round: u64,
    started: Instant,
}

/// One worker per listed peer: it owns the connection to that peer and
/// asks it whenever a round starts.
struct Worker {
    addr: SocketAddr,
    ask: watch::Sender<Option<Ask>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The askers: one worker per listed peer, replies into one channel.
pub struct Askers {
    ep: quinn::Endpoint,
    clock: Clock,
    workers: HashMap<HostId, Worker>,
    replies: mpsc::Sender<Reply>,
    log: Limited,
}

impl Askers {
    /// Askers over `ep`; replies go to `replies`.
    pub fn new(ep: quinn::Endpoint, clock: Clock, replies: mpsc::Sender<Reply>) -> Self {
        Self {
            ep,
            log: Limited::new(clock.clone()),
            clock,
            workers: HashMap::new(),
            replies,
        }
    }

    /// Keeps a worker for exactly these peers (a peer whose address
    /// changed gets a new one; its old connection closes).
    pub fn set_peers(&mut self, peers: &[WitnessPeer]) {
        self.workers
            .retain(|host, w| peers.iter().any(|p| p.host == *host && p.addr == w.addr));
        for p in peers {
            if self.workers.contains_key(&p.host) {
                continue;
            }
            let (tx, rx) = watch::channel(None);
            let task = tokio::spawn(work(
                self.ep.clone(),
                p.clone(),
                rx,
                self.replies.clone(),
                self.clock.clone(),
                self.log.clone(),
            ));
            self.workers.insert(
                p.host,
                Worker {
                    addr: p.addr,
                    ask: tx,
                    task,
                },
            );
        }
    }

    /// Asks these peers for round `round`, started at `started` (a
    /// worker still busy with the previous round takes this one next).
    pub fn ask(&self, round: u64, started: Instant, peers: &[WitnessPeer]) {
        for p in peers {
            if let Some(w) = self.workers.get(&p.host) {
                w.ask.send_replace(Some(Ask { round, started }));
            }
        }
    }
}

async fn work(
    ep: quinn::Endpoint,
    peer: WitnessPeer,
    mut asks: watch::Receiver<Option<Ask>>,
    replies: mpsc::Sender<Reply>,
    clock: Clock,
    log: Limited,
) {
    let name = peer.host.to_string();
    let mut link = PeerLink::default();
    while asks.changed().await.is_ok() {
        let Some(ask) = *asks.borrow_and_update() else {
            continue;
        };
        // Past the round's timeout an answer no longer counts.
        let left = (ask.started + ROUND_TIMEOUT).saturating_duration_since(clock.now());
        let r = tokio::time::timeout(left, ask_peer(&ep, &mut link, &peer, &name, ask.round)).await;
        match r {
            Ok(Ok((from, contact))) => {
                let reply = Reply {
                    round: ask.round,
                    from,
                    contact,
                };
                if replies.send(reply).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                if let Some(held) = log.allow() {
                    tracing::warn!(peer = %peer.host, addr = %peer.addr, error = %crate::link::error_chain(&e), suppressed = held, "witness: a peer did not answer");
                }
            }
            Err(_) => {
                tracing::debug!(peer = %peer.host, round = ask.round, "witness: no answer within the round's timeout");
            }
        }
    }
}

/// A worker's connection to its peer: the kept one, or a handshake in
/// progress (kept across rounds: a round that times out during it does
/// not start another, so a dead peer costs one handshake at a time).
#[derive(Default)]
struct PeerLink {
    conn: Option<quinn::Connection>,
    connecting: Option<quinn::Connecting>,
}

/// Asks `peer` once over the kept connection (made anew if there is none
/// or it failed).
async fn ask_peer(
    ep: &quinn::Endpoint,
    link: &mut PeerLink,
    peer: &WitnessPeer,
    name: &str,
    nonce: u64,
) -> Result<(HostId, Contact), WitnessError> {
    if let Some(c) = link.conn.as_ref() {
        if c.close_reason().is_none() {
            match query(c, nonce).await {
                Ok(contact) => return Ok((peer_host(c).ok_or(WitnessError::NoPeerId)?, contact)),
                Err(e) => {
                    tracing::debug!(peer = %peer.host, error = %e, "witness: the kept connection failed; reconnecting")
                }
            }
        }
    }
    link.conn = None;
    let connecting = match &mut link.connecting {
        Some(c) => c,
        None => {
            let c = ep
                .connect(peer.addr, name)
                .map_err(|source| WitnessError::Connect {
                    addr: peer.addr,
                    source,
                })?;
            link.connecting.insert(c)
        }
    };
    // Cancelled by the round's timeout, the handshake stays for the next.
    let done = connecting.await;
    link.connecting = None;
    let c = done.map_err(WitnessError::Connection)?;
    let from = peer_host(&c).ok_or(WitnessError::NoPeerId)?;
    link.conn = Some(c.clone());
    Ok((from, query(&c, nonce).await?))
}

async fn query(conn: &quinn::Connection, nonce: u64) -> Result<Contact, WitnessError> {
    let (mut send, recv) = conn.open_bi().await.map_err(WitnessError::Connection)?;
    let mut buf = Vec::new();
    framing::write_frame(&mut send, FRAME_VERSION, &Query { nonce }, &mut buf).await?;
    let _ = send.finish();
    let mut recv = FramedRecv::new(recv, MAX_FRAME);
    match recv.next::<Answer>().await? {
        Some((FRAME_VERSION, a)) if a.nonce == nonce => Ok(a.contact),
        Some((FRAME_VERSION, a)) => Err(WitnessError::Nonce {
            sent: nonce,
            got: a.nonce,
        }),
        Some((v, _)) => Err(WitnessError::Frame(FrameError::Version {
            got: v,
            expected: FRAME_VERSION,
        })),
        None => Err(WitnessError::Frame(FrameError::Truncated)),
    }
}
