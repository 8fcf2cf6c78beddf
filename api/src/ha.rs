//! High availability: `/v1/ha` (the fleet's HA state, and releasing
//! *held*), a host's lease state and maintenance, a VM's HA state.

use novacron_shared::ids::{HostId, VmId};
use serde::{Deserialize, Serialize};

/// A host's HA lease, as the server judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Heard recently on a live session: holds its lease.
    Online,
    /// Heartbeats missed, disconnected, or not heard since the server
    /// started. Shown; nothing acts on it.
    Suspect,
    /// Silent for longer than the lease; its agent may not have fenced yet.
    LeaseExpired,
    /// Silent long enough that its agent must have stopped its HA VMs:
    /// they restart elsewhere.
    Fenced,
    /// Was fenced and is heard again: gets no lease until the VMs that
    /// moved are gone from it.
    Returning,
    /// Set by an operator: never fenced.
    Maintenance,
}

/// The mass-failure guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuardState {
    /// Restarts proceed.
    Normal,
    /// Many hosts went silent at once: no restarts until hosts return or an
    /// operator releases it (`POST /v1/ha/release`).
    Held,
    /// Leaving held: fenced hosts are released one at a time.
    Releasing,
}

/// Why the guard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Held {
    /// Since when, Unix ms.
    pub since_ms: u64,
    /// Hosts that went silent together.
    pub silent: u64,
    /// Hosts monitored (not in maintenance).
    pub monitored: u64,
}

/// Where an HA VM of a fenced host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmHaState {
    /// Its restart on another host is being carried out.
    Restarting,
    /// Waiting to be restarted (`why` says for what).
    Waiting,
    /// Not HA (or not meant to run): lost until its host comes back.
    Lost,
}

/// One VM of a fenced host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FencedVm {
    /// The VM.
    pub id: VmId,
    /// Its name.
    pub name: String,
    /// The fenced host it is on.
    pub host: HostId,
    /// Where it stands.
    pub state: VmHaState,
    /// Why, for the operator.
    pub why: String,
    /// Since when, Unix ms.
    pub since_ms: u64,
}

/// One host's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostLease {
    /// The host.
    pub id: HostId,
    /// Its name.
    pub name: String,
    /// Its lease.
    pub lease: LeaseState,
}

/// `GET /v1/ha`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HaOverview {
    /// Restarts are on (`[ha] enabled`).
    pub enabled: bool,
    /// The lease an acknowledged heartbeat buys, ms.
    pub lease_ms: u64,
    /// How long an agent may take to stop its HA VMs after its lease ends, ms.
    pub fence_time_ms: u64,
    /// From a host's last frame, how long until it counts as fenced, ms
    /// (the lease, the fence time, the clock-drift bound and a margin).
    pub fenced_after_ms: u64,
    /// The mass-failure guard.
    pub guard: GuardState,
    /// Why it holds, while it does.
    pub held: Option<Held>,
    /// Every host's lease.
    pub hosts: Vec<HostLease>,
    /// VMs of fenced hosts: restarting, waiting or lost.
    pub vms: Vec<FencedVm>,
}

/// `PUT /v1/hosts/{host}/maintenance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMaintenance {
    /// In maintenance: the host is never fenced, its VMs never restarted
    /// elsewhere (its agent still stops its HA VMs when its lease ends).
    pub maintenance: bool,
}

/// A VM's HA history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmHa {
    /// Its placement epoch (raised by every restart elsewhere).
    pub epoch: u64,
    /// Restarts elsewhere so far.
    pub restarts: u64,
    /// The last one, Unix ms.
    pub last_restart_ms: Option<u64>,
    /// The host it was restarted from last.
    pub last_restart_from: Option<HostId>,
    /// While its host is fenced: where it stands and why.
    pub fenced: Option<FencedVm>,
}
