//! The agent's link to the server: enrollment over a CA-pinned connection,
//! then a mutual-TLS session with hello, heartbeats, inventory, commands and
//! certificate renewal, reconnecting with capped exponential backoff.
//!
//! HA: the session feeds the lease ([`LinkConfig::lease`]): a session
//! start when the welcome arrives (which also forgets the desired state),
//! every heartbeat as it is sent (stamped before the frame is written; the
//! heartbeat reports the lease left at that instant), every ack, the lease
//! terms, and the HA VMs of each desired state. It feeds the peer witness
//! ([`LinkConfig::witness`]) its terms and renewed certificates, and
//! reports where it listens in every inventory it sends.
//!
//! Time comes from the [`Clock`] in [`LinkConfig`]: the wall clock decides
//! when the certificate is due for renewal, and [`Reconnect`] (pure, `now`
//! in) when the next connection attempt is; the waits themselves are tokio
//! timers, which follow tokio's paused time in tests. The reconnect policy,
//! the QUIC timeouts and the wait between attempts live in `reconnect`;
//! this file keeps join, the session and the loop around it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use novacron_shared::clock::Clock;
use novacron_shared::framing::{self, FrameError, FramedRecv, MAX_FRAME_LEN};
use novacron_shared::notify::Beat;
use novacron_shared::pki;
use novacron_shared::protocol::{
    AgentMessage, DesiredState, ErrorCode, Heartbeat, Hello, JoinReply, JoinRequest, RenewRequest,
    ServerMessage, WireError, HANDSHAKE_VERSION, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use tokio::sync::{mpsc, watch};

use crate::converge::{self, OpCache};
use crate::ha::LeaseHandle;
use crate::hypervisor::Hypervisor;
use crate::identity::{Identity, IdentityError, Paths};
use crate::lease::Event as LeaseEvent;

mod reconnect;
pub use reconnect::{session_idle_timeout, urgency, Reconnect, LOOP_GAP, RECONNECT_BASE, RECONNECT_MAX};
use reconnect::{IDLE_TIMEOUT, OPEN_TIMEOUT};

/// The link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The server address did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    /// The local UDP endpoint could not be made.
    #[error("cannot open a UDP socket")]
    Endpoint(#[source] std::io::Error),
    /// Building the TLS configuration failed.
    #[error("TLS setup failed")]
    Tls(#[from] novacron_shared::tls::TlsError),
    /// The identity is unusable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Starting the connection failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectError,
    },
    /// The connection failed or was closed.
    #[error("connection to the server failed: {0}")]
    Connection(#[source] quinn::ConnectionError),
    /// The server refused us, with its code and message.
    #[error("the server refused: {0}")]
    Refused(WireError),
    /// A frame could not be read or written.
    #[error("protocol framing failed")]
    Frame(#[from] FrameError),
    /// The server broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server did not answer in time.
    #[error("the server did not answer within {0:?}")]
    Timeout(Duration),
    /// Making a key or CSR failed.
    #[error("key generation failed")]
    Pki(#[from] pki::PkiError),
}

impl LinkError {
    /// Whether retrying cannot help until an operator acts.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            LinkError::Refused(WireError {
                code: ErrorCode::Revoked | ErrorCode::UnsupportedVersion | ErrorCode::Unauthenticated,
                ..
            })
        )
    }
}

/// Settings for the link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `host:port` of the server.
    pub server: String,
    /// The name the server certificate must carry.
    pub server_name: String,
    /// The host name to report.
    pub hostname: String,
    /// Protocol versions offered (oldest, newest).
    pub versions: (u16, u16),
    /// The metrics spool to stream, when metrics are on.
    pub metrics: Option<Arc<crate::metrics::MetricsShared>>,
    /// Where the link reads the time.
    pub clock: Clock,
    /// The HA lease the session feeds (sessions, heartbeats, acks, terms,
    /// the HA VMs of each desired state); `None`: no HA (tools, tests).
    pub lease: Option<LeaseHandle>,
    /// The peer witness (its terms, its address in the inventory, renewed
    /// certificates); `None`: none runs.
    pub witness: Option<crate::witness::WitnessHandle>,
    /// The link's watchdog heartbeat (beats at every reconnect attempt and
    /// every heartbeat tick of a session); `None`: unwatched.
    pub beat: Option<Arc<Beat>>,
    /// Notified once the first attempt is over: linked (welcome received)
    /// or retrying. The agent tells systemd it is ready then.
    pub settled: Option<Arc<tokio::sync::Notify>>,
}

impl LinkConfig {
    /// A config offering this build's protocol versions.
    pub fn new(server: String, server_name: String, hostname: String) -> Self {
        Self {
            server,
            server_name,
            hostname,
            versions: (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
            metrics: None,
            clock: Clock::system(),
            lease: None,
            witness: None,
            beat: None,
            settled: None,
        }
    }

    async fn beat(&self) {
        if let Some(b) = &self.beat {
            b.beat().await;
        }
    }

    fn settled(&self) {
        if let Some(n) = &self.settled {
            n.notify_one();
        }
    }
}

async fn resolve(server: &str) -> Result<SocketAddr, LinkError> {
    let mut addrs = tokio::net::lookup_host(server)
        .await
        .map_err(|e| LinkError::Resolve(server.to_string(), e))?;
    addrs
        .next()
        .ok_or_else(|| LinkError::Resolve(server.to_string(), std::io::Error::other("no addresses")))
}

fn client_endpoint(server: SocketAddr) -> Result<quinn::Endpoint, LinkError> {
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| LinkError::Protocol("bad bind address".into()))?
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    };
    quinn::Endpoint::client(bind).map_err(LinkError::Endpoint)
}

/// Connects to `addr`, giving up after `open_timeout`.
async fn connect(
    endpoint: &quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    open_timeout: Duration,
) -> Result<quinn::Connection, LinkError> {
    let connecting = endpoint
        .connect_with(client_cfg, addr, server_name)
        .map_err(|source| LinkError::Connect { addr, source })?;
    tokio::time::timeout(open_timeout, connecting)
        .await
        .map_err(|_| LinkError::Timeout(open_timeout))?
        .map_err(LinkError::Connection)
}

/// The local IP this host reaches `peer` from (the route's source
/// address; no packet is sent). quinn knows it only for connections it
/// accepted, not for those it made.
pub fn local_ip_towards(peer: SocketAddr) -> Option<std::net::IpAddr> {
    let bind: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Turns a closed connection into the clearest error we can give.
fn closed_error(conn: &quinn::Connection, fallback: LinkError) -> LinkError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(ac)) => {
            match ErrorCode::from_close_code(ac.error_code.into_inner()) {
                Some(code) => LinkError::Refused(WireError {
                    code,
                    message: String::from_utf8_lossy(&ac.reason).into_owned(),
                }),
                None => LinkError::Connection(quinn::ConnectionError::ApplicationClosed(ac)),
            }
        }
        Some(e) => LinkError::Connection(e),
        None => fallback,
    }
}

/// Enrolls this host: makes a key, sends a CSR with the token over a
/// connection that pins the CA fingerprint, and returns the identity.
pub async fn join(
    cfg: &LinkConfig,
    token: &str,
    ca_fingerprint: &str,
    agent_version: &str,
) -> Result<Identity, LinkError> {
    let fp = pki::parse_fingerprint(ca_fingerprint)?;
    let addr = resolve(&cfg.server).await?;
    let endpoint = client_endpoint(addr)?;
    let client_cfg = novacron_shared::tls::client_config_pinned(&fp, IDLE_TIMEOUT)?;
    let (key, csr_der) = pki::make_csr(&cfg.hostname)?;
    let conn = connect(&endpoint, client_cfg, addr, &cfg.server_name, OPEN_TIMEOUT).await?;
    let result = async {
        let (mut send, recv) = conn.open_bi().await.map_err(LinkError::Connection)?;
        let mut recv = FramedRecv::new(recv, MAX_FRAME_LEN);
        let req = AgentMessage::Join(JoinRequest {
            min_version: cfg.versions.0,
            max_version: cfg.versions.1,
            token: token.trim().to_string(),
            csr_der,
            hostname: cfg.hostname.clone(),
            agent_version: agent_version.to_string(),
        });
        let mut buf = Vec::new();
        framing::write_frame(&mut send, HANDSHAKE_VERSION, &req, &mut buf).await?;
        let _ = send.finish();
        let reply = tokio::time::timeout(OPEN_TIMEOUT, recv.next::<ServerMessage>())
            .await
            .map_err(|_| LinkError::Timeout(OPEN_TIMEOUT))?;
        match reply {
            Ok(Some((
                _,
                ServerMessage::Joined(JoinReply {
                    host_id,
                    cert_der,
                    ca_der,
                }),
            ))) => {
                if pki::fingerprint(&ca_der) != fp {
                    return Err(LinkError::Protocol(
                        "the server sent a CA that does not match the pinned fingerprint".into(),
                    ));
                }
                let id = Identity::new(cert_der, key.serialize_pem(), ca_der)?;
                if id.host_id != host_id {
                    return Err(LinkError::Protocol(
                        "the certificate does not name the assigned host id".into(),
                    ));
                }
                Ok(id)
            }
            Ok(Some((_, ServerMessage::Error(e)))) => Err(LinkError::Refused(e)),
            Ok(Some((_, other))) => Err(LinkError::Protocol(format!(
                "unexpected reply to join: {other:?}"
            ))),
            Ok(None) => Err(closed_error(
                &conn,
                LinkError::Protocol("the server closed the stream without a reply".into()),
            )),
            Err(e) => Err(closed_error(&conn, e.into())),
        }
    }
    .await;
    conn.close(0u32.into(), b"joined");
    endpoint.wait_idle().await;
    result
}

/// How the link and the VM loop talk.
#[derive(Debug)]
pub struct VmChannels {
    /// Messages for the server (events, inventories, reports, results),
    /// sent whenever a session is up.
    pub outbox: mpsc::Receiver<AgentMessage>,
    /// A sender into `outbox`, for command results.
    pub outbox_tx: mpsc::Sender<AgentMessage>,
    /// Where desired states from the server go.
    pub desired: watch::Sender<Option<DesiredState>>,
    /// Outcomes of recent commands, by op id.
    pub ops: Arc<std::sync::Mutex<OpCache>>,
}

impl VmChannels {
    /// Channels with a queue of `capacity` messages; returns the receiving
    /// ends the VM loop needs.
    pub fn new(capacity: usize) -> (Self, watch::Receiver<Option<DesiredState>>) {
        let (outbox_tx, outbox) = mpsc::channel(capacity);
        let (desired, desired_rx) = watch::channel(None);
        (
            Self {
                outbox,
                outbox_tx,
                desired,
                ops: Arc::default(),
            },
            desired_rx,
        )
    }
}

/// Runs the link forever: connect, serve the session, back off, reconnect.
/// Returns only when `shutdown` turns true.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: LinkConfig,
    mut identity: Identity,
    paths: Paths,
    hv: Hypervisor,
    mut vm: VmChannels,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reconnect = Reconnect::default();
    let mut endpoint: Option<quinn::Endpoint> = None;
    loop {
        cfg.beat().await;
        let attempt = session(
            &cfg,
            &mut identity,
            &paths,
            &hv,
            &mut vm,
            &mut endpoint,
            &mut reconnect,
            &mut shutdown,
        )
        .await;
        if *shutdown.borrow() {
            if let Some(ep) = endpoint.take() {
                ep.close(0u32.into(), b"agent shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
            }
            return;
        }
        let delay = reconnect::retry_delay(
            &mut reconnect,
            cfg.lease.as_ref(),
            cfg.clock.now(),
            rand::random::<f64>(),
        );
        // Linked and lost, or never linked: retrying either way.
        cfg.settled();
        match attempt {
            Ok(()) => tracing::warn!(retry_in = ?delay, "session ended; reconnecting"),
            Err(e) if e.needs_operator() => {
                tracing::error!(error = %e, retry_in = ?delay, "the server refused this agent; an operator must act (retrying anyway)")
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), retry_in = ?delay, "link down; reconnecting"),
        }
        reconnect::wait(delay, cfg.beat.as_deref(), &mut shutdown).await;
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &LinkConfig,
    identity: &mut Identity,
    paths: &Paths,
    hv: &Hypervisor,
    vm: &mut VmChannels,
    endpoint: &mut Option<quinn::Endpoint>,
    reconnect: &mut Reconnect,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let addr = resolve(&cfg.server).await?;
    let ep = match endpoint {
        Some(ep) => ep.clone(),
        None => {
            let ep = client_endpoint(addr)?;
            *endpoint = Some(ep.clone());
            ep
        }
    };
    // With HA VMs at stake the connection is given up at half the lease of
    // silence: a server restarted (kill -9) cannot reset the old
    // connection, and waiting the full idle timeout would outlast the lease.
    let idle = cfg
        .lease
        .as_ref()
        .filter(|l| l.has_ha_vms())
        .map_or(IDLE_TIMEOUT, |l| session_idle_timeout(l.timing().lease));
    let client_cfg = identity.client_config(idle)?;
    let open_timeout = cfg
        .lease
        .as_ref()
        .filter(|l| l.has_ha_vms())
        .and_then(|l| urgency(l.state(), l.timing().lease))
        .map_or(OPEN_TIMEOUT, |(_, open)| open);
    let conn = connect(&ep, client_cfg, addr, &cfg.server_name, open_timeout).await?;
    let r = serve(cfg, &conn, identity, paths, hv, vm, reconnect, shutdown).await;
    if *shutdown.borrow() {
        conn.close(0u32.into(), b"agent shutting down");
    }
    r.map_err(|e| match e {
        LinkError::Frame(_) | LinkError::Connection(_) => closed_error(&conn, e),
        other => other,
    })
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &LinkConfig,
    conn: &quinn::Connection,
    identity: &mut Identity,
    paths: &Paths,
    hv: &Hypervisor,
    vm: &mut VmChannels,
    reconnect: &mut Reconnect,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let (mut send, recv) = conn.open_bi().await.map_err(LinkError::Connection)?;
    let mut recv = FramedRecv::new(recv, MAX_FRAME_LEN);
    let mut buf = Vec::new();
    let hello = AgentMessage::Hello(Hello {
        min_version: cfg.versions.0,
        max_version: cfg.versions.1,
        agent_version: crate::VERSION.to_string(),
        hostname: cfg.hostname.clone(),
    });
    framing::write_frame(&mut send, HANDSHAKE_VERSION, &hello, &mut buf).await?;
    let first = tokio::time::timeout(OPEN_TIMEOUT, recv.next::<ServerMessage>())
        .await
        .map_err(|_| LinkError::Timeout(OPEN_TIMEOUT))??;
    let welcome = match first {
        Some((_, ServerMessage::Welcome(w))) => w,
        Some((_, ServerMessage::Error(e))) => return Err(LinkError::Refused(e)),
        Some((_, other)) => return Err(LinkError::Protocol(format!("expected a welcome, got {other:?}"))),
        None => {
            return Err(closed_error(
                conn,
                LinkError::Protocol("the server closed the stream before the welcome".into()),
            ))
        }
    };
    if welcome.host_id != identity.host_id {
        return Err(LinkError::Protocol(format!(
            "the server took us for host {}, we are {}",
            welcome.host_id, identity.host_id
        )));
    }
    let version = welcome.version;
    reconnect.connected();
    tracing::info!(host_id = %identity.host_id, version, "connected to the server");
    // A new session: heartbeat numbers start again at 1, and HA VMs are
    // only ever started under this session's desired state (the server
    // sends it before its first ack), so the last one is forgotten.
    if let Some(l) = &cfg.lease {
        l.step(LeaseEvent::SessionStarted);
    }
    vm.desired.send_replace(None);

    // Where peers reach this agent's witness, in every inventory sent.
    let witness_addr = cfg
        .witness
        .as_ref()
        .and_then(|w| w.advertised(local_ip_towards(conn.remote_address())));
    if cfg.witness.is_some() && witness_addr.is_none() {
        tracing::warn!("the witness address is unknown (no local IP towards the server; set witness.advertise): peers cannot ask this host");
    }
    let mut witness_warn = crate::ha::WarnLimit::new(crate::ha::WARN_EVERY);
    // Whatever queued while disconnected is stale: the fresh inventory
    // below (and the server's desired state) supersede it.
    while vm.outbox.try_recv().is_ok() {}
    match hv.inventory().await {
        Ok(mut inv) => {
            inv.witness = witness_addr;
            framing::write_frame(&mut send, version, &AgentMessage::Inventory(inv), &mut buf).await?
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the inventory; the server will see it on the next change")
        }
    }

    // Metrics ride on a stream of their own; the task ends with the session.
    let _metrics = cfg.metrics.clone().map(|m| {
        let conn = conn.clone();
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = crate::metrics::send(m, conn, version).await {
                tracing::debug!(error = %e, "metric stream ended");
            }
        }))
    });
    // Linked: the agent is serving.
    cfg.settled();
    let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut pending_key: Option<rcgen_key::Key> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    let _ = send.finish();
                    return Ok(());
                }
            }
            Some(mut msg) = vm.outbox.recv() => {
                if let AgentMessage::Inventory(inv) = &mut msg {
                    inv.witness = witness_addr;
                }
                framing::write_frame(&mut send, version, &msg, &mut buf).await?;
            }
            _ = ticker.tick() => {
                cfg.beat().await;
                seq += 1;
                // Stamped before the frame leaves: the lease counts from
                // no later than the server can have received it.
                // It reports the lease left at that same instant.
                let lease_left_ms = cfg.lease.as_ref().and_then(|l| l.heartbeat_sent(seq));
                framing::write_frame(&mut send, version, &AgentMessage::Heartbeat(Heartbeat { seq, lease_left_ms }), &mut buf).await?;
                if pending_key.is_none() && cfg.clock.wall() >= identity.validity.renew_at() {
                    let (key, csr_der) = pki::make_csr(&cfg.hostname)?;
                    tracing::info!(host_id = %identity.host_id, "certificate due for renewal; sending a CSR");
                    framing::write_frame(&mut send, version, &AgentMessage::RenewCertificate(RenewRequest { csr_der }), &mut buf).await?;
                    pending_key = Some(rcgen_key::Key(key.serialize_pem()));
                }
            }
            frame = recv.next::<ServerMessage>() => {
                let Some((v, msg)) = frame? else {
                    return Err(closed_error(conn, LinkError::Protocol("the server ended the control stream".into())));
                };
                if v != version {
                    return Err(LinkError::Protocol(format!("frame version {v}, session negotiated {version}")));
                }
                match msg {
                    ServerMessage::HeartbeatAck(a) => {
                        // The lease: renewed from when heartbeat `a.seq` was sent.
                        if let Some(l) = &cfg.lease {
                            l.step(LeaseEvent::AckReceived { seq: a.seq });
                        }
                    }
                    ServerMessage::Command(cmd) => {
                        // Off the session loop: heartbeats keep flowing while
                        // a long operation runs.
                        converge::spawn_command(hv.clone(), vm.ops.clone(), cmd.op_id, cmd.kind, vm.outbox_tx.clone());
                    }
                    ServerMessage::DesiredState(ds) => {
                        tracing::info!(generation = ds.generation, vms = ds.vms.len(), departed = ds.departed.len(), "desired state from the server");
                        if let Some(l) = &cfg.lease {
                            l.set_ha_vms(ds.vms.iter().filter(|v| v.spec.ha).map(|v| v.id));
                        }
                        vm.desired.send_replace(Some(ds));
                    }
                    ServerMessage::Witness(w) => {
                        let (peers, quorum) = (w.peers.len(), w.quorum);
                        match &cfg.witness {
                            Some(h) => {
                                if let Err(e) = h.set_terms(w) {
                                    if let Some(held) = witness_warn.allow(cfg.clock.now()) {
                                        tracing::warn!(error = %e, suppressed = held, "the server's witness terms are refused; the old ones stay");
                                    }
                                }
                            }
                            None => tracing::debug!(peers, quorum, "witness terms from the server; no witness runs here"),
                        }
                    }
                    ServerMessage::CertificateRenewed(r) => {
                        let Some(key) = pending_key.take() else {
                            tracing::warn!("unrequested certificate from the server; ignored");
                            continue;
                        };
                        let next = identity.renewed(r.cert_der, key.0)?;
                        next.save(paths)?;
                        tracing::info!(host_id = %next.host_id, not_after = ?next.validity.not_after, "certificate renewed and saved");
                        if let Some(w) = &cfg.witness {
                            if let Err(e) = w.renewed(&next) {
                                tracing::warn!(error = %error_chain(&e), "the witness keeps presenting the old certificate");
                            }
                        }
                        *identity = next;
                    }
                    ServerMessage::Error(e) => {
                        if e.code == ErrorCode::BadCsr {
                            pending_key = None;
                        }
                        tracing::warn!(code = %e.code, message = %e.message, "the server reported an error");
                    }
                    ServerMessage::MetricsAck(a) => {
                        if let Some(m) = &cfg.metrics {
                            m.ack(a.epoch, a.upto_seq);
                        }
                    }
                    ServerMessage::LeaseTerms(t) => {
                        // Applied and saved at once; refusals and failures
                        // are logged (rate-limited) by the lease handle.
                        if let Some(l) = &cfg.lease {
                            let _ = l.apply_terms(&t);
                        }
                    }
                    ServerMessage::Welcome(_) | ServerMessage::Joined(_) => {
                        tracing::debug!("ignoring a message that does not apply here");
                    }
                }
            }
        }
    }
}

/// Aborts a task when dropped (the session's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The PEM of a key made for a pending renewal.
mod rcgen_key {
    /// Private key, PKCS#8 PEM.
    pub struct Key(pub String);
}
