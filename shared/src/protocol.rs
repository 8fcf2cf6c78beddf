//! The wire protocol: one enum per direction, plus version negotiation.
//!
//! Layout rules (see ARCHITECTURE.md): a connection's first frame is always
//! framed at [`HANDSHAKE_VERSION`], and the layouts of [`Hello`], [`Welcome`],
//! [`JoinRequest`] and [`WireError`] are frozen forever, so that peers of any
//! two versions can always tell each other which versions they speak. After
//! the welcome, every frame carries the negotiated version. New message kinds
//! are appended at the end of the enums, never inserted.

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, OpId, VmId};
use crate::spec::DesiredVm;

/// The oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 1;
/// The frame version of the first frame on a connection (hello or join).
pub const HANDSHAKE_VERSION: u16 = 1;

/// Everything an agent sends to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentMessage {
    /// First frame of an enrolled agent's control stream.
    Hello(Hello),
    /// First and only request on an enrollment connection (no client certificate).
    Join(JoinRequest),
    /// Liveness, sent every heartbeat interval.
    Heartbeat(Heartbeat),
    /// What the host has and runs; sent after the welcome and on change.
    Inventory(Inventory),
    /// The outcome of a [`Command`].
    CommandResult(CommandResult),
    /// A batch of metric samples.
    Metrics(MetricBatch),
    /// A new CSR for the same host id, sent before the certificate expires.
    RenewCertificate(RenewRequest),
    /// A libvirt lifecycle event, pushed as it happens.
    VmEvent(VmEvent),
    /// What the reconciler did for a desired state, and the drift it cannot fix.
    Reconciled(ReconcileReport),
    /// How far a long command (a migration) got; sent while it runs.
    Progress(CommandProgress),
}

/// Everything the server sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// Accepts a hello: the negotiated version and who the agent is.
    Welcome(Welcome),
    /// Accepts a join: the signed certificate.
    Joined(JoinReply),
    /// Echo of a heartbeat's sequence number.
    HeartbeatAck(HeartbeatAck),
    /// Something the agent must do.
    Command(Command),
    /// Metric batches up to and including `upto_seq` are stored.
    MetricsAck(MetricsAck),
    /// A renewed certificate.
    CertificateRenewed(RenewReply),
    /// A refusal; the connection is closed after it when `fatal`.
    Error(WireError),
    /// The VMs this host should have; replaces any earlier desired state.
    DesiredState(DesiredState),
    /// The HA lease terms; sent right after the welcome, before any
    /// heartbeat ack, and again whenever they change.
    LeaseTerms(LeaseTerms),
    /// The peers this agent asks "do you still have the server?" when its
    /// lease runs out, and how many must say no; sent after the lease
    /// terms and whenever the fleet changes. Absent: no witness (fence as
    /// the isolation response says).
    Witness(WitnessTerms),
}

/// The agent's opening: which versions it speaks and what it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest version the agent speaks.
    pub min_version: u16,
    /// Newest version the agent speaks.
    pub max_version: u16,
    /// The agent's build version, e.g. `0.1.0`.
    pub agent_version: String,
    /// The host's name as the host itself knows it.
    pub hostname: String,
}

/// The server's reply to a hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version all further frames use.
    pub version: u16,
    /// The host id the server read from the agent's certificate.
    pub host_id: HostId,
    /// How often the server expects heartbeats, in milliseconds.
    pub heartbeat_interval_ms: u32,
}

/// An enrollment request, sent over a connection that pins the CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Oldest version the agent speaks.
    pub min_version: u16,
    /// Newest version the agent speaks.
    pub max_version: u16,
    /// The one-time join token.
    pub token: String,
    /// A PKCS#10 certificate signing request (DER) for a key made on the host.
    pub csr_der: Vec<u8>,
    /// The host's name as the host itself knows it.
    pub hostname: String,
    /// The agent's build version.
    pub agent_version: String,
}

/// A successful enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinReply {
    /// The id assigned to this host.
    pub host_id: HostId,
    /// The host's certificate (DER), naming the host id.
    pub cert_der: Vec<u8>,
    /// The fleet CA certificate (DER).
    pub ca_der: Vec<u8>,
}

/// Liveness from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increases by one per heartbeat within a connection.
    pub seq: u64,
    /// The agent's HA lease when it sent this heartbeat: how long it still
    /// runs, ms; `None` when it holds none. The server counts a host whose
    /// lease ran out as having lost it, even while it still hears the host
    /// (acks lost one way, or withheld): the mass-failure guard must see
    /// every host that could tell its peers it lost the server
    /// (`novacron_shared::witness`).
    pub lease_left_ms: Option<u32>,
}

/// The server's echo of a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The acknowledged heartbeat.
    pub seq: u64,
}

/// What a host offers.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Size of the VM storage pool, MiB (0 when the pool is unavailable).
    pub storage_mib: u64,
    /// Free space in the VM storage pool, MiB.
    pub storage_free_mib: u64,
}

/// A VM's state as libvirt reports it.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined but not running.
    Stopped,
    /// Running.
    Running,
    /// Paused (suspended in memory).
    Paused,
    /// Shutting down.
    ShuttingDown,
    /// Crashed.
    Crashed,
    /// Suspended to disk by the guest (pmsuspended).
    Suspended,
    /// Any state libvirt reports that we do not map.
    Unknown,
}

/// One VM as observed on a host.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmObserved {
    /// The libvirt domain name.
    pub name: String,
    /// The libvirt domain UUID.
    pub uuid: String,
    /// Its state.
    pub state: VmState,
    /// Whether NovaCron defined it (its XML carries NovaCron's metadata).
    pub managed: bool,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<String>,
}

/// A libvirt domain lifecycle event.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    /// The domain's name.
    pub name: String,
    /// The domain's UUID.
    pub uuid: String,
    /// What happened (`started`, `stopped`, `suspended`, ...).
    pub event: String,
    /// libvirt's detail for it (`booted`, `shutdown`, `destroyed`, ...).
    pub detail: String,
    /// The state after the event.
    pub state: VmState,
    /// When the agent saw it, ms since the Unix epoch.
    pub at_ms: u64,
}

/// The VMs a host should have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Increases with every change; reports name the generation they answer.
    pub generation: u64,
    /// Every VM this host should have; managed VMs not listed are removed.
    pub vms: Vec<DesiredVm>,
    /// VMs in a live migration from or to this host: the agent leaves
    /// their domains alone (libvirt is moving them) until a later desired
    /// state lists them as its own or not at all.
    pub migrating: Vec<VmId>,
    /// HA VMs restarted on another host while this one was fenced: the
    /// agent removes their domains here (never starts them), keeping the
    /// disks when `keep_disks` (they are on the shared pool, in use there).
    pub departed: Vec<Departed>,
}

/// An HA VM that now runs on another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departed {
    /// The VM.
    pub vm: VmId,
    /// Its disks are on the shared pool: undefine the domain only.
    pub keep_disks: bool,
}

/// How an agent stops its HA VMs when its lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceStyle {
    /// Kill them at once (libvirt's destroy).
    Kill,
    /// Ask the guests to shut down; kill what still runs after `grace_ms`
    /// (which is less than the fence time).
    ShutdownThenKill {
        /// The guests' grace, ms.
        grace_ms: u32,
    },
}

/// The HA lease the server grants: an acknowledged heartbeat keeps the
/// lease for `lease_ms` from when the agent sent it; by then plus
/// `fence_time_ms` the agent has stopped its HA VMs (see
/// `novacron_shared::lease`) — unless `isolation` is
/// [`IsolationResponse::KeepRunning`], or its peers confirm the server is
/// lost to much of the fleet (`novacron_shared::witness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    /// `L`, ms.
    pub lease_ms: u32,
    /// `F`, ms.
    pub fence_time_ms: u32,
    /// How to fence.
    pub fence: FenceStyle,
    /// What an agent does with its HA VMs when its lease runs out.
    pub isolation: IsolationResponse,
}

/// What an isolated host (its lease ran out) does with its HA VMs; chosen
/// per fleet in the server's `[ha]` config.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationResponse {
    /// Stop them within the fence time (unless the peer witness confirms
    /// the server is lost to much of the fleet); the server restarts them
    /// elsewhere once the lease wait has passed.
    #[default]
    SelfFence,
    /// Leave them running. The server restarts them elsewhere only once
    /// the disk lock is free or the host's hardware fence confirmed it
    /// off; the server refuses this mode without disk locks or a hardware
    /// fence.
    KeepRunning,
}

/// One peer an agent may ask about the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessPeer {
    /// Its host id: the name its certificate must carry.
    pub host: HostId,
    /// Where its witness endpoint listens (it reported this in its inventory).
    pub addr: std::net::SocketAddr,
}

/// The peer witness an agent runs (see `novacron_shared::witness`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessTerms {
    /// Whom to ask; never this host itself.
    pub peers: Vec<WitnessPeer>,
    /// How many distinct peers must answer that they lost the server too
    /// ([`crate::witness::quorum`] of the monitored hosts). When `peers`
    /// holds fewer, the witness can never confirm: the agent fences as
    /// without one.
    pub quorum: u32,
    /// How long past its lease end the agent waits for its peers' answers
    /// before it fences (the fleet's leases end up to a heartbeat apart:
    /// the first to end must not find every peer still leased). The
    /// server's fence wait includes it ([`crate::witness::grace`]).
    pub grace_ms: u32,
}

/// The reconciler's account of one pass.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// The desired-state generation this pass worked towards.
    pub generation: u64,
    /// Whether the host now matches the desired state.
    pub converged: bool,
    /// What was done, one line each (`started web-1 (op ...)`).
    pub actions: Vec<String>,
    /// Differences it could not fix, per VM.
    pub drift: Vec<Drift>,
}

/// A difference between desired and observed state that the agent cannot fix.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// The VM's name.
    pub vm: String,
    /// What is wrong, for the operator.
    pub message: String,
    /// Why, when it is an expected wait rather than a failure.
    pub kind: DriftKind,
}

/// What kind of drift: most are failures; some are expected waits the
/// agent retries by itself (with backoff) until they clear.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// Anything else: an error the operator may have to look at.
    #[default]
    Failed,
    /// An HA VM waits for this host's HA lease.
    WaitingForLease,
    /// A disk of the VM is locked by another host (libvirt's lock manager,
    /// or QEMU's image lock): another copy still runs, or its host has not
    /// released the lock yet. Retried with backoff; never forced.
    DiskLockHeld,
}

/// The host's full observed state.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// What the host offers.
    pub capacity: Capacity,
    /// The hypervisor connection the agent manages (e.g. `qemu:///system`).
    pub hypervisor: String,
    /// Every VM the hypervisor knows.
    pub vms: Vec<VmObserved>,
    /// The libvirt URI other hosts use to live-migrate VMs here
    /// (`vms.migration_uri`); absent when the host takes no migrations.
    pub migration_uri: Option<String>,
    /// The host's labels (agent config `labels`), for placement rules.
    pub labels: std::collections::BTreeMap<String, String>,
    /// When the VM storage pool is shared (agent config
    /// `vms.storage_shared`: the same storage at the same path on every
    /// such host), its identity: the pool's directory. HA VMs with disks
    /// move only between hosts reporting the same value.
    pub shared_storage: Option<String>,
    /// The lock space when libvirt guards the disks of running VMs with
    /// its lock manager (agent config `vms.disk_locks`; `lockd` with
    /// virtlockd): a second QEMU on any host sharing that lock space
    /// cannot open a disk in use. Hosts reporting the same value exclude
    /// each other.
    pub disk_locks: Option<String>,
    /// Where this agent's peer witness listens, as other hosts reach it;
    /// absent when it runs none.
    #[cfg_attr(feature = "schema", schema(value_type = Option<String>))]
    pub witness: Option<std::net::SocketAddr>,
}

/// A command from the server; idempotent by `op_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Identifies this operation across retries.
    pub op_id: OpId,
    /// What to do.
    pub kind: CommandKind,
}

/// Every command the server can give an agent. Power state, creation and
/// removal go through [`DesiredState`]; these are the one-off operations.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Re-read the hypervisor and send a fresh inventory.
    RefreshInventory,
    /// Reboot a running VM (ACPI).
    Reboot {
        /// The VM's id.
        vm: VmId,
    },
    /// Take an internal snapshot (disks, and memory when running).
    SnapshotCreate {
        /// The VM's id.
        vm: VmId,
        /// The snapshot's name.
        name: String,
    },
    /// Revert to a snapshot.
    SnapshotRevert {
        /// The VM's id.
        vm: VmId,
        /// The snapshot's name.
        name: String,
    },
    /// Delete a snapshot.
    SnapshotDelete {
        /// The VM's id.
        vm: VmId,
        /// The snapshot's name.
        name: String,
    },
    /// Grow one of a VM's disks.
    ResizeDisk {
        /// The VM's id.
        vm: VmId,
        /// The disk's name in the spec.
        disk: String,
        /// The new size, MiB (never smaller than the current one).
        size_mib: u64,
    },
    /// Live-migrate a running VM to another host, peer to peer: this
    /// host's libvirt connects to `dest_uri`. Progress comes back as
    /// [`AgentMessage::Progress`]; on failure the VM keeps running here.
    Migrate {
        /// The VM's id.
        vm: VmId,
        /// The target host's libvirt URI (its `migration_uri`).
        dest_uri: String,
        /// Bandwidth cap, MiB/s (0: libvirt's default).
        bandwidth_mib_s: u64,
        /// Give up when the migration runs longer than this, seconds.
        timeout_secs: u32,
    },
}

/// How far a command got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandProgress {
    /// The operation.
    pub op_id: OpId,
    /// 0 to 100.
    pub percent: u8,
    /// What it is doing, for people.
    pub message: String,
}

/// The outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The operation this answers.
    pub op_id: OpId,
    /// How it ended.
    pub outcome: CommandOutcome,
}

/// How a command ended.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// Done (or was already done: commands are idempotent).
    Done,
    /// Failed; the message says why.
    Failed {
        /// Why it failed, for the operator.
        message: String,
    },
}

pub use crate::metrics::MetricBatch;

/// Acknowledges stored metric batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsAck {
    /// The agent spool's epoch the sequence numbers belong to.
    pub epoch: u64,
    /// Every batch of that epoch with a sequence number up to this one is
    /// stored durably.
    pub upto_seq: u64,
}

/// A certificate renewal request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// A CSR (DER) for a fresh key made on the host.
    pub csr_der: Vec<u8>,
}

/// A renewed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewReply {
    /// The new certificate (DER), same host id.
    pub cert_der: Vec<u8>,
}

/// A refusal or failure, with a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// What kind of error.
    pub code: ErrorCode,
    /// What was wrong and what to do about it.
    pub message: String,
}

/// Stable error codes; also used as QUIC application close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peers share no protocol version.
    UnsupportedVersion,
    /// A frame could not be decoded.
    MalformedFrame,
    /// A frame exceeded the size cap.
    FrameTooLarge,
    /// A message arrived that is not allowed at this point.
    UnexpectedMessage,
    /// The join token is unknown.
    TokenInvalid,
    /// The join token has expired.
    TokenExpired,
    /// The join token was already used.
    TokenUsed,
    /// The CSR could not be parsed or verified.
    BadCsr,
    /// No client certificate, or one that maps to no known host.
    Unauthenticated,
    /// The host's certificate has been revoked.
    Revoked,
    /// A newer connection for the same host replaced this one.
    Replaced,
    /// The server is shutting down.
    ShuttingDown,
    /// A feature the peer asked for is not available in this build.
    Unsupported,
    /// Heartbeats stopped arriving.
    Timeout,
    /// The server failed internally; the message says where.
    Internal,
    /// The server is overloaded; retry after a pause.
    Busy,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 16] = [
        Self::UnsupportedVersion,
        Self::MalformedFrame,
        Self::FrameTooLarge,
        Self::UnexpectedMessage,
        Self::TokenInvalid,
        Self::TokenExpired,
        Self::TokenUsed,
        Self::BadCsr,
        Self::Unauthenticated,
        Self::Revoked,
        Self::Replaced,
        Self::ShuttingDown,
        Self::Unsupported,
        Self::Timeout,
        Self::Internal,
        Self::Busy,
    ];

    /// The QUIC application close code for this error (0 is a clean close).
    pub fn close_code(self) -> u32 {
        Self::ALL
            .iter()
            .position(|c| *c == self)
            .map_or(u32::MAX, |i| 0x100 + i as u32)
    }

    /// The error for a QUIC application close code, if it is one of ours.
    pub fn from_close_code(code: u64) -> Option<ErrorCode> {
        let i = code.checked_sub(0x100)?;
        Self::ALL.get(usize::try_from(i).ok()?).copied()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The two sides share no protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "protocol version mismatch: we speak {ours_min}..={ours_max}, the peer speaks \
     {theirs_min}..={theirs_max}; upgrade the older side"
)]
pub struct VersionMismatch {
    /// Our oldest.
    pub ours_min: u16,
    /// Our newest.
    pub ours_max: u16,
    /// Their oldest.
    pub theirs_min: u16,
    /// Their newest.
    pub theirs_max: u16,
}

/// Picks the newest version both sides speak.
pub fn negotiate(ours: (u16, u16), theirs_min: u16, theirs_max: u16) -> Result<u16, VersionMismatch> {
    let lo = ours.0.max(theirs_min);
    let hi = ours.1.min(theirs_max);
    if lo <= hi && theirs_min <= theirs_max {
        Ok(hi)
    } else {
        Err(VersionMismatch {
            ours_min: ours.0,
            ours_max: ours.1,
            theirs_min,
            theirs_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_picks_newest_common() {
        assert_eq!(negotiate((1, 3), 2, 5), Ok(3));
        assert_eq!(negotiate((1, 1), 1, 1), Ok(1));
        let e = negotiate((1, 1), 2, 3).unwrap_err();
        assert!(e.to_string().contains("we speak 1..=1"), "{e}");
        assert!(negotiate((1, 3), 3, 2).is_err());
    }

    #[test]
    fn close_codes_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_close_code(u64::from(c.close_code())), Some(c));
        }
        assert_eq!(ErrorCode::from_close_code(0), None);
        assert_eq!(ErrorCode::from_close_code(0x100 + 999), None);
    }
}
