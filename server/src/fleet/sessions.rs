//! Agent sessions over QUIC: accept, mutual-TLS sessions, the session
//! protocol (heartbeats, inventories, reconcile reports, VM events, command
//! results and progress), certificate renewal and revocation, and one-off
//! commands awaited by op id. Enrollment is in [`join`], the batched host
//! status writer in [`status`], one-off commands in [`commands`], and the
//! API's host views in `views`. What stays here is one job, the life of a
//! connection from accept to close; its message handling reads as one
//! `match` in `session_loop` on purpose, next to the state it changes.
//!
//! One task per connection owns that connection's control stream. The
//! session table maps host ids to the live connection so that a newer
//! connection replaces an older one and a revocation closes it at once.
//! Liveness is counted on the monotonic clock from the last frame
//! ([`Liveness`]). After the welcome a session gets the HA lease terms,
//! then its desired state; every frame is recorded in the HA part's lease
//! view, which decides whether a heartbeat is acknowledged
//! (`Fleet::ha_heard`).
//!
//! Owns: the session table, the revocation cache, the join and host status
//! queues. Must not touch: VM placement (the [`super::vms`] part) or
//! operations; it reads the store only for hosts and desired state.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use novacron_shared::clock::Clock;
use novacron_shared::framing::{self, FrameError, MAX_FRAME_LEN};
use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::pki::{CertInfo, Validity};
use novacron_shared::protocol::{
    self, AgentMessage, ErrorCode, HeartbeatAck, Inventory, ReconcileReport, RenewReply, ServerMessage,
    VmEvent, VmState, Welcome, WireError, HANDSHAKE_VERSION, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use novacron_shared::tls::peer_leaf;
use tokio::sync::{mpsc, watch};

use super::{desired_message, lock, Fleet, HostView, Liveness};
use crate::ratelimit::LogLimiter;
use crate::store::{HostRecord, HostState, Store, StoreError};
use crate::warn_limited;

pub mod commands;
pub mod join;
pub mod status;
mod views;

use commands::Pending;

use status::HostEvent;

/// Revoking a host failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// No such host.
    #[error("no host with id {0}")]
    UnknownHost(HostId),
    /// The store failed.
    #[error("could not record the revocation")]
    Store(#[from] StoreError),
}

/// The session part's state.
pub(super) struct Sessions {
    table: Mutex<HashMap<HostId, Arc<LiveSession>>>,
    revoked_serials: RwLock<HashSet<String>>,
    revoked_hosts: RwLock<HashSet<HostId>>,
    next_conn: AtomicU64,
    events: mpsc::UnboundedSender<HostEvent>,
    joins: mpsc::Sender<join::JoinJob>,
    limiter: LogLimiter,
    /// Bumped on every reconcile report, so waiters need not poll.
    reports: watch::Sender<u64>,
}

impl Sessions {
    /// Loads the revocation cache and starts the join and host status writers.
    pub(super) fn start(store: &Store, clock: &Clock) -> Result<Self, StoreError> {
        let mut serials = HashSet::new();
        let mut hosts = HashSet::new();
        for (serial, rec) in store.revoked_serials()? {
            serials.insert(serial);
            hosts.insert(rec.host_id);
        }
        let (events, rx) = mpsc::unbounded_channel();
        tokio::spawn(status::host_writer(store.clone(), rx));
        let (joins, join_rx) = mpsc::channel(join::JOIN_QUEUE);
        tokio::spawn(join::join_writer(store.clone(), join_rx, clock.clone()));
        Ok(Self {
            table: Mutex::new(HashMap::new()),
            revoked_serials: RwLock::new(serials),
            revoked_hosts: RwLock::new(hosts),
            next_conn: AtomicU64::new(1),
            events,
            joins,
            limiter: LogLimiter::with_clock(20, Duration::from_secs(60), clock.clone()),
            reports: watch::channel(0).0,
        })
    }
}

impl LiveSession {
    /// The latest inventory's state of `vm` (None: not there, or no inventory).
    pub fn vm_state(&self, vm: VmId) -> Option<VmState> {
        let uuid = vm.to_string();
        lock(&self.inventory)
            .as_ref()
            .and_then(|i| i.vms.iter().find(|o| o.uuid == uuid).map(|o| o.state))
    }

    /// What the latest inventory reports of `vm` (one entry copied, not
    /// the inventory).
    pub fn observed(&self, vm: VmId) -> Option<novacron_shared::protocol::VmObserved> {
        let uuid = vm.to_string();
        lock(&self.inventory)
            .as_ref()
            .and_then(|i| i.vms.iter().find(|o| o.uuid == uuid).cloned())
    }

    /// The latest inventory's capacity and host labels.
    pub fn capacity_labels(
        &self,
    ) -> Option<(
        novacron_shared::protocol::Capacity,
        std::collections::BTreeMap<String, String>,
    )> {
        lock(&self.inventory)
            .as_ref()
            .map(|i| (i.capacity, i.labels.clone()))
    }

    /// The latest inventory.
    pub fn inventory(&self) -> Option<Inventory> {
        lock(&self.inventory).clone()
    }

    /// The shared storage the latest inventory reports.
    pub fn shared_storage(&self) -> Option<String> {
        lock(&self.inventory)
            .as_ref()
            .and_then(|i| i.shared_storage.clone())
    }

    /// The disk lock space the latest inventory reports.
    pub fn disk_locks(&self) -> Option<String> {
        lock(&self.inventory).as_ref().and_then(|i| i.disk_locks.clone())
    }

    /// Whether the agent is reconciled to `generation`: its latest
    /// reconcile report answers it and is converged, and its latest
    /// inventory holds none of the `departed` VMs.
    pub fn reconciled(&self, generation: u64, departed: &[novacron_shared::protocol::Departed]) -> bool {
        let converged = lock(&self.report)
            .as_ref()
            .is_some_and(|r| r.generation == generation && r.converged);
        converged
            && lock(&self.inventory).as_ref().is_some_and(|i| {
                departed
                    .iter()
                    .all(|d| !i.vms.iter().any(|o| o.uuid == d.vm.to_string()))
            })
    }

    /// The migration URI of the latest inventory.
    pub fn migration_uri(&self) -> Option<String> {
        lock(&self.inventory)
            .as_ref()
            .and_then(|i| i.migration_uri.clone())
    }

    /// The latest reconcile report.
    pub fn report(&self) -> Option<ReconcileReport> {
        lock(&self.report).clone()
    }

    /// The generation of the latest reconcile report.
    pub fn reported_generation(&self) -> Option<u64> {
        lock(&self.report).as_ref().map(|r| r.generation)
    }

    /// Recent VM events, oldest first.
    pub fn vm_events(&self) -> Vec<VmEvent> {
        lock(&self.vm_events).iter().cloned().collect()
    }

    /// The session's liveness.
    pub fn liveness(&self) -> Liveness {
        *lock(&self.liveness)
    }
}

/// Time allowed for a handshake or for the first frame of a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a live session's last-seen time is persisted.
const PERSIST_SEEN_EVERY: Duration = Duration::from_secs(15);

/// A live session, as the API sees it.
#[derive(Debug)]
pub struct LiveSession {
    conn: quinn::Connection,
    conn_id: u64,
    outbox: mpsc::Sender<ServerMessage>,
    last_seen_ms: AtomicU64,
    liveness: Mutex<Liveness>,
    version: u16,
    inventory: Mutex<Option<Inventory>>,
    report: Mutex<Option<ReconcileReport>>,
    vm_events: Mutex<VecDeque<VmEvent>>,
    pending: Mutex<HashMap<OpId, Pending>>,
}

/// Longest shared storage identity kept from an inventory (a pool path).
const MAX_STORAGE_ID: usize = 1024;

/// VM events kept per session for the API.
const KEEP_VM_EVENTS: usize = 200;
impl Fleet {
    /// The live session of `host`, if it has one.
    pub fn live(&self, host: HostId) -> Option<Arc<LiveSession>> {
        self.lock_sessions().get(&host).cloned()
    }

    /// Every live session.
    pub(super) fn live_sessions(&self) -> HashMap<HostId, Arc<LiveSession>> {
        self.lock_sessions().clone()
    }

    /// A receiver that changes whenever any agent sends a reconcile report.
    pub(super) fn report_changes(&self) -> watch::Receiver<u64> {
        self.sessions.reports.subscribe()
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.lock_sessions().len()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, Arc<LiveSession>>> {
        lock(&self.sessions.table)
    }

    /// Revokes a host: its certificates are refused from now on and its
    /// live session is closed.
    pub fn revoke(&self, id: HostId) -> Result<HostRecord, RevokeError> {
        let rec = self
            .store
            .revoke_host(id, self.clock.unix_ms())?
            .ok_or(RevokeError::UnknownHost(id))?;
        self.sessions
            .revoked_serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.cert_serial.clone());
        self.sessions
            .revoked_hosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        if let Some(s) = self.lock_sessions().remove(&id) {
            close(&s.conn, ErrorCode::Revoked, "this host's certificate was revoked");
        }
        self.ha_forget(id);
        tracing::info!(host_id = %id, serial = %rec.cert_serial, "host revoked");
        Ok(rec)
    }

    fn is_revoked(&self, serial: &str, id: HostId) -> bool {
        self.sessions
            .revoked_serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
            || self
                .sessions
                .revoked_hosts
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
    }

    pub(super) async fn handle_incoming(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(OPEN_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn_limited!(self.sessions.limiter, %remote, error = %e, "agent handshake failed");
                return;
            }
            Err(_) => {
                warn_limited!(self.sessions.limiter, %remote, "agent handshake timed out");
                return;
            }
        };
        match peer_leaf(&conn) {
            None => self.handle_join(conn).await,
            Some(leaf) => self.handle_agent(conn, &leaf).await,
        }
    }

    fn refuse_conn(&self, conn: &quinn::Connection, code: ErrorCode, message: &str) {
        warn_limited!(self.sessions.limiter, remote = %conn.remote_address(), %code, message, "agent refused");
        close(conn, code, message);
    }

    /// Sends an error frame, waits briefly for the peer to read it, closes.
    async fn refuse(
        &self,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        version: u16,
        err: WireError,
    ) {
        let mut buf = Vec::new();
        let _ = framing::write_frame(send, version, &ServerMessage::Error(err.clone()), &mut buf).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        self.refuse_conn(conn, err.code, &err.message);
    }

    async fn handle_agent(self: Arc<Self>, conn: quinn::Connection, leaf: &[u8]) {
        let info = match CertInfo::parse(leaf).and_then(|i| i.host_id().map(|id| (id, i))) {
            Ok(x) => x,
            Err(e) => return self.refuse_conn(&conn, ErrorCode::Unauthenticated, &e.to_string()),
        };
        let (host_id, cert) = info;
        if self.is_revoked(&cert.serial, host_id) {
            return self.refuse_conn(
                &conn,
                ErrorCode::Revoked,
                "this host's certificate was revoked; re-join the host with a new token",
            );
        }
        match self.store.host(host_id) {
            Ok(Some(h)) if h.state != HostState::Revoked => {}
            Ok(Some(_)) => return self.refuse_conn(&conn, ErrorCode::Revoked, "this host was revoked"),
            Ok(None) => {
                return self.refuse_conn(
                    &conn,
                    ErrorCode::Unauthenticated,
                    "unknown host id; re-join the host",
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed");
                return close(&conn, ErrorCode::Internal, "server store failure");
            }
        }
        let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(OPEN_TIMEOUT, conn.accept_bi()).await else {
            return self.refuse_conn(&conn, ErrorCode::Timeout, "no control stream within 10s");
        };
        let mut buf = Vec::new();
        let first = tokio::time::timeout(
            OPEN_TIMEOUT,
            framing::read_frame::<AgentMessage>(&mut recv, MAX_FRAME_LEN, &mut buf),
        )
        .await;
        let hello = match first {
            Err(_) => return self.refuse_conn(&conn, ErrorCode::Timeout, "no hello within 10s"),
            Ok(Err(e)) => return self.refuse_conn(&conn, e.code(), &e.to_string()),
            Ok(Ok(None)) => return close(&conn, ErrorCode::UnexpectedMessage, "stream ended before hello"),
            Ok(Ok(Some((v, _)))) if v != HANDSHAKE_VERSION => {
                return self
                    .refuse(&conn, &mut send, HANDSHAKE_VERSION, version_error(v))
                    .await;
            }
            Ok(Ok(Some((_, AgentMessage::Hello(h))))) => h,
            Ok(Ok(Some(_))) => {
                let err = WireError {
                    code: ErrorCode::UnexpectedMessage,
                    message: "the first frame must be a hello".into(),
                };
                return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await;
            }
        };
        let version = match protocol::negotiate(
            (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
            hello.min_version,
            hello.max_version,
        ) {
            Ok(v) => v,
            Err(e) => {
                let err = WireError {
                    code: ErrorCode::UnsupportedVersion,
                    message: e.to_string(),
                };
                tracing::warn!(host_id = %host_id, error = %e, "agent speaks no common protocol version");
                return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await;
            }
        };
        let mut recv = framing::FramedRecv::new(recv, MAX_FRAME_LEN);
        let (outbox, mut outbox_rx) = mpsc::channel(64);
        let now_ms = self.clock.unix_ms();
        let session = Arc::new(LiveSession {
            conn: conn.clone(),
            conn_id: self.sessions.next_conn.fetch_add(1, Ordering::Relaxed),
            outbox,
            last_seen_ms: AtomicU64::new(now_ms),
            liveness: Mutex::new(Liveness::new(
                self.clock.now(),
                self.policy.session_timeout,
                PERSIST_SEEN_EVERY,
            )),
            version,
            inventory: Mutex::new(None),
            report: Mutex::new(None),
            vm_events: Mutex::new(VecDeque::new()),
            pending: Mutex::new(HashMap::new()),
        });
        if let Some(old) = self.lock_sessions().insert(host_id, session.clone()) {
            close(
                &old.conn,
                ErrorCode::Replaced,
                "replaced by a newer connection from the same host",
            );
        }
        // A revocation may have raced with the registration.
        if self.is_revoked(&cert.serial, host_id) {
            self.deregister(host_id, session.conn_id);
            return close(&conn, ErrorCode::Revoked, "this host's certificate was revoked");
        }
        let _ = self.sessions.events.send(HostEvent::Connected {
            id: host_id,
            name: clean_name(&hello.hostname),
            agent_version: clean_name(&hello.agent_version),
            address: conn.remote_address().to_string(),
            now_ms,
        });
        self.bus.host(
            host_id,
            format!(
                "host {} connected from {}",
                clean_name(&hello.hostname),
                conn.remote_address()
            ),
        );
        tracing::info!(host_id = %host_id, version, remote = %conn.remote_address(), "agent session open");
        let welcome = ServerMessage::Welcome(Welcome {
            version,
            host_id,
            heartbeat_interval_ms: u32::try_from(self.policy.heartbeat_interval.as_millis()).unwrap_or(1000),
        });
        let mut wbuf = Vec::new();
        self.ha_connected(host_id, self.clock.now());
        let mut greeting = framing::write_frame(&mut send, HANDSHAKE_VERSION, &welcome, &mut wbuf).await;
        if greeting.is_ok() {
            // The lease terms come before the desired state and before any
            // heartbeat ack (which is what grants the lease).
            let terms = ServerMessage::LeaseTerms(self.ha_config().terms());
            greeting = framing::write_frame(&mut send, version, &terms, &mut wbuf).await;
        }
        if greeting.is_ok() {
            // The witness terms right after the lease terms.
            if let Some(w) = self.witness_greeting(host_id) {
                greeting = framing::write_frame(&mut send, version, &w, &mut wbuf).await;
            }
        }
        if greeting.is_ok() {
            // The desired state goes next, so the agent can converge at once.
            match self.store.desired(host_id) {
                Ok(Some(d)) => {
                    let msg = desired_message(d);
                    greeting = framing::write_frame(&mut send, version, &msg, &mut wbuf).await;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(host_id = %host_id, error = %e, "cannot read the desired state"),
            }
        }
        let metric_streams = greeting.is_ok().then(|| {
            tokio::spawn(metric_streams(
                self.metrics.get().cloned(),
                conn.clone(),
                host_id,
                session.outbox.clone(),
            ))
        });
        let outcome = match greeting {
            Err(e) => Err((e.code(), e.to_string())),
            Ok(()) => {
                self.session_loop(host_id, &session, &mut send, &mut recv, &mut outbox_rx)
                    .await
            }
        };
        if let Some(t) = metric_streams {
            t.abort();
        }
        if let Err((code, message)) = outcome {
            if code != ErrorCode::Replaced && code != ErrorCode::Revoked {
                warn_limited!(self.sessions.limiter, host_id = %host_id, %code, message, "agent session closed with an error");
            }
            close(&conn, code, &message);
        }
        if self.deregister(host_id, session.conn_id) {
            self.ha_disconnected(host_id, self.clock.now());
            let _ = self.sessions.events.send(HostEvent::Disconnected {
                id: host_id,
                now_ms: self.clock.unix_ms(),
            });
            self.bus.host(host_id, "host disconnected".into());
            tracing::info!(host_id = %host_id, "agent session closed");
        }
    }

    fn deregister(&self, id: HostId, conn_id: u64) -> bool {
        let mut s = self.lock_sessions();
        if s.get(&id).is_some_and(|cur| cur.conn_id == conn_id) {
            s.remove(&id);
            true
        } else {
            false
        }
    }

    /// Runs an open session until it ends; `Err` carries the close code.
    async fn session_loop(
        &self,
        host_id: HostId,
        session: &LiveSession,
        send: &mut quinn::SendStream,
        recv: &mut framing::FramedRecv,
        outbox: &mut mpsc::Receiver<ServerMessage>,
    ) -> Result<(), (ErrorCode, String)> {
        let version = session.version;
        let mut wbuf = Vec::new();
        loop {
            let now = self.clock.now();
            let wait = {
                let live = lock(&session.liveness);
                if live.expired(now) {
                    return Err((
                        ErrorCode::Timeout,
                        format!(
                            "no frame for {}",
                            novacron_shared::duration::format(live.timeout())
                        ),
                    ));
                }
                live.remaining(now)
            };
            let msg = tokio::select! {
                r = recv.next::<AgentMessage>() => r,
                () = tokio::time::sleep(wait) => continue,
                out = outbox.recv() => {
                    let Some(out) = out else { return Ok(()) };
                    framing::write_frame(send, version, &out, &mut wbuf).await.map_err(|e| (e.code(), e.to_string()))?;
                    continue;
                }
            };
            let (v, msg) = match msg {
                Ok(None) => return Ok(()),
                Err(FrameError::Io(e)) => {
                    // The connection closed (agent gone, replaced or revoked).
                    tracing::debug!(host_id = %host_id, error = %e, "control stream ended");
                    return Ok(());
                }
                Err(e) => return Err((e.code(), e.to_string())),
                Ok(Some(m)) => m,
            };
            if v != version {
                return Err((
                    ErrorCode::UnsupportedVersion,
                    format!("frame version {v}, session negotiated {version}"),
                ));
            }
            let now_ms = self.clock.unix_ms();
            session.last_seen_ms.store(now_ms, Ordering::Relaxed);
            let now = self.clock.now();
            if lock(&session.liveness).frame(now) {
                let _ = self.sessions.events.send(HostEvent::Seen { id: host_id, now_ms });
            }
            // Every frame counts for the lease; an ack renews it, so it is
            // decided under the same lock, after the frame is recorded.
            let lease_left = match &msg {
                AgentMessage::Heartbeat(hb) => {
                    Some(hb.lease_left_ms.map(|ms| Duration::from_millis(u64::from(ms))))
                }
                _ => None,
            };
            let may_ack = self.ha_heard(host_id, now, lease_left);
            let reply = match msg {
                AgentMessage::Heartbeat(hb) if may_ack => {
                    Some(ServerMessage::HeartbeatAck(HeartbeatAck { seq: hb.seq }))
                }
                AgentMessage::Heartbeat(hb) => {
                    tracing::debug!(host_id = %host_id, seq = hb.seq, "heartbeat not acknowledged: the host is fenced or returning");
                    None
                }
                AgentMessage::Inventory(mut inv) => {
                    // The migration URI is handed to other hosts' libvirtd and
                    // labels steer placement: only checked values are kept.
                    if let Some(u) = inv.migration_uri.as_deref() {
                        if let Err(e) = novacron_shared::spec::check_libvirt_uri(u) {
                            warn_limited!(self.sessions.limiter, host_id = %host_id, error = %e, "inventory's migration URI ignored");
                            inv.migration_uri = None;
                        }
                    }
                    // The shared storage identity steers HA placement and
                    // is shown in the API: a pool directory, checked.
                    if let Some(p) = inv.shared_storage.as_deref() {
                        if let Err(e) = novacron_shared::spec::check_path(p) {
                            warn_limited!(self.sessions.limiter, host_id = %host_id, error = %e, "inventory's shared storage ignored");
                            inv.shared_storage = None;
                        }
                    }
                    let before = inv.labels.len();
                    inv.labels
                        .retain(|k, v| novacron_shared::spec::check_label(k, v).is_ok());
                    if inv.labels.len() > novacron_shared::spec::MAX_HOST_LABELS {
                        inv.labels.clear();
                    }
                    if inv.labels.len() != before {
                        warn_limited!(self.sessions.limiter, host_id = %host_id, reported = before, kept = inv.labels.len(), "inventory's invalid host labels ignored");
                    }
                    let _ = self.sessions.events.send(HostEvent::Capacity {
                        id: host_id,
                        capacity: inv.capacity,
                    });
                    if let Some(pool) = inv.shared_storage.as_deref() {
                        if pool.is_empty() || pool.len() > MAX_STORAGE_ID || pool.chars().any(char::is_control) {
                            warn_limited!(self.sessions.limiter, host_id = %host_id, "inventory's shared storage identity ignored (empty, control characters or too long)");
                            inv.shared_storage = None;
                        }
                    }
                    tracing::debug!(host_id = %host_id, vms = inv.vms.len(), "inventory");
                    let witness = inv.witness.filter(|a| !a.ip().is_unspecified() && a.port() != 0);
                    if inv.witness.is_some() && witness.is_none() {
                        warn_limited!(self.sessions.limiter, host_id = %host_id, "inventory's witness address ignored (unspecified address or port 0)");
                    }
                    inv.witness = witness;
                    if let Some(l) = inv.disk_locks.as_deref() {
                        if let Err(e) = novacron_shared::spec::check_path(l) {
                            warn_limited!(self.sessions.limiter, host_id = %host_id, error = %e, "inventory's disk lock space ignored");
                            inv.disk_locks = None;
                        }
                    }
                    self.note_lock_space(host_id, inv.disk_locks.clone());
                    *session.inventory.lock().unwrap_or_else(|p| p.into_inner()) = Some(inv);
                    self.witness_address(host_id, witness);
                    self.bump_lease_changes();
                    None
                }
                AgentMessage::CommandResult(r) => {
                    tracing::info!(host_id = %host_id, op_id = %r.op_id, outcome = ?r.outcome, "command result");
                    if let Some(p) = lock(&session.pending).remove(&r.op_id) {
                        let _ = p.done.send(r.outcome);
                    }
                    None
                }
                AgentMessage::Progress(p) => {
                    if let Some(tx) = lock(&session.pending)
                        .get(&p.op_id)
                        .and_then(|x| x.progress.as_ref())
                    {
                        let message: String = p.message.chars().take(256).collect();
                        let _ = tx.send((p.percent.min(100), message));
                    }
                    None
                }
                AgentMessage::VmEvent(ev) => {
                    tracing::info!(host_id = %host_id, vm = %clean_name(&ev.name), event = %clean_name(&ev.event), detail = %clean_name(&ev.detail), "VM event");
                    let mut ev = ev;
                    for f in [&mut ev.name, &mut ev.uuid, &mut ev.event, &mut ev.detail] {
                        // Bounded memory per host, whatever the agent sends.
                        if f.len() > 128 {
                            *f = f.chars().take(128).collect();
                        }
                    }
                    if let Ok(vm) = ev.uuid.parse::<VmId>() {
                        let mut e = crate::bus::FleetEvent::new(
                            crate::bus::EventKind::Vm,
                            Some(host_id),
                            Some(vm),
                            format!("{} {} ({})", ev.name, ev.event, ev.detail),
                        );
                        e.state = Some(ev.state);
                        self.bus.publish(e);
                    }
                    let mut q = lock(&session.vm_events);
                    q.push_back(ev);
                    while q.len() > KEEP_VM_EVENTS {
                        q.pop_front();
                    }
                    None
                }
                AgentMessage::Reconciled(r) => {
                    if !r.converged || !r.actions.is_empty() {
                        tracing::info!(host_id = %host_id, generation = r.generation, converged = r.converged, actions = r.actions.len(), drift = r.drift.len(), "reconcile report");
                    }
                    *lock(&session.report) = Some(r);
                    self.sessions.reports.send_modify(|n| *n += 1);
                    self.bump_lease_changes();
                    None
                }
                AgentMessage::Metrics(_) => Some(ServerMessage::Error(WireError {
                    code: ErrorCode::UnexpectedMessage,
                    message: "metric batches go on a unidirectional stream of their own, not the control stream; not acknowledged".into(),
                })),
                AgentMessage::RenewCertificate(req) => Some(self.renew(host_id, &req.csr_der)),
                AgentMessage::Hello(_) | AgentMessage::Join(_) => {
                    return Err((
                        ErrorCode::UnexpectedMessage,
                        "hello or join inside an open session".into(),
                    ));
                }
            };
            if let Some(reply) = reply {
                framing::write_frame(send, version, &reply, &mut wbuf)
                    .await
                    .map_err(|e| (e.code(), e.to_string()))?;
            }
        }
    }

    fn renew(&self, host_id: HostId, csr: &[u8]) -> ServerMessage {
        let validity = Validity::for_ttl(self.clock.wall(), self.policy.cert_ttl);
        let signed = self
            .ca
            .sign_host_csr(csr, host_id, validity)
            .and_then(|der| CertInfo::parse(&der).map(|i| (der, i)));
        match signed {
            Ok((der, info)) => {
                tracing::info!(host_id = %host_id, serial = %info.serial, "certificate renewed");
                let _ = self.sessions.events.send(HostEvent::CertRenewed {
                    id: host_id,
                    serial: info.serial,
                    not_after: info.not_after,
                });
                ServerMessage::CertificateRenewed(RenewReply {
                    cert_der: der.to_vec(),
                })
            }
            Err(e) => ServerMessage::Error(WireError {
                code: ErrorCode::BadCsr,
                message: format!("renewal refused: {e}"),
            }),
        }
    }

    /// Closes every session (server shutdown).
    pub fn close_all(&self) {
        for s in self.lock_sessions().values() {
            close(&s.conn, ErrorCode::ShuttingDown, "server shutting down");
        }
    }
}

/// Accepts an agent's metric streams (unidirectional, opened by the agent)
/// and feeds their batches to ingest; acknowledgements go back on the
/// control stream through the session's outbox. A malformed batch is refused
/// (logged, rate-limited) and the stream goes on; a broken frame ends the
/// stream (the agent reopens it).
async fn metric_streams(
    metrics: Option<Arc<crate::metrics::Metrics>>,
    conn: quinn::Connection,
    host_id: HostId,
    outbox: mpsc::Sender<ServerMessage>,
) {
    while let Ok(recv) = conn.accept_uni().await {
        let Some(m) = metrics.clone() else {
            tracing::warn!(host_id = %host_id, "metric stream refused: ingest is not running");
            continue;
        };
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let mut recv = framing::FramedRecv::new(recv, MAX_FRAME_LEN);
            let mut cache = crate::metrics::StreamCache::default();
            loop {
                match recv.next::<AgentMessage>().await {
                    Ok(Some((_, AgentMessage::Metrics(batch)))) => {
                        match m.ingest(host_id, batch, &mut cache, &outbox).await {
                            Ok(()) => {}
                            Err(crate::metrics::IngestError::WriterGone) => return,
                            Err(e) => m.refused(host_id, &e),
                        }
                    }
                    Ok(Some((_, _))) => {
                        m.refused(host_id, &crate::metrics::IngestError::NotABatch);
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(host_id = %host_id, error = %e, "metric stream ended");
                        return;
                    }
                }
            }
        });
    }
}

fn version_error(v: u16) -> WireError {
    WireError {
        code: ErrorCode::UnsupportedVersion,
        message: format!(
            "the first frame must use version {HANDSHAKE_VERSION}, got {v}; this server speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}"
        ),
    }
}

/// Closes a connection with one of our error codes and a reason.
pub fn close(conn: &quinn::Connection, code: ErrorCode, message: &str) {
    let reason: String = message.chars().take(200).collect();
    conn.close(code.close_code().into(), reason.as_bytes());
}

/// Keeps names from peers printable and short.
fn clean_name(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(128).collect()
}
