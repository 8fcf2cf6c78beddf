//! The fleet: the server core that agents connect to and the API drives.
//!
//! This file is the facade: [`Fleet`] holds one part per responsibility and
//! the public types the API uses; each part lives in a module of its own
//! and is the one owner of its state:
//!
//! - [`sessions`]: agent connections (accept, join and the join writer, the
//!   session protocol, renewal, the revocation cache, the host status
//!   writer, commands awaited by op id) and each session's [`Liveness`].
//! - [`vms`]: desired VM state and placement (the scheduler and the usage
//!   index under one lock that is never held across a store commit).
//! - [`ops`]: live migration and drain as pure state machines and the
//!   driver that carries their actions out.
//! - [`view`]: the read-only [`FleetView`] snapshot that controllers read
//!   and the [`Action`] channel they write to.
//! - [`ha`]: the host leases (fed by the sessions, ticked by the HA
//!   driver), the HA status, restarts elsewhere and returning hosts.
//!
//! Here: only wiring and shared infrastructure (store, clock, CA, agent
//! policy, metric ingest, event bus). No part's state is reached from
//! another part but through that part's methods.

use std::sync::{Arc, Mutex};

use novacron_shared::clock::Clock;
use novacron_shared::ids::VmId;
use novacron_shared::pki::FleetCa;
use novacron_shared::protocol::{DesiredState, Inventory, ReconcileReport, ServerMessage, VmEvent};
use novacron_shared::spec::{DesiredVm, Power, VmSpec};

use crate::config::{AgentPolicy, HaConfig, MigrationPolicy};
use crate::scheduler;
use crate::store::{DesiredRecord, HostRecord, PlacementRules, Store, StoreError, VmRecord};

mod burst;
pub mod ha;
mod liveness;
pub mod ops;
pub mod sessions;
mod usage;
pub mod view;
pub mod vms;

pub use ha::{HaError, HaStatus, Held, HostFence, LockWait, VmHa, VmHaState, WitnessStatus};
pub use liveness::Liveness;
pub use ops::migration::{whereabouts, Whereabouts};
pub use sessions::commands::CommandError;
pub use sessions::RevokeError;
pub use sessions::{close, LiveSession};
pub use view::{Action, FleetView, HostSnapshot, VmSnapshot};
pub use vms::desired::DesiredError;
pub use vms::VmError;

/// The fleet: agent sessions, VMs, operations, and the view controllers read.
pub struct Fleet {
    store: Store,
    clock: Clock,
    ca: FleetCa,
    policy: AgentPolicy,
    migration: MigrationPolicy,
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    burst: std::sync::OnceLock<Arc<crate::burst::Shared>>,
    /// The event stream.
    pub bus: crate::bus::Bus,
    sessions: sessions::Sessions,
    ha: ha::Ha,
    placer: vms::Placer,
    actions: view::ActionQueue,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    /// Builds the fleet on `clock` with the default `[ha]` config and
    /// starts its writer tasks (joins, host status) and the action runner
    /// controllers write to.
    pub fn new(
        store: Store,
        ca: FleetCa,
        policy: AgentPolicy,
        scheduler_policy: scheduler::Policy,
        migration: MigrationPolicy,
        clock: Clock,
    ) -> Result<Arc<Self>, StoreError> {
        Self::with_ha(
            store,
            ca,
            policy,
            scheduler_policy,
            migration,
            HaConfig::default(),
            clock,
        )
    }

    /// Like [`Fleet::new`], with the `[ha]` config `ha`: the lease terms it
    /// grants are recorded in the store before any session can get them.
    pub fn with_ha(
        store: Store,
        ca: FleetCa,
        policy: AgentPolicy,
        scheduler_policy: scheduler::Policy,
        migration: MigrationPolicy,
        ha: HaConfig,
        clock: Clock,
    ) -> Result<Arc<Self>, StoreError> {
        let ha = ha::Ha::start(&store, &clock, ha, policy.heartbeat_interval)?;
        let sessions = sessions::Sessions::start(&store, &clock)?;
        let (actions, action_rx) = view::ActionQueue::new();
        let fleet = Arc::new(Self {
            placer: vms::Placer::new(scheduler_policy),
            bus: crate::bus::Bus::new(clock.clone()),
            store,
            clock,
            ca,
            policy,
            migration,
            metrics: std::sync::OnceLock::new(),
            burst: std::sync::OnceLock::new(),
            sessions,
            ha,
            actions,
        });
        tokio::spawn(view::run_actions(Arc::downgrade(&fleet), action_rx));
        Ok(fleet)
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

    /// The fleet CA certificate (DER).
    pub fn ca_der(&self) -> &[u8] {
        self.ca.cert_der().as_ref()
    }

    /// Attaches the burst side (once, at start).
    pub fn set_burst(&self, b: Arc<crate::burst::Shared>) {
        let _ = self.burst.set(b);
    }

    /// The burst side, once attached.
    pub fn burst(&self) -> Option<&Arc<crate::burst::Shared>> {
        self.burst.get()
    }

    /// The server's one clock (monotonic and wall time).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Builds the desired-state message for a host.
pub fn desired_message(d: DesiredRecord) -> ServerMessage {
    ServerMessage::DesiredState(DesiredState {
        generation: d.generation,
        vms: d.vms,
        migrating: d.migrating,
        departed: d.departed,
    })
}

/// A VM as an operator asks for it on a host (the API's request, checked).
#[derive(Debug, Clone)]
pub struct VmRequest {
    /// Its id; kept from an earlier request with the same name, or new.
    pub id: Option<VmId>,
    /// The spec.
    pub spec: VmSpec,
    /// The power state.
    pub power: Power,
}

/// A request to create a VM (the API's request, checked).
#[derive(Debug, Clone)]
pub struct CreateVm {
    /// The spec.
    pub spec: VmSpec,
    /// The power state.
    pub power: Power,
    /// Placement rules.
    pub placement: PlacementRules,
}

/// A VM with its observed state.
#[derive(Debug, Clone)]
pub struct VmView {
    /// The stored VM.
    pub record: VmRecord,
    /// What its host last reported of it (absent while unknown).
    pub observed: Option<novacron_shared::protocol::VmObserved>,
    /// HA VMs (and VMs lost with a fenced host): HA history and state.
    pub ha: Option<VmHaView>,
    /// Burst VMs: the cloud side (instance, state, cost).
    pub cloud: Option<crate::store::CloudRecord>,
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
        shared_storage: None,
        disk_locks: None,
    }
}

/// A host's VMs: what should be, what is, and what the agent last said.
#[derive(Debug, Clone)]
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

/// A host's record merged with its live session, for the API.
#[derive(Debug, Clone)]
pub struct HostView {
    /// The stored record.
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
    /// Its HA lease, as the last tick of the lease view reported it (None
    /// for a host the view does not track: revoked).
    pub lease: Option<crate::ha::lease::HostState>,
    /// The shared storage its agent reports (while connected).
    pub shared_storage: Option<String>,
    /// The disk lock space its agent reports (while connected).
    pub disk_locks: Option<String>,
}

/// A VM's HA history and, while its host is fenced, its state.
#[derive(Debug, Clone)]
pub struct VmHaView {
    /// Restarts so far and the latest.
    pub history: crate::store::HaVmRecord,
    /// Restarting, waiting or lost (while its host is fenced).
    pub status: Option<ha::VmHa>,
    /// Restarted, its start waiting on its disk lock.
    pub lock_wait: Option<ha::LockWait>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
