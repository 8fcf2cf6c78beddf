//! Agent sessions over QUIC: enrollment, mutual-TLS sessions, heartbeats,
//! certificate renewal and revocation, desired VMs pushed to agents, their
//! events and reconcile reports, and one-off commands awaited by op id.
//!
//! One task per connection owns that connection's control stream. The
//! session table maps host ids to the live connection so that a newer
//! connection replaces an older one and a revocation closes it at once.
//! Host status changes go to one writer task that batches them into redb
//! transactions, so a fleet reconnecting at once costs a few commits, not
//! thousands.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use novacron_shared::clock::Clock;

use novacron_shared::framing::{self, FrameError, MAX_FRAME_LEN};
use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::pki::{CertInfo, FleetCa, Validity};
use novacron_shared::placement::Placement;
use novacron_shared::protocol::{
    self, AgentMessage, Capacity, Command, CommandKind, CommandOutcome, DesiredState, ErrorCode,
    HeartbeatAck, Inventory, JoinReply, JoinRequest, ReconcileReport, RenewReply, ServerMessage, VmEvent,
    Welcome, WireError, HANDSHAKE_VERSION, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use novacron_shared::spec::{DesiredVm, Power, VmSpec};
use novacron_shared::tls::peer_leaf;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::AgentPolicy;
use crate::ratelimit::LogLimiter;
use crate::scheduler;
mod liveness;
mod migration;
mod usage;

pub use liveness::Liveness;

use crate::store::{
    DesiredRecord, HostRecord, HostState, PlacementRules, Store, StoreError, TokenRefusal, VmRecord,
};
use crate::{secrets, warn_limited};

/// Largest frame accepted on an enrollment connection.
const JOIN_FRAME_LEN: u32 = 64 * 1024;
/// Time allowed for a handshake or for the first frame of a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Joins waiting for the store; past this a join is refused as `Busy`.
const JOIN_QUEUE: usize = 1024;
/// Most joins committed in one transaction.
const JOIN_BATCH: usize = 256;

/// A signed join waiting to be committed.
struct JoinJob {
    hash: [u8; 32],
    host: HostRecord,
    reply: oneshot::Sender<Result<Result<(), TokenRefusal>, String>>,
}

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

/// A command waiting for its agent's answer.
#[derive(Debug)]
struct Pending {
    done: oneshot::Sender<CommandOutcome>,
    progress: Option<mpsc::UnboundedSender<(u8, String)>>,
}

/// Builds the desired-state message for a host.
pub fn desired_message(d: DesiredRecord) -> ServerMessage {
    ServerMessage::DesiredState(DesiredState {
        generation: d.generation,
        vms: d.vms,
        migrating: d.migrating,
    })
}

/// VM events kept per session for the API.
const KEEP_VM_EVENTS: usize = 200;

/// A VM as an operator asks for it on a host.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRequest {
    /// Its id; kept from an earlier request with the same name, or new.
    #[serde(default)]
    pub id: Option<VmId>,
    /// The spec.
    pub spec: VmSpec,
    /// The power state (default running).
    #[serde(default)]
    pub power: Power,
}

/// A request to create a VM.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// The spec.
    pub spec: VmSpec,
    /// The power state (default running).
    #[serde(default)]
    pub power: Power,
    /// Placement rules.
    #[serde(default)]
    pub placement: PlacementRules,
}

/// A VM with its observed state.
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// The stored VM.
    #[serde(flatten)]
    pub record: VmRecord,
    /// The host it is placed on (null when it is on none); the same as
    /// `placement.host`, kept for clients that read it.
    pub host: Option<HostId>,
    /// What its host last reported of it (absent while unknown).
    pub observed: Option<novacron_shared::protocol::VmObserved>,
}

/// A VM request failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The name is taken.
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    /// No such VM.
    #[error("no VM with id {0}")]
    NotFound(VmId),
    /// Nothing fits.
    #[error(transparent)]
    NoFit(scheduler::NoFit),
    /// The VM or host is busy with something that must end first.
    #[error("{0}")]
    Busy(String),
    /// A host involved is not connected.
    #[error("{0}")]
    NotConnected(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The scheduler's request for a VM.
pub fn request_for(spec: &VmSpec, rules: &PlacementRules) -> scheduler::Request {
    scheduler::Request {
        vcpus: u64::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        storage_mib: spec.disks.iter().map(|d| d.size_mib.unwrap_or(0)).sum(),
        required_labels: rules.required_labels.clone(),
        affinity: rules.affinity.clone(),
        anti_affinity: rules.anti_affinity.clone(),
    }
}

/// A host's VMs: what should be, what is, and what the agent last said.
#[derive(Debug, Clone, Serialize)]
pub struct HostVms {
    /// The desired-state generation.
    pub generation: u64,
    /// The desired VMs.
    pub desired: Vec<DesiredVm>,
    /// The latest inventory (while connected).
    pub observed: Option<Inventory>,
    /// The latest reconcile report (while connected).
    pub report: Option<ReconcileReport>,
    /// Recent libvirt lifecycle events, oldest first.
    pub events: Vec<VmEvent>,
}

/// A command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The host has no open session.
    #[error("host {0} is not connected")]
    NotConnected(HostId),
    /// The agent did not answer in time.
    #[error("the agent did not finish op {op_id} within {timeout:?}; it may still complete")]
    Timeout {
        /// The operation.
        op_id: OpId,
        /// How long we waited.
        timeout: Duration,
    },
}

/// A host's record merged with its live session, for the API.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    /// The stored record.
    #[serde(flatten)]
    pub record: HostRecord,
    /// Whether a session is open now.
    pub connected: bool,
    /// The negotiated protocol version of the open session.
    pub protocol_version: Option<u16>,
    /// VMs in the latest inventory.
    pub vm_count: Option<usize>,
    /// Cordoned: the scheduler places no new VMs here.
    pub cordoned: bool,
    /// The labels the host's agent reports (empty while disconnected).
    pub labels: std::collections::BTreeMap<String, String>,
}

enum HostEvent {
    Connected {
        id: HostId,
        name: String,
        agent_version: String,
        address: String,
        now_ms: u64,
    },
    Seen {
        id: HostId,
        now_ms: u64,
    },
    Capacity {
        id: HostId,
        capacity: Capacity,
    },
    CertRenewed {
        id: HostId,
        serial: String,
        not_after: i64,
    },
    Disconnected {
        id: HostId,
        now_ms: u64,
    },
}

/// The fleet's session layer.
pub struct Fleet {
    store: Store,
    ca: FleetCa,
    policy: AgentPolicy,
    sessions: Mutex<HashMap<HostId, Arc<LiveSession>>>,
    revoked_serials: RwLock<HashSet<String>>,
    revoked_hosts: RwLock<HashSet<HostId>>,
    next_conn: AtomicU64,
    events: mpsc::UnboundedSender<HostEvent>,
    joins: mpsc::Sender<JoinJob>,
    scheduler: Mutex<scheduler::Scheduler>,
    sched_policy: scheduler::Policy,
    limiter: LogLimiter,
    migration: crate::config::MigrationPolicy,
    usage: Mutex<Option<usage::UsageIndex>>,
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    /// The event stream.
    pub bus: crate::bus::Bus,
    clock: Clock,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

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

impl Fleet {
    /// Builds the session layer and starts its store writer task.
    pub fn new(
        store: Store,
        ca: FleetCa,
        policy: AgentPolicy,
        scheduler_policy: scheduler::Policy,
        migration: crate::config::MigrationPolicy,
        clock: Clock,
    ) -> Result<Arc<Self>, StoreError> {
        let mut serials = HashSet::new();
        let mut hosts = HashSet::new();
        for (serial, rec) in store.revoked_serials()? {
            serials.insert(serial);
            hosts.insert(rec.host_id);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(host_writer(store.clone(), rx));
        let (joins, join_rx) = mpsc::channel(JOIN_QUEUE);
        tokio::spawn(join_writer(store.clone(), join_rx, clock.clone()));
        Ok(Arc::new(Self {
            store,
            ca,
            policy,
            sessions: Mutex::new(HashMap::new()),
            revoked_serials: RwLock::new(serials),
            revoked_hosts: RwLock::new(hosts),
            next_conn: AtomicU64::new(1),
            events: tx,
            joins,
            scheduler: Mutex::new(scheduler::Scheduler::default()),
            sched_policy: scheduler_policy,
            limiter: LogLimiter::new(20, Duration::from_secs(60)),
            migration,
            usage: Mutex::new(None),
            metrics: std::sync::OnceLock::new(),
            bus: crate::bus::Bus::new(clock.clone()),
            clock,
        }))
    }

    /// Accepts connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let fleet = self.clone();
            tokio::spawn(async move { fleet.handle_incoming(incoming).await });
        }
    }

    /// Attaches metric ingest; agents' metric streams are refused until then.
    pub fn set_metrics(&self, m: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(m);
    }

    /// Metric ingest, once attached.
    pub fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        self.metrics.get()
    }

    /// The server's one clock (monotonic and wall time).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.lock_sessions().len()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, Arc<LiveSession>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All hosts with their live status.
    pub fn hosts(&self) -> Result<Vec<HostView>, StoreError> {
        let records = self.store.hosts()?;
        let cordons = self.store.cordons()?;
        let sessions = self.lock_sessions();
        Ok(records
            .into_iter()
            .map(|r| {
                let live = sessions.get(&r.id);
                let cordoned = cordons.contains(&r.id);
                view(r, live, cordoned)
            })
            .collect())
    }

    /// One host with its live status.
    pub fn host(&self, id: HostId) -> Result<Option<HostView>, StoreError> {
        let Some(r) = self.store.host(id)? else {
            return Ok(None);
        };
        let cordoned = self.store.cordons()?.contains(&id);
        let sessions = self.lock_sessions();
        Ok(Some(view(r, sessions.get(&id), cordoned)))
    }

    /// Revokes a host: its certificates are refused from now on and its
    /// live session is closed.
    pub fn revoke(&self, id: HostId) -> Result<HostRecord, RevokeError> {
        let rec = self
            .store
            .revoke_host(id, self.clock.unix_ms())?
            .ok_or(RevokeError::UnknownHost(id))?;
        self.revoked_serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.cert_serial.clone());
        self.revoked_hosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        if let Some(s) = self.lock_sessions().remove(&id) {
            close(&s.conn, ErrorCode::Revoked, "this host's certificate was revoked");
        }
        tracing::info!(host_id = %id, serial = %rec.cert_serial, "host revoked");
        Ok(rec)
    }

    /// Creates a join token valid for `ttl`; returns it and its expiry (Unix ms).
    pub fn create_join_token(&self, ttl: Duration) -> Result<(String, u64), StoreError> {
        let token = secrets::new_token("ncj");
        let now = self.clock.unix_ms();
        let expires_ms = now + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2);
        self.store.put_join_token(
            &secrets::hash(&token),
            &crate::store::JoinTokenRecord {
                created_ms: now,
                expires_ms,
                used_by: None,
            },
        )?;
        Ok((token, expires_ms))
    }

    fn is_revoked(&self, serial: &str, id: HostId) -> bool {
        self.revoked_serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
            || self
                .revoked_hosts
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
    }

    async fn handle_incoming(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(OPEN_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn_limited!(self.limiter, %remote, error = %e, "agent handshake failed");
                return;
            }
            Err(_) => {
                warn_limited!(self.limiter, %remote, "agent handshake timed out");
                return;
            }
        };
        match peer_leaf(&conn) {
            None => self.handle_join(conn).await,
            Some(leaf) => self.handle_agent(conn, &leaf).await,
        }
    }

    fn refuse_conn(&self, conn: &quinn::Connection, code: ErrorCode, message: &str) {
        warn_limited!(self.limiter, remote = %conn.remote_address(), %code, message, "agent refused");
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

    async fn handle_join(&self, conn: quinn::Connection) {
        let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(OPEN_TIMEOUT, conn.accept_bi()).await else {
            return self.refuse_conn(&conn, ErrorCode::Timeout, "no request within 10s");
        };
        let mut buf = Vec::new();
        let first = tokio::time::timeout(
            OPEN_TIMEOUT,
            framing::read_frame::<AgentMessage>(&mut recv, JOIN_FRAME_LEN, &mut buf),
        )
        .await;
        let req = match first {
            Err(_) => return self.refuse_conn(&conn, ErrorCode::Timeout, "no request within 10s"),
            Ok(Err(e)) => return self.refuse_conn(&conn, e.code(), &e.to_string()),
            Ok(Ok(None)) => return close(&conn, ErrorCode::UnexpectedMessage, "stream ended"),
            Ok(Ok(Some((v, _)))) if v != HANDSHAKE_VERSION => {
                let err = version_error(v);
                return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await;
            }
            Ok(Ok(Some((_, AgentMessage::Join(req))))) => req,
            Ok(Ok(Some(_))) => {
                let err = WireError {
                    code: ErrorCode::Unauthenticated,
                    message: "no client certificate: only a join is allowed; run `novacron-agent join` first"
                        .into(),
                };
                return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await;
            }
        };
        let reply = match self.join(&req, &conn).await {
            Ok(r) => ServerMessage::Joined(r),
            Err(err) => return self.refuse(&conn, &mut send, HANDSHAKE_VERSION, err).await,
        };
        let _ = framing::write_frame(&mut send, HANDSHAKE_VERSION, &reply, &mut buf).await;
        let _ = send.finish();
        // Let the agent read the reply and close; do not hold the slot forever.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }

    async fn join(&self, req: &JoinRequest, conn: &quinn::Connection) -> Result<JoinReply, WireError> {
        if let Err(e) = protocol::negotiate(
            (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
            req.min_version,
            req.max_version,
        ) {
            return Err(WireError {
                code: ErrorCode::UnsupportedVersion,
                message: e.to_string(),
            });
        }
        let hash = secrets::hash(&req.token);
        let host_id = HostId::random();
        let now = self.clock.wall();
        let internal = |e: &dyn std::fmt::Display| WireError {
            code: ErrorCode::Internal,
            message: format!("server could not complete the join: {e}"),
        };
        // Cheap checks first: nobody gets a signature for a bad token.
        match self
            .store
            .check_join_token(&hash, novacron_shared::clock::unix_ms(now))
        {
            Err(e) => {
                tracing::error!(error = %e, "join failed in the store");
                return Err(internal(&e));
            }
            Ok(Err(refusal)) => return Err(token_error(refusal)),
            Ok(Ok(())) => {}
        }
        // Sign outside any store transaction, so joins do not queue behind
        // each other's CPU work.
        let validity = Validity::for_ttl(now, self.policy.cert_ttl);
        let signed = tokio::task::block_in_place(|| {
            let der = self.ca.sign_host_csr(&req.csr_der, host_id, validity)?;
            let info = CertInfo::parse(&der)?;
            Ok::<_, novacron_shared::pki::PkiError>((der, info))
        });
        let (cert, info) = signed.map_err(|e| WireError {
            code: ErrorCode::BadCsr,
            message: format!("the certificate signing request was refused: {e}"),
        })?;
        let host = HostRecord {
            id: host_id,
            name: clean_name(&req.hostname),
            addresses: vec![conn.remote_address().to_string()],
            capacity: Capacity::default(),
            agent_version: clean_name(&req.agent_version),
            first_seen_ms: novacron_shared::clock::unix_ms(now),
            last_seen_ms: novacron_shared::clock::unix_ms(now),
            state: HostState::Enrolled,
            cert_serial: info.serial,
            cert_not_after: info.not_after,
        };
        if conn.close_reason().is_some() {
            // The agent gave up waiting: do not enroll a host nobody holds.
            return Err(internal(&"the agent closed the connection"));
        }
        // Commit in batches: a burst of joins costs one fsync per batch.
        let (reply, committed) = oneshot::channel();
        let job = JoinJob {
            hash,
            host: host.clone(),
            reply,
        };
        if self.joins.try_send(job).is_err() {
            return Err(WireError {
                code: ErrorCode::Busy,
                message: "the server has too many joins in flight; retry in a few seconds".into(),
            });
        }
        match committed.await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(host_id = %host.id, name = %host.name, "host enrolled");
                Ok(JoinReply {
                    host_id: host.id,
                    cert_der: cert.to_vec(),
                    ca_der: self.ca.cert_der().to_vec(),
                })
            }
            Ok(Ok(Err(refusal))) => Err(token_error(refusal)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "join failed in the store");
                Err(internal(&e))
            }
            Err(_) => Err(internal(&"the join writer stopped")),
        }
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
            conn_id: self.next_conn.fetch_add(1, Ordering::Relaxed),
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
        let _ = self.events.send(HostEvent::Connected {
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
        let mut greeting = framing::write_frame(&mut send, HANDSHAKE_VERSION, &welcome, &mut wbuf).await;
        if greeting.is_ok() {
            // The desired state goes first, so the agent can converge at once.
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
                warn_limited!(self.limiter, host_id = %host_id, %code, message, "agent session closed with an error");
            }
            close(&conn, code, &message);
        }
        if self.deregister(host_id, session.conn_id) {
            let _ = self.events.send(HostEvent::Disconnected {
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
            if lock(&session.liveness).frame(self.clock.now()) {
                let _ = self.events.send(HostEvent::Seen { id: host_id, now_ms });
            }
            let reply = match msg {
                AgentMessage::Heartbeat(hb) => {
                    Some(ServerMessage::HeartbeatAck(HeartbeatAck { seq: hb.seq }))
                }
                AgentMessage::Inventory(mut inv) => {
                    // The migration URI is handed to other hosts' libvirtd and
                    // labels steer placement: only checked values are kept.
                    if let Some(u) = inv.migration_uri.as_deref() {
                        if let Err(e) = novacron_shared::spec::check_libvirt_uri(u) {
                            warn_limited!(self.limiter, host_id = %host_id, error = %e, "inventory's migration URI ignored");
                            inv.migration_uri = None;
                        }
                    }
                    let before = inv.labels.len();
                    inv.labels
                        .retain(|k, v| novacron_shared::spec::check_label(k, v).is_ok());
                    if inv.labels.len() > novacron_shared::spec::MAX_HOST_LABELS {
                        inv.labels.clear();
                    }
                    if inv.labels.len() != before {
                        warn_limited!(self.limiter, host_id = %host_id, reported = before, kept = inv.labels.len(), "inventory's invalid host labels ignored");
                    }
                    let _ = self.events.send(HostEvent::Capacity {
                        id: host_id,
                        capacity: inv.capacity,
                    });
                    tracing::debug!(host_id = %host_id, vms = inv.vms.len(), "inventory");
                    *session.inventory.lock().unwrap_or_else(|p| p.into_inner()) = Some(inv);
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
                let _ = self.events.send(HostEvent::CertRenewed {
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

    /// Replaces a host's desired VMs: validates them, keeps the ids of VMs
    /// it already had (by name), stores the new state durably, then pushes
    /// it to the agent if connected.
    pub fn set_desired(&self, host: HostId, vms: Vec<VmRequest>) -> Result<DesiredRecord, DesiredError> {
        if self.store.host(host)?.is_none() {
            return Err(DesiredError::UnknownHost(host));
        }
        let mut problems = Vec::new();
        let mut names = HashSet::new();
        for (i, v) in vms.iter().enumerate() {
            if let Err(e) = v.spec.validate() {
                problems.push(format!("vms[{i}]: {e}"));
            }
            if !names.insert(v.spec.name.clone()) {
                problems.push(format!("vms[{i}]: the name {:?} is used twice", v.spec.name));
            }
        }
        if !problems.is_empty() {
            return Err(DesiredError::Invalid(problems.join("; ")));
        }
        let old: HashMap<String, DesiredVm> = self
            .store
            .desired(host)?
            .map(|d| d.vms.into_iter().map(|v| (v.spec.name.clone(), v)).collect())
            .unwrap_or_default();
        let now = self.clock.unix_ms();
        let records = vms
            .into_iter()
            .map(|r| {
                let prev = old.get(&r.spec.name);
                let id = r.id.or(prev.map(|p| p.id)).unwrap_or_else(VmId::random);
                let unchanged = prev.filter(|p| p.id == id && p.spec == r.spec && p.power == r.power);
                VmRecord {
                    vm: DesiredVm {
                        id,
                        op_id: unchanged.map_or_else(OpId::random, |p| p.op_id),
                        spec: r.spec,
                        power: r.power,
                    },
                    placement: Placement::Host(host),
                    rules: PlacementRules {
                        host: Some(host),
                        ..PlacementRules::default()
                    },
                    created_ms: now,
                }
            })
            .collect();
        let rec = self.store.replace_host_vms(host, records);
        // Rebuilt at the next placement.
        *lock(&self.usage) = None;
        let rec = rec?.map_err(|e| DesiredError::Invalid(e.to_string()))?;
        self.send_to(host, desired_message(rec.clone()));
        Ok(rec)
    }

    /// The scheduler's view of the fleet: hosts with capacity, what their
    /// VMs claim, their groups, cordons and liveness.
    pub fn scheduler_hosts(&self) -> Result<Vec<scheduler::Host>, StoreError> {
        let cordons = self.store.cordons()?;
        let sessions: HashMap<HostId, Arc<LiveSession>> = self.lock_sessions().clone();
        let mut hosts: Vec<scheduler::Host> = self
            .store
            .hosts()?
            .into_iter()
            .filter(|h| h.state != HostState::Revoked)
            .map(|h| {
                let live = sessions.get(&h.id);
                let (capacity, labels) = live
                    .and_then(|s| {
                        lock(&s.inventory)
                            .as_ref()
                            .map(|i| (i.capacity, i.labels.clone()))
                    })
                    .unwrap_or((h.capacity, Default::default()));
                scheduler::Host {
                    id: h.id,
                    up: live.is_some(),
                    cordoned: cordons.contains(&h.id),
                    cpus: capacity.cpus,
                    memory_mib: capacity.memory_mib,
                    storage_free_mib: capacity.storage_free_mib,
                    labels,
                    load: self.metrics.get().and_then(|m| m.host_load(h.id)),
                    used: scheduler::Usage::default(),
                    groups: HashSet::new(),
                }
            })
            .collect();
        let mut usage = lock(&self.usage);
        if usage.is_none() {
            *usage = Some(usage::UsageIndex::build(&self.store)?);
        }
        if let Some(idx) = usage.as_ref() {
            for h in &mut hosts {
                (h.used, h.groups) = idx.of(h.id);
            }
        }
        Ok(hosts)
    }

    /// Validates, places and stores a new VM, then tells its host.
    pub fn create_vm(&self, req: CreateVm) -> Result<VmRecord, VmError> {
        req.spec.validate().map_err(|e| VmError::Invalid(e.to_string()))?;
        for g in [&req.placement.affinity, &req.placement.anti_affinity]
            .into_iter()
            .flatten()
        {
            novacron_shared::spec::check_name(g, 63)
                .map_err(|m| VmError::Invalid(format!("placement group {m}")))?;
        }
        // One placement at a time: the next one sees this one's claim.
        let mut sched = lock(&self.scheduler);
        if self.store.vm_by_name(&req.spec.name)?.is_some() {
            return Err(VmError::NameTaken(req.spec.name));
        }
        let mut hosts = self.scheduler_hosts()?;
        if let Some(pin) = req.placement.host {
            hosts.retain(|h| h.id == pin);
            if hosts.is_empty() {
                return Err(VmError::Invalid(format!("placement.host: no host with id {pin}")));
            }
        }
        let r = request_for(&req.spec, &req.placement);
        let placed = sched.place(&self.sched_policy, &hosts, &r);
        crate::telemetry::TELEMETRY
            .scheduler_decisions
            .with_label_values(&[if placed.is_ok() { "placed" } else { "refused" }])
            .inc();
        let host = placed.map_err(VmError::NoFit)?;
        let rec = VmRecord {
            vm: DesiredVm {
                id: VmId::random(),
                op_id: OpId::random(),
                spec: req.spec,
                power: req.power,
            },
            placement: Placement::Host(host),
            rules: req.placement,
            created_ms: self.clock.unix_ms(),
        };
        let desired = self.store.put_vm(&rec)?.map_err(|e| VmError::NameTaken(e.0))?;
        if let Some(idx) = lock(&self.usage).as_mut() {
            idx.add(&rec, None);
        }
        // The claim is counted: the next placement may go.
        drop(sched);
        tracing::info!(vm = %rec.vm.spec.name, id = %rec.vm.id, host = %host, "VM placed");
        self.bus.vm(
            Some(host),
            rec.vm.id,
            format!("VM {} created, placed on host {host}", rec.vm.spec.name),
        );
        if let Some(d) = desired {
            self.push_desired(host, d);
        }
        Ok(rec)
    }

    /// Changes a VM's power state.
    pub fn set_power(&self, id: VmId, power: Power) -> Result<VmRecord, VmError> {
        let mut rec = self.store.vm(id)?.ok_or(VmError::NotFound(id))?;
        if rec.vm.power != power {
            self.not_migrating(id)?;
            rec.vm.power = power;
            rec.vm.op_id = OpId::random();
            let desired = self.store.put_vm(&rec)?.map_err(|e| VmError::NameTaken(e.0))?;
            self.bus.vm(
                rec.host(),
                id,
                format!("VM {} should be {power:?}", rec.vm.spec.name).to_lowercase(),
            );
            if let (Some(h), Some(d)) = (rec.host(), desired) {
                self.push_desired(h, d);
            }
        }
        Ok(rec)
    }

    /// Refuses changes to a VM while it live-migrates.
    fn not_migrating(&self, id: VmId) -> Result<(), VmError> {
        match self.store.migration(id)? {
            Some(c) => Err(VmError::Busy(format!(
                "VM {id} is live-migrating to host {} (operation {}); try again when it ends",
                c.target, c.op
            ))),
            None => Ok(()),
        }
    }

    /// Deletes a VM; its host's agent removes it.
    pub fn delete_vm(&self, id: VmId) -> Result<VmRecord, VmError> {
        self.not_migrating(id)?;
        let rec = self.store.delete_vm(id)?.ok_or(VmError::NotFound(id))?;
        if let Some(idx) = lock(&self.usage).as_mut() {
            idx.remove(id);
        }
        self.bus
            .vm(rec.host(), id, format!("VM {} deleted", rec.vm.spec.name));
        if let Some(h) = rec.host() {
            if let Some(d) = self.store.desired(h)? {
                self.push_desired(h, d);
            }
        }
        tracing::info!(vm = %rec.vm.spec.name, id = %id, "VM deleted");
        Ok(rec)
    }

    /// A VM with what its host last observed of it.
    pub fn vm_view(&self, rec: VmRecord) -> VmView {
        let host = rec.host();
        let live = host.and_then(|h| self.lock_sessions().get(&h).cloned());
        let uuid = rec.vm.id.to_string();
        let observed = live.and_then(|s| {
            lock(&s.inventory)
                .as_ref()
                .and_then(|i| i.vms.iter().find(|o| o.uuid == uuid).cloned())
        });
        VmView {
            record: rec,
            host,
            observed,
        }
    }

    /// Cordons (no new VMs) or uncordons a host.
    pub fn set_cordon(&self, id: HostId, cordoned: bool) -> Result<bool, StoreError> {
        let known = self.store.set_cordon(id, cordoned, self.clock.unix_ms())?;
        if known {
            let what = if cordoned { "cordoned" } else { "uncordoned" };
            self.bus.host(id, format!("host {what}"));
        }
        Ok(known)
    }

    fn push_desired(&self, host: HostId, d: DesiredRecord) {
        self.send_to(host, desired_message(d));
    }

    /// A host's desired and observed VMs.
    pub fn host_vms(&self, host: HostId) -> Result<Option<HostVms>, StoreError> {
        if self.store.host(host)?.is_none() {
            return Ok(None);
        }
        let desired = self.store.desired(host)?.unwrap_or_default();
        let live = self.lock_sessions().get(&host).cloned();
        Ok(Some(HostVms {
            generation: desired.generation,
            desired: desired.vms,
            observed: live.as_ref().and_then(|s| lock(&s.inventory).clone()),
            report: live.as_ref().and_then(|s| lock(&s.report).clone()),
            events: live
                .as_ref()
                .map(|s| lock(&s.vm_events).iter().cloned().collect())
                .unwrap_or_default(),
        }))
    }

    /// Sends a command to a connected agent and waits for its outcome.
    pub async fn command(
        &self,
        host: HostId,
        kind: CommandKind,
        timeout: Duration,
    ) -> Result<(OpId, CommandOutcome), CommandError> {
        self.command_with_progress(host, OpId::random(), kind, timeout, None)
            .await
    }

    /// Like [`Self::command`], with a given op id and the agent's progress
    /// reports forwarded to `progress`.
    pub async fn command_with_progress(
        &self,
        host: HostId,
        op_id: OpId,
        kind: CommandKind,
        timeout: Duration,
        progress: Option<mpsc::UnboundedSender<(u8, String)>>,
    ) -> Result<(OpId, CommandOutcome), CommandError> {
        let session = self
            .lock_sessions()
            .get(&host)
            .cloned()
            .ok_or(CommandError::NotConnected(host))?;
        let (tx, rx) = oneshot::channel();
        lock(&session.pending).insert(op_id, Pending { done: tx, progress });
        if session
            .outbox
            .send(ServerMessage::Command(Command { op_id, kind }))
            .await
            .is_err()
        {
            lock(&session.pending).remove(&op_id);
            return Err(CommandError::NotConnected(host));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => Ok((op_id, outcome)),
            Ok(Err(_)) => Err(CommandError::NotConnected(host)),
            Err(_) => {
                lock(&session.pending).remove(&op_id);
                Err(CommandError::Timeout { op_id, timeout })
            }
        }
    }

    /// Sends a message to a host's live session, if it has one.
    pub fn send_to(&self, id: HostId, msg: ServerMessage) -> bool {
        let s = self.lock_sessions().get(&id).cloned();
        s.is_some_and(|s| s.outbox.try_send(msg).is_ok())
    }

    /// Closes every session (server shutdown).
    pub fn close_all(&self) {
        for s in self.lock_sessions().values() {
            close(&s.conn, ErrorCode::ShuttingDown, "server shutting down");
        }
    }
}

fn view(record: HostRecord, live: Option<&Arc<LiveSession>>, cordoned: bool) -> HostView {
    let mut record = record;
    if let Some(s) = live {
        if let Some(inv) = s.inventory.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            record.capacity = inv.capacity;
        }
        record.last_seen_ms = record.last_seen_ms.max(s.last_seen_ms.load(Ordering::Relaxed));
        if record.state != HostState::Revoked {
            record.state = HostState::Online;
        }
    }
    HostView {
        connected: live.is_some(),
        protocol_version: live.map(|s| s.version),
        vm_count: live.and_then(|s| {
            s.inventory
                .lock()
                .ok()
                .and_then(|i| i.as_ref().map(|i| i.vms.len()))
        }),
        cordoned,
        labels: live
            .and_then(|s| lock(&s.inventory).as_ref().map(|i| i.labels.clone()))
            .unwrap_or_default(),
        record,
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

fn token_error(refusal: TokenRefusal) -> WireError {
    let (code, message) = match refusal {
        TokenRefusal::Unknown => (
            ErrorCode::TokenInvalid,
            "unknown join token; create one with `novacron-server token create`",
        ),
        TokenRefusal::Expired => (
            ErrorCode::TokenExpired,
            "the join token has expired; create a new one",
        ),
        TokenRefusal::Used => (
            ErrorCode::TokenUsed,
            "the join token was already used; each token enrolls one host",
        ),
    };
    WireError {
        code,
        message: message.into(),
    }
}

/// Commits signed joins in batches: whatever queued while the previous
/// batch was being written goes into the next transaction.
async fn join_writer(store: Store, mut rx: mpsc::Receiver<JoinJob>, clock: Clock) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < JOIN_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let items: Vec<([u8; 32], HostRecord)> = batch.iter().map(|j| (j.hash, j.host.clone())).collect();
        let s = store.clone();
        let now = clock.unix_ms();
        let result = tokio::task::spawn_blocking(move || s.enroll(&items, now)).await;
        match result {
            Ok(Ok(outcomes)) => {
                tracing::debug!(joins = batch.len(), "join batch committed");
                for (j, o) in batch.into_iter().zip(outcomes) {
                    let _ = j.reply.send(Ok(o));
                }
            }
            Ok(Err(e)) => {
                for j in batch {
                    let _ = j.reply.send(Err(e.to_string()));
                }
            }
            Err(e) => {
                for j in batch {
                    let _ = j.reply.send(Err(format!("join writer task failed: {e}")));
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Setting desired VMs failed.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// No such host.
    #[error("no host with id {0}")]
    UnknownHost(HostId),
    /// A VM request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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

async fn host_writer(store: Store, mut rx: mpsc::UnboundedReceiver<HostEvent>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let events = std::mem::take(&mut batch);
        let store2 = store.clone();
        let r = tokio::task::spawn_blocking(move || apply_events(&store2, events)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "persisting host status failed"),
            Err(e) => tracing::error!(error = %e, "host writer task failed"),
        }
    }
}

fn apply_events(store: &Store, events: Vec<HostEvent>) -> Result<(), StoreError> {
    let mut by_host: HashMap<HostId, Vec<HostEvent>> = HashMap::new();
    for ev in events {
        let id = match &ev {
            HostEvent::Connected { id, .. }
            | HostEvent::Seen { id, .. }
            | HostEvent::Capacity { id, .. }
            | HostEvent::CertRenewed { id, .. }
            | HostEvent::Disconnected { id, .. } => *id,
        };
        by_host.entry(id).or_default().push(ev);
    }
    // Read-modify-write inside one transaction, so a revocation committed
    // meanwhile is never overwritten by a stale copy.
    store.update_hosts(by_host.keys().copied().collect::<Vec<_>>(), |h| {
        let revoked = h.state == HostState::Revoked;
        for ev in by_host.remove(&h.id).unwrap_or_default() {
            match ev {
                HostEvent::Connected {
                    name,
                    agent_version,
                    address,
                    now_ms,
                    ..
                } => {
                    h.name = name;
                    h.agent_version = agent_version;
                    h.addresses.retain(|a| *a != address);
                    h.addresses.insert(0, address);
                    h.addresses.truncate(4);
                    h.last_seen_ms = now_ms;
                    if !revoked {
                        h.state = HostState::Online;
                    }
                }
                HostEvent::Seen { now_ms, .. } => h.last_seen_ms = h.last_seen_ms.max(now_ms),
                HostEvent::Capacity { capacity, .. } => h.capacity = capacity,
                HostEvent::CertRenewed {
                    serial, not_after, ..
                } => {
                    h.cert_serial = serial;
                    h.cert_not_after = not_after;
                }
                HostEvent::Disconnected { now_ms, .. } => {
                    h.last_seen_ms = h.last_seen_ms.max(now_ms);
                    if !revoked {
                        h.state = HostState::Offline;
                    }
                }
            }
        }
    })
}
