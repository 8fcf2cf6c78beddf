//! The peer witness's driver: runs the pure `novacron_shared::witness::Witness`
//! (whose header holds the rules and the safety argument) between the HA
//! lease and the network. It is a task of its own, like the lease's, so
//! it keeps asking while the link to the server is down.
//!
//! - In: the terms the server pushes ([`WitnessHandle::set_terms`], from
//!   the link), and the lease as the witness needs it
//!   ([`crate::ha::LeaseHandle::watch_views`]).
//! - Out: rounds (every listed peer asked at once by its worker in
//!   [`net`], over a kept connection), their answers fed back to the core
//!   with the host the answering certificate names, and the core's
//!   `confirmed_until` handed to the lease
//!   ([`crate::ha::LeaseHandle::set_confirmation`]), which keeps the HA VMs
//!   past the lease end only while it holds and never starts one on it.
//! - Beside it, [`net::serve`] answers peers from the same lease views.
//!
//! While the lease is gone each round's outcome is logged (rate-limited:
//! at once when it changes, else every [`LOG_EVERY`]), with the messages
//! in [`msg`].
//!
//! [`WitnessHandle::advertised`] is where peers reach this agent, as the
//! link reports it in the inventory: the configured address, else this
//! host's IP towards the server (the route's source address,
//! `link::local_ip_towards`) with the listen port.

pub mod net;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_shared::clock::Clock;
use novacron_shared::ids::HostId;
use novacron_shared::protocol::{IsolationResponse, WitnessTerms};
use novacron_shared::tls::ReloadableCert;
use novacron_shared::witness::{Contact, LeaseView, Witness, ROUND_TIMEOUT};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

use crate::ha::{LeaseHandle, WarnLimit};
use crate::identity::Identity;

/// The most peers the agent accepts in one set of terms.
pub const MAX_PEERS: usize = 1024;
/// At most one round-outcome line per this interval while the outcome
/// stays the same.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// The round-outcome log messages.
pub mod msg {
    /// Enough peers lost the server too: the HA VMs stay.
    pub const KEEPING: &str = "server lost; peers lost it too: keeping HA VMs";
    /// Too few peers confirm: the lease's fence goes ahead.
    pub const FENCING: &str = "server lost; too few peers lost it too: cannot confirm: fencing";
    /// Too few confirm, but keep-running keeps the HA VMs anyway.
    pub const UNCONFIRMED: &str =
        "server lost; too few peers lost it too: cannot confirm (keep-running: HA VMs stay)";
}

/// What the witness fails at.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The TLS configuration could not be built.
    #[error("witness TLS setup failed")]
    Tls(#[source] novacron_shared::tls::TlsError),
    /// The host's key or certificate is unusable.
    #[error("the host identity is unusable for the witness")]
    Identity(#[source] novacron_shared::pki::PkiError),
    /// The endpoint could not listen.
    #[error("cannot listen for witness peers on {addr}")]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A peer could not be dialled.
    #[error("cannot connect to the witness peer at {addr}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectError,
    },
    /// A connection failed.
    #[error("witness connection failed")]
    Connection(#[source] quinn::ConnectionError),
    /// A frame was bad.
    #[error("witness frame")]
    Frame(#[from] novacron_shared::framing::FrameError),
    /// No query in time.
    #[error("no query within {0:?}")]
    Timeout(Duration),
    /// The peer's certificate names no host.
    #[error("the peer's certificate names no host")]
    NoPeerId,
    /// The answer is to another question.
    #[error("answer for nonce {got}, asked {sent}")]
    Nonce {
        /// Ours.
        sent: u64,
        /// Theirs.
        got: u64,
    },
    /// The server's terms were refused.
    #[error("witness terms refused: {0}")]
    TermsRefused(String),
}

/// The link's side of the witness: pushes terms, reports the address,
/// hands renewed certificates to the endpoint.
#[derive(Debug, Clone)]
pub struct WitnessHandle {
    host: HostId,
    terms: watch::Sender<Option<WitnessTerms>>,
    cert: Arc<ReloadableCert>,
    advertise: Option<SocketAddr>,
    port: u16,
}

impl WitnessHandle {
    /// Terms from the server: this host is dropped from the peers, a peer
    /// listed twice counts once; more than [`MAX_PEERS`] are refused (the
    /// old terms stay).
    pub fn set_terms(&self, mut t: WitnessTerms) -> Result<(), WitnessError> {
        if t.peers.len() > MAX_PEERS {
            return Err(WitnessError::TermsRefused(format!(
                "{} peers; at most {MAX_PEERS}",
                t.peers.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        t.peers.retain(|p| p.host != self.host && seen.insert(p.host));
        self.terms.send_replace(Some(t));
        Ok(())
    }

    /// Where peers reach this agent: the configured address, else
    /// `local_ip` (this host's, towards the server) with the listen port.
    pub fn advertised(&self, local_ip: Option<IpAddr>) -> Option<SocketAddr> {
        self.advertise
            .or_else(|| local_ip.map(|ip| SocketAddr::new(ip, self.port)))
    }

    /// A renewed identity: the endpoint presents it from the next
    /// handshake on, both ways.
    pub fn renewed(&self, id: &Identity) -> Result<(), WitnessError> {
        let key = novacron_shared::pki::key_from_pem(&id.key_pem).map_err(WitnessError::Identity)?;
        self.cert
            .replace(vec![CertificateDer::from(id.cert_der.clone())], key)
            .map_err(WitnessError::Tls)
    }
}

/// A started witness: its endpoint (listening), the link's handle, and
/// what [`run`] needs.
pub struct Started {
    /// The endpoint, answering and asking.
    pub endpoint: quinn::Endpoint,
    /// For the link.
    pub handle: WitnessHandle,
    terms: watch::Receiver<Option<WitnessTerms>>,
}

/// Binds the endpoint on `listen` with `id`'s certificate and the fleet CA.
pub fn start(
    id: &Identity,
    listen: SocketAddr,
    advertise: Option<SocketAddr>,
) -> Result<Started, WitnessError> {
    let key = novacron_shared::pki::key_from_pem(&id.key_pem).map_err(WitnessError::Identity)?;
    let cert = ReloadableCert::new(vec![CertificateDer::from(id.cert_der.clone())], key)
        .map_err(WitnessError::Tls)?;
    let ep = net::endpoint(listen, CertificateDer::from(id.ca_der.clone()), cert.clone())?;
    let port = ep
        .local_addr()
        .map_err(|source| WitnessError::Bind { addr: listen, source })?
        .port();
    let (tx, rx) = watch::channel(None);
    Ok(Started {
        endpoint: ep,
        handle: WitnessHandle {
            host: id.host_id,
            terms: tx,
            cert,
            advertise,
            port,
        },
        terms: rx,
    })
}

/// The round being watched for its outcome log.
struct RoundLog {
    id: u64,
    started: Instant,
    asked: usize,
    lost: std::collections::BTreeSet<HostId>,
}

/// Runs the witness (answering peers and asking them) until `shutdown`.
pub async fn run(started: Started, lease: LeaseHandle, clock: Clock, shutdown: watch::Receiver<bool>) {
    let Started {
        endpoint,
        handle: _,
        terms,
    } = started;
    let server = tokio::spawn(net::serve(
        endpoint.clone(),
        lease.watch_views(),
        clock.clone(),
        shutdown.clone(),
    ));
    drive(endpoint.clone(), terms, lease, clock, shutdown).await;
    server.abort();
    endpoint.close(0u32.into(), b"agent shutting down");
}

async fn drive(
    ep: quinn::Endpoint,
    mut terms: watch::Receiver<Option<WitnessTerms>>,
    lease: LeaseHandle,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let (reply_tx, mut replies) = mpsc::channel(MAX_PEERS);
    let mut askers = net::Askers::new(ep, clock.clone(), reply_tx);
    let mut core = Witness::new();
    let mut views = lease.watch_views();
    let mut told: Option<Instant> = None;
    let mut round: Option<RoundLog> = None;
    let mut log = WarnLimit::new(LOG_EVERY);
    let mut last_outcome: Option<&'static str> = None;
    loop {
        let now = clock.now();
        let view = views.borrow_and_update().rounds;
        core.set_lease(view);
        if let Some(r) = core.poll(now) {
            askers.ask(r.id, now, &r.peers);
            round = Some(RoundLog {
                id: r.id,
                started: now,
                asked: r.peers.len(),
                lost: Default::default(),
            });
        }
        let confirmed = core.confirmed_until(now);
        if confirmed != told {
            lease.set_confirmation(confirmed);
            told = confirmed;
        }
        if let Some(r) = round.as_ref().filter(|r| now >= r.started + ROUND_TIMEOUT) {
            if lost_server(view, now) {
                let outcome = match (confirmed, lease.isolation()) {
                    (Some(_), _) => msg::KEEPING,
                    (None, IsolationResponse::KeepRunning) => msg::UNCONFIRMED,
                    (None, IsolationResponse::SelfFence) => msg::FENCING,
                };
                let changed = last_outcome != Some(outcome);
                if changed || log.allow(now).is_some() {
                    let quorum = core.terms().map_or(0, |t| t.quorum);
                    let lost = r.lost.len();
                    let asked = r.asked;
                    let until_ms = confirmed.map(|u| clock.unix_ms() + ms(u.saturating_duration_since(now)));
                    if confirmed.is_some() {
                        tracing::warn!(
                            at_ms = clock.unix_ms(),
                            lost,
                            asked,
                            quorum,
                            until_ms,
                            "{}: {lost} of {asked} peers lost it too",
                            outcome
                        );
                    } else {
                        tracing::warn!(
                            at_ms = clock.unix_ms(),
                            lost,
                            asked,
                            quorum,
                            "{}: {lost} of {asked} peers lost it too (need {quorum})",
                            outcome
                        );
                    }
                }
                last_outcome = Some(outcome);
            } else {
                last_outcome = None;
            }
            round = None;
        }
        let wake = [
            core.next_timer(now),
            round.as_ref().map(|r| r.started + ROUND_TIMEOUT),
            told,
        ]
        .into_iter()
        .flatten()
        .min();
        let timer = async {
            match wake {
                // Never a busy loop on a timer already due.
                Some(t) => {
                    tokio::time::sleep(t.saturating_duration_since(now).max(Duration::from_millis(1))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(reply) = replies.recv() => {
                let at = clock.now();
                if core.answer(at, reply.round, reply.from, reply.contact) {
                    tracing::debug!(round = reply.round, "witness: round confirmed");
                }
                if let (Some(r), Contact::Lost { .. }) = (round.as_mut(), reply.contact) {
                    if r.id == reply.round && at <= r.started + ROUND_TIMEOUT {
                        r.lost.insert(reply.from);
                    }
                }
            }
            r = terms.changed() => {
                if r.is_err() {
                    return;
                }
                let t = terms.borrow_and_update().clone();
                askers.set_peers(t.as_ref().map_or(&[][..], |t| &t.peers));
                tracing::info!(peers = t.as_ref().map_or(0, |t| t.peers.len()), quorum = t.as_ref().map(|t| t.quorum), "witness terms applied");
                core.set_terms(t);
                round = None;
            }
            r = views.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = timer => {}
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// Whether the lease is gone at `now` (lost, or a lease whose end passed).
fn lost_server(view: LeaseView, now: Instant) -> bool {
    match view {
        LeaseView::Idle => false,
        LeaseView::Leased { until } => now >= until,
        LeaseView::Lost { .. } => true,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::pki::{self, FleetCa, Validity};
    use novacron_shared::protocol::WitnessPeer;

    fn identity(host: HostId) -> Identity {
        let wall = Clock::system().wall();
        let ttl = Duration::from_secs(600);
        let (ca, _) = FleetCa::generate("t", wall, ttl).unwrap();
        let (key, csr) = pki::make_csr("h").unwrap();
        let cert = ca
            .sign_host_csr(&csr, host, Validity::for_ttl(wall, ttl))
            .unwrap();
        Identity::new(cert.to_vec(), key.serialize_pem(), ca.cert_der().to_vec()).unwrap()
    }

    fn peer(n: u128, port: u16) -> WitnessPeer {
        WitnessPeer {
            host: HostId(n),
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
        }
    }

    #[tokio::test]
    async fn terms_drop_this_host_and_duplicates_and_refuse_too_many_peers() {
        let me = HostId(1);
        let w = start(&identity(me), ([127, 0, 0, 1], 0).into(), None).unwrap();
        let h = &w.handle;
        h.set_terms(WitnessTerms {
            peers: vec![peer(1, 1), peer(2, 2), peer(2, 3), peer(3, 4)],
            quorum: 2,
        })
        .unwrap();
        let got = w.terms.borrow().clone().unwrap();
        assert_eq!(got.peers, vec![peer(2, 2), peer(3, 4)]);
        assert_eq!(got.quorum, 2);
        let many = WitnessTerms {
            peers: (0..=MAX_PEERS as u128).map(|n| peer(n + 10, 1)).collect(),
            quorum: 2,
        };
        assert!(matches!(h.set_terms(many), Err(WitnessError::TermsRefused(_))));
        assert_eq!(w.terms.borrow().clone().unwrap(), got, "the old terms stay");
    }

    #[tokio::test]
    async fn the_advertised_address_is_the_configured_one_else_the_ip_towards_the_server() {
        let w = start(&identity(HostId(1)), ([127, 0, 0, 1], 0).into(), None).unwrap();
        let port = w.endpoint.local_addr().unwrap().port();
        let ip: IpAddr = [192, 168, 1, 9].into();
        assert_eq!(w.handle.advertised(Some(ip)), Some(SocketAddr::new(ip, port)));
        assert_eq!(w.handle.advertised(None), None);
        let fixed: SocketAddr = "10.9.9.9:7444".parse().unwrap();
        let w = start(&identity(HostId(1)), ([127, 0, 0, 1], 0).into(), Some(fixed)).unwrap();
        assert_eq!(w.handle.advertised(Some(ip)), Some(fixed));
        assert_eq!(
            crate::link::local_ip_towards(([127, 0, 0, 1], 7443).into()),
            Some([127, 0, 0, 1].into())
        );
    }
}
