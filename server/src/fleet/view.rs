//! The read-only fleet view controllers read, and the action channel they
//! write to.
//!
//! A controller (the HA controller; the burst broker and the alert
//! evaluator next) takes a [`FleetView`] snapshot — hosts with liveness,
//! lease state, capacity, cordon, labels, shared storage and whether they
//! are reconciled; VMs with placement, HA options and epoch — decides, and
//! submits [`Action`]s through an [`ActionSender`]. One task runs the
//! actions through the fleet's public operations, so a controller never
//! holds a lock of the fleet or reaches into a part's state.
//!
//! Owns: the action queue. Must not touch: any part's state but through
//! [`Fleet`]'s methods.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use novacron_shared::ids::{HostId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::protocol::{Capacity, VmState};
use novacron_shared::spec::Power;
use tokio::sync::{mpsc, oneshot};

use super::{Fleet, HaError, VmError};
use crate::ha::lease::HostState as LeaseState;
use crate::store::{HostState, OperationRecord, StoreError, VmRecord};

/// Actions queued before submitters wait.
const ACTION_QUEUE: usize = 256;

/// One host, as controllers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSnapshot {
    /// Its id.
    pub id: HostId,
    /// Its name.
    pub name: String,
    /// Its stored state.
    pub state: HostState,
    /// How long its agent has been silent, while a session is open (None:
    /// no session).
    pub silent_for: Option<Duration>,
    /// What it offers (live inventory, else the stored record).
    pub capacity: Capacity,
    /// Cordoned: no new VMs.
    pub cordoned: bool,
    /// Its agent's labels (empty while disconnected).
    pub labels: BTreeMap<String, String>,
    /// Its lease state, as the last lease tick reported it.
    pub lease: LeaseState,
    /// The shared storage its agent reports (None: none, or disconnected).
    pub shared_storage: Option<String>,
    /// A session is open, its latest reconcile report answers the host's
    /// current desired generation and is converged, and its latest
    /// inventory shows none of the VMs that departed from it.
    pub reconciled: bool,
}

impl HostSnapshot {
    /// Whether a session is open.
    pub fn connected(&self) -> bool {
        self.silent_for.is_some()
    }
}

/// One VM, as controllers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSnapshot {
    /// Its id.
    pub id: VmId,
    /// Its name.
    pub name: String,
    /// Where it is placed.
    pub placement: Placement,
    /// The power state asked for.
    pub power: Power,
    /// Its state in its host's latest inventory.
    pub observed: Option<VmState>,
    /// The target of a live migration under way.
    pub migrating_to: Option<HostId>,
    /// Restarted elsewhere when its host is fenced.
    pub ha: bool,
    /// Higher restarts first.
    pub ha_priority: u8,
    /// Recreated from its template on restart (its disks are not kept).
    pub ephemeral: bool,
    /// It has disks.
    pub has_disks: bool,
    /// Raised by one on every restart elsewhere.
    pub epoch: u64,
    /// Created, Unix ms.
    pub created_ms: u64,
}

/// A snapshot of the fleet at one moment.
#[derive(Debug, Clone)]
pub struct FleetView {
    /// When it was taken (monotonic).
    pub at: Instant,
    /// When it was taken, Unix ms.
    pub at_ms: u64,
    /// Every host, by id.
    pub hosts: Vec<HostSnapshot>,
    /// Every VM, by id.
    pub vms: Vec<VmSnapshot>,
}

impl FleetView {
    /// One host.
    pub fn host(&self, id: HostId) -> Option<&HostSnapshot> {
        self.hosts.iter().find(|h| h.id == id)
    }

    /// The VMs placed on `host`.
    pub fn vms_on(&self, host: HostId) -> impl Iterator<Item = &VmSnapshot> {
        self.vms.iter().filter(move |v| v.placement.host() == Some(host))
    }
}

/// What a controller asks the fleet to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Live-migrate a VM (to the scheduler's choice when `target` is None).
    Migrate {
        /// The VM.
        vm: VmId,
        /// Where to.
        target: Option<HostId>,
    },
    /// Cordon a host and migrate its VMs away.
    Drain {
        /// The host.
        host: HostId,
    },
    /// Cordon or uncordon a host.
    Cordon {
        /// The host.
        host: HostId,
        /// Cordoned or not.
        cordoned: bool,
    },
    /// Change a VM's power state.
    SetPower {
        /// The VM.
        vm: VmId,
        /// The state.
        power: Power,
    },
    /// Restart an HA VM of a fenced host elsewhere, if it is still on
    /// `from` at `epoch` (see [`Fleet::restart_vm`]).
    Restart {
        /// The VM.
        vm: VmId,
        /// The fenced host it is on.
        from: HostId,
        /// The epoch the controller saw.
        epoch: u64,
    },
    /// A returning host reconciled: clear its departed VMs, let it get a
    /// lease again (see [`Fleet::returned_clean`]).
    ReturnedClean {
        /// The host.
        host: HostId,
    },
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An operation started.
    Operation(Box<OperationRecord>),
    /// A VM changed.
    Vm(Box<VmRecord>),
    /// A host's cordon was set.
    Cordoned,
    /// A returning host was cleared.
    Returned,
}

/// An action was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The fleet is shutting down.
    #[error("the fleet is shutting down")]
    Stopped,
    /// No such host.
    #[error("no host with id {0}")]
    UnknownHost(HostId),
    /// The fleet refused it.
    #[error(transparent)]
    Refused(#[from] VmError),
    /// The HA part refused it.
    #[error(transparent)]
    Ha(#[from] HaError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An action waiting to run, with where its outcome goes.
pub(super) struct Submitted {
    action: Action,
    actor: String,
    reply: oneshot::Sender<Result<Outcome, ActionError>>,
}

/// The fleet's side of the action channel.
pub(super) struct ActionQueue {
    tx: mpsc::Sender<Submitted>,
}

/// Where controllers submit actions.
#[derive(Clone, Debug)]
pub struct ActionSender {
    tx: mpsc::Sender<Submitted>,
}

impl std::fmt::Debug for Submitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitted")
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

impl ActionQueue {
    /// A queue and the receiver [`run_actions`] takes.
    pub(super) fn new() -> (Self, mpsc::Receiver<Submitted>) {
        let (tx, rx) = mpsc::channel(ACTION_QUEUE);
        (Self { tx }, rx)
    }
}

impl ActionSender {
    /// Submits `action` on behalf of `actor` (a controller's name, for the
    /// operation log) and waits for how it ended.
    pub async fn submit(&self, action: Action, actor: &str) -> Result<Outcome, ActionError> {
        let (reply, rx) = oneshot::channel();
        let s = Submitted {
            action,
            actor: actor.to_string(),
            reply,
        };
        self.tx.send(s).await.map_err(|_| ActionError::Stopped)?;
        rx.await.map_err(|_| ActionError::Stopped)?
    }
}

/// Runs submitted actions, one at a time, until the fleet is gone.
pub(super) async fn run_actions(fleet: Weak<Fleet>, mut rx: mpsc::Receiver<Submitted>) {
    while let Some(s) = rx.recv().await {
        let Some(f) = fleet.upgrade() else { return };
        let r = apply(&f, s.action, &s.actor);
        let _ = s.reply.send(r);
    }
}

fn apply(f: &Arc<Fleet>, action: Action, actor: &str) -> Result<Outcome, ActionError> {
    Ok(match action {
        Action::Migrate { vm, target } => Outcome::Operation(Box::new(f.migrate(vm, target, actor)?)),
        Action::Drain { host } => Outcome::Operation(Box::new(f.drain(host, actor)?)),
        Action::Cordon { host, cordoned } => {
            if !f.set_cordon(host, cordoned)? {
                return Err(ActionError::UnknownHost(host));
            }
            Outcome::Cordoned
        }
        Action::SetPower { vm, power } => Outcome::Vm(Box::new(f.set_power(vm, power)?)),
        Action::Restart { vm, from, epoch } => Outcome::Vm(Box::new(f.restart_vm(vm, from, epoch)?)),
        Action::ReturnedClean { host } => {
            f.returned_clean(host)?;
            Outcome::Returned
        }
    })
}

impl Fleet {
    /// A snapshot of the fleet for controllers.
    pub fn view(&self) -> Result<FleetView, StoreError> {
        self.view_of(true)
    }

    /// The hosts only (`vms` empty): what a controller needs while no host
    /// is fenced, without reading every VM.
    pub fn view_hosts(&self) -> Result<FleetView, StoreError> {
        self.view_of(false)
    }

    fn view_of(&self, with_vms: bool) -> Result<FleetView, StoreError> {
        let at = self.clock.now();
        let at_ms = self.clock.unix_ms();
        let cordons = self.store.cordons()?;
        let generations = self.store.generations()?;
        let departed = self.store.all_departed()?;
        let sessions = self.live_sessions();
        let leases = self.lease_states();
        let migrating: HashMap<VmId, HostId> = self
            .store
            .migrations()?
            .into_iter()
            .map(|c| (c.vm, c.target))
            .collect();
        let hosts = self
            .store
            .hosts()?
            .into_iter()
            .map(|h| {
                let live = sessions.get(&h.id);
                let inv = live.and_then(|s| s.capacity_labels());
                let reconciled = live.is_some_and(|s| {
                    let generation = generations.get(&h.id).copied().unwrap_or(0);
                    let gone = departed.get(&h.id).map_or(&[][..], Vec::as_slice);
                    s.reconciled(generation, gone)
                });
                HostSnapshot {
                    id: h.id,
                    name: h.name,
                    state: h.state,
                    silent_for: live.map(|s| s.liveness().silent_for(at)),
                    capacity: inv.as_ref().map_or(h.capacity, |i| i.0),
                    cordoned: cordons.contains(&h.id),
                    labels: inv.map(|i| i.1).unwrap_or_default(),
                    lease: leases.get(&h.id).copied().unwrap_or(LeaseState::Suspect),
                    shared_storage: live.and_then(|s| s.shared_storage()),
                    reconciled,
                }
            })
            .collect();
        let mut vms = Vec::new();
        let mut after = None;
        loop {
            if !with_vms {
                break;
            }
            let page = self.store.vms(after, 4096)?;
            let Some(last) = page.last() else { break };
            after = Some(last.vm.id);
            for r in page {
                let observed = r
                    .host()
                    .and_then(|h| sessions.get(&h))
                    .and_then(|s| s.vm_state(r.vm.id));
                vms.push(VmSnapshot {
                    id: r.vm.id,
                    migrating_to: migrating.get(&r.vm.id).copied(),
                    ha: r.vm.spec.ha,
                    ha_priority: r.vm.spec.ha_priority,
                    ephemeral: r.vm.spec.ephemeral,
                    has_disks: !r.vm.spec.disks.is_empty(),
                    epoch: r.vm.epoch,
                    created_ms: r.created_ms,
                    name: r.vm.spec.name,
                    placement: r.placement,
                    power: r.vm.power,
                    observed,
                });
            }
        }
        Ok(FleetView {
            at,
            at_ms,
            hosts,
            vms,
        })
    }

    /// Where controllers submit actions.
    pub fn actions(&self) -> ActionSender {
        ActionSender {
            tx: self.actions.tx.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::VmRequest;
    use crate::store::{HostRecord, Store};
    use novacron_shared::clock::Clock;
    use novacron_shared::spec::VmSpec;

    fn host(id: u128) -> HostRecord {
        HostRecord {
            id: HostId(id),
            name: format!("h{id}"),
            addresses: vec![],
            capacity: Capacity {
                cpus: 8,
                memory_mib: 8192,
                ..Capacity::default()
            },
            agent_version: "0".into(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            state: HostState::Offline,
            cert_serial: format!("{id:x}"),
            cert_not_after: 0,
        }
    }

    #[tokio::test]
    async fn controllers_read_the_view_and_act_through_the_channel() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store.put_hosts(&[host(1), host(2)]).unwrap();
        let (clock, _) = Clock::manual();
        let (ca, _) =
            novacron_shared::pki::FleetCa::generate("t", clock.wall(), Duration::from_secs(3600)).unwrap();
        let fleet = Fleet::new(
            store,
            ca,
            crate::config::AgentPolicy::default(),
            crate::scheduler::Policy::default(),
            crate::config::MigrationPolicy::default(),
            clock,
        )
        .unwrap();
        fleet
            .set_desired(
                HostId(1),
                vec![VmRequest {
                    id: None,
                    spec: VmSpec::minimal("web", 1, 64),
                    power: Power::Running,
                }],
            )
            .unwrap();
        let v = fleet.view().unwrap();
        assert_eq!(v.hosts.len(), 2);
        let h1 = v.host(HostId(1)).unwrap();
        assert!(!h1.connected() && !h1.cordoned);
        assert_eq!(h1.capacity.cpus, 8);
        let on1: Vec<_> = v.vms_on(HostId(1)).collect();
        assert_eq!(on1.len(), 1);
        assert_eq!(on1[0].name, "web");
        assert_eq!(on1[0].placement, Placement::Host(HostId(1)));
        assert_eq!((on1[0].observed, on1[0].migrating_to), (None, None));

        let actions = fleet.actions();
        let r = actions
            .submit(
                Action::Cordon {
                    host: HostId(2),
                    cordoned: true,
                },
                "test",
            )
            .await
            .unwrap();
        assert_eq!(r, Outcome::Cordoned);
        assert!(fleet.view().unwrap().host(HostId(2)).unwrap().cordoned);
        let vm = on1[0].id;
        let r = actions
            .submit(
                Action::SetPower {
                    vm,
                    power: Power::Stopped,
                },
                "test",
            )
            .await
            .unwrap();
        assert!(matches!(r, Outcome::Vm(rec) if rec.vm.power == Power::Stopped));
        // Refusals come back as errors, not as silence.
        let r = actions.submit(Action::Migrate { vm, target: None }, "test").await;
        assert!(
            matches!(r, Err(ActionError::Refused(VmError::NotConnected(_)))),
            "{r:?}"
        );
        let r = actions
            .submit(
                Action::Cordon {
                    host: HostId(9),
                    cordoned: true,
                },
                "test",
            )
            .await;
        assert!(matches!(r, Err(ActionError::UnknownHost(HostId(9)))));
    }
}
