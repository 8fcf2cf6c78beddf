//! High availability in the fleet: the one [`HostLeases`] that the session
//! part feeds and the HA driver ticks, the HA status the driver publishes
//! for the API, and the fleet operations HA needs (restart a VM elsewhere,
//! a returning host reconciled, maintenance).
//!
//! # The lease lock
//!
//! One `Mutex<HostLeases>`, touched only here: the session loop records
//! every frame with `Fleet::ha_heard` and, under the same lock, decides
//! whether a heartbeat may be acknowledged ([`HostLeases::may_ack`]); the
//! driver calls [`Fleet::tick_leases`]. So no ack can renew the lease of a
//! host that a tick at that instant would declare fenced, and a host
//! declared fenced gets no ack until [`Fleet::returned_clean`] (which the
//! HA controller asks for once the host is reconciled). The store keeps
//! the must-return and maintenance flags, so a restarted server withholds
//! the same acks.
//!
//! `[ha] enabled = false` changes none of this: only the driver restarts
//! nothing.
//!
//! The witness terms pushed to agents live in [`witness`]
//! (`fleet/ha/witness.rs`).
//!
//! Owns: the lease view, the HA status, the release requests and the
//! witness addresses and terms sent. Must not
//! touch: session state but through the session part's methods, placement
//! but through the `Placer`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use novacron_shared::clock::Clock;
use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::placement::Placement;
use tokio::sync::watch;

use super::{lock, request_for, Fleet, VmError};
use crate::config::HaConfig;
use crate::ha::lease::{HostLeases, HostState, LeaseError, Loss, Restored, Transition};
use crate::scheduler::SharedStorageNeed;
use crate::store::{
    HostState as StoredState, RestartCommit, RestartRefusal, ReturnRefusal, Store, StoreError, VmRecord,
};
use crate::telemetry::{RestartOutcome, TELEMETRY};

/// An HA operation on a host failed.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// No such host.
    #[error("no host with id {0}")]
    UnknownHost(HostId),
    /// The host's agent has not reconciled to its current desired state
    /// (or holds a VM that departed from it).
    #[error("host {0} is not reconciled to its desired state yet")]
    NotReconciled(HostId),
    /// The lease view refused it (e.g. the host is not returning).
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The store failed.
    #[error("could not record the HA state")]
    Store(#[from] StoreError),
}

/// The server is *held*: it suspects its own network and restarts nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Since when, Unix ms.
    pub since_ms: u64,
    /// Hosts silent when it was entered (or now).
    pub silent: usize,
    /// Hosts the guard watches.
    pub monitored: usize,
}

/// Where an HA VM of a fenced host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmHaState {
    /// Being placed and started elsewhere.
    Restarting,
    /// Not restarted yet (no host fits, held, a migration to resolve).
    Waiting,
    /// Not HA: reported lost with its host, never moved.
    Lost,
}

/// One VM's HA state, as the driver last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHa {
    /// Its state.
    pub state: VmHaState,
    /// Why, for people (the scheduler's reasons when nothing fits).
    pub why: String,
    /// Since when, Unix ms.
    pub since_ms: u64,
}

/// A host's hardware fence, as the driver last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFence {
    /// Where it stands.
    pub state: crate::ha::fence::FenceStatus,
    /// The last attempt's error.
    pub error: Option<String>,
}

/// A restarted HA VM whose start waits on its disk lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockWait {
    /// The host it waits on (its new host).
    pub host: HostId,
    /// Since when, Unix ms.
    pub since_ms: u64,
}

impl LockWait {
    /// For people.
    pub fn describe(&self) -> String {
        format!("disk lock held (on host {})", self.host)
    }
}

/// The witness terms last pushed to agents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WitnessStatus {
    /// The peer witness is on (`[ha.witness] enabled`).
    pub enabled: bool,
    /// The quorum pushed (for the monitored hosts then).
    pub quorum: u32,
    /// Hosts reporting a witness address (peers pushed to each other).
    pub peers: usize,
    /// Terms pushed since the server started.
    pub pushes: u64,
}

/// The HA driver's report for the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaStatus {
    /// Set while the server is held.
    pub held: Option<Held>,
    /// Leaving held: fenced hosts are released one at a time.
    pub releasing: bool,
    /// VMs of fenced hosts, by id.
    pub vms: BTreeMap<VmId, VmHa>,
    /// Hosts whose hardware fence is not idle, by id.
    pub fences: BTreeMap<HostId, HostFence>,
    /// Restarted VMs waiting on a disk lock, by id.
    pub lock_waits: BTreeMap<VmId, LockWait>,
}

/// The HA part's state.
pub(super) struct Ha {
    config: HaConfig,
    leases: Mutex<HostLeases>,
    changes: watch::Sender<u64>,
    status: Mutex<HaStatus>,
    releases: watch::Sender<u64>,
    /// Hosts declared fenced whose must-return flag is not stored yet
    /// (retried at every tick; a restart needs the stored flag).
    unstored: Mutex<std::collections::BTreeSet<HostId>>,
    /// The peer witness's addresses and the terms sent.
    witness: Mutex<witness::Witness>,
    /// Each host's disk lock space, as its latest inventory in this run
    /// reported it (kept while it is silent: its VMs restart within it).
    lock_spaces: Mutex<BTreeMap<HostId, String>>,
}

impl Ha {
    /// The lease view of a server starting now: every known host (not
    /// revoked) with the flags the store kept, and a start grace of at least
    /// the fence wait of the longest terms ever granted (recorded before any
    /// session can be granted these).
    pub(super) fn start(
        store: &Store,
        clock: &Clock,
        config: HaConfig,
        heartbeat_interval: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let max = store.raise_ha_terms(config.timing())?;
        let mut policy = config.policy(heartbeat_interval);
        policy.start_grace = policy.start_grace.max(max.fenced_after());
        let flags: BTreeMap<HostId, crate::store::HaHostRecord> = store.ha_hosts()?.into_iter().collect();
        let known: Vec<(HostId, Restored)> = store
            .hosts()?
            .into_iter()
            .filter(|h| h.state != StoredState::Revoked)
            .map(|h| {
                let f = flags.get(&h.id).copied().unwrap_or_default();
                (
                    h.id,
                    Restored {
                        maintenance: f.maintenance,
                        must_return: f.must_return,
                    },
                )
            })
            .collect();
        Ok(Self {
            config,
            leases: Mutex::new(HostLeases::restored(policy, known, clock.now())),
            changes: watch::channel(0).0,
            status: Mutex::new(HaStatus::default()),
            releases: watch::channel(0).0,
            unstored: Mutex::new(std::collections::BTreeSet::new()),
            witness: Mutex::new(witness::Witness::default()),
            lock_spaces: Mutex::new(BTreeMap::new()),
        })
    }
}

impl Fleet {
    /// The `[ha]` config.
    pub fn ha_config(&self) -> &HaConfig {
        &self.ha.config
    }

    /// Derives every host's lease state at `now` and returns the changes.
    /// A host newly declared fenced is stored as one that must return
    /// before this returns; if that fails, the error is returned, the
    /// flag is written again at the next tick, and no restart from that
    /// host commits until it is stored.
    pub fn tick_leases(&self, now: Instant) -> Result<Vec<Transition>, StoreError> {
        let moves = lock(&self.ha.leases).tick(now);
        let fenced: Vec<HostId> = {
            let mut unstored = lock(&self.ha.unstored);
            unstored.extend(moves.iter().filter(|t| t.to == HostState::Fenced).map(|t| t.host));
            unstored.iter().copied().collect()
        };
        if !fenced.is_empty() {
            self.store.update_ha_hosts(&fenced, |r| r.must_return = true)?;
            let mut unstored = lock(&self.ha.unstored);
            for h in &fenced {
                unstored.remove(h);
            }
        }
        let expired = |s: HostState| matches!(s, HostState::LeaseExpired | HostState::Fenced);
        for t in &moves {
            if expired(t.to) && !expired(t.from) {
                TELEMETRY.ha_lease_expiries.inc();
            }
        }
        Ok(moves)
    }

    /// When the next lease tick can have news (None: nothing is timed).
    pub fn next_lease_tick(&self, now: Instant) -> Option<Instant> {
        lock(&self.ha.leases).next_tick(now)
    }

    /// The lease state the last tick reported for `host`.
    pub fn lease_state(&self, host: HostId) -> Option<HostState> {
        lock(&self.ha.leases).state(host)
    }

    /// Every host's lease state, as the last tick reported it.
    pub fn lease_states(&self) -> std::collections::HashMap<HostId, HostState> {
        lock(&self.ha.leases).hosts().collect()
    }

    /// Every host's lease loss at `now` (under way, or the last one).
    pub fn lease_losses(&self, now: Instant) -> std::collections::HashMap<HostId, Loss> {
        let l = lock(&self.ha.leases);
        let ids: Vec<HostId> = l.hosts().map(|(h, _)| h).collect();
        ids.into_iter()
            .filter_map(|h| l.loss(h, now).map(|x| (h, x)))
            .collect()
    }

    /// `host`'s hardware fence confirmed it off at `at`: fenced at once.
    pub fn fence_confirmed_off(&self, host: HostId, at: Instant) -> Result<(), HaError> {
        lock(&self.ha.leases).confirmed_off(host, at)?;
        self.bump_lease_changes();
        Ok(())
    }

    /// When a frame from `host` last arrived in this run.
    pub fn lease_last_heard(&self, host: HostId) -> Option<Instant> {
        lock(&self.ha.leases).last_heard(host)
    }

    /// Changes on every connect, disconnect, reconcile report, inventory
    /// and maintenance change: the HA driver's cue to look again.
    pub fn lease_changes(&self) -> watch::Receiver<u64> {
        self.ha.changes.subscribe()
    }

    /// Replaces the HA status the API shows (the driver's report).
    pub fn publish_ha_status(&self, status: HaStatus) {
        *lock(&self.ha.status) = status;
    }

    /// The HA status the driver last published.
    pub fn ha_status(&self) -> HaStatus {
        lock(&self.ha.status).clone()
    }

    /// An operator asks the server to leave *held* now.
    pub fn request_release(&self) {
        self.ha.releases.send_modify(|n| *n += 1);
    }

    /// Changes on every [`Fleet::request_release`].
    pub fn release_requests(&self) -> watch::Receiver<u64> {
        self.ha.releases.subscribe()
    }

    /// Puts `host` into maintenance (never fenced while in it) or takes it
    /// out; persisted, so a restarted server keeps it.
    pub fn set_maintenance(&self, host: HostId, on: bool) -> Result<(), HaError> {
        let known = self.store.update_ha_hosts(&[host], |r| r.maintenance = on)?;
        if known.is_empty() {
            return Err(HaError::UnknownHost(host));
        }
        {
            let mut l = lock(&self.ha.leases);
            // Enrolled while the server runs and never heard yet.
            l.track(host);
            l.set_maintenance(host, on)?;
        }
        let what = if on {
            "in maintenance"
        } else {
            "out of maintenance"
        };
        self.bus.ha(Some(host), None, format!("host {host} {what}"));
        self.bump_lease_changes();
        // The monitored hosts changed: so may the quorum.
        self.push_witness_terms();
        Ok(())
    }

    /// The returning `host` reconciled (the VMs that moved are gone from
    /// it): its departed list is cleared and it may get a lease again.
    /// Checked again here, against its live session: its latest reconcile
    /// report answers its current desired generation and is converged, and
    /// its latest inventory holds none of its departed VMs.
    pub fn returned_clean(&self, host: HostId) -> Result<(), HaError> {
        let desired = self.store.desired(host)?.unwrap_or_default();
        let reconciled = self
            .live(host)
            .is_some_and(|s| s.reconciled(desired.generation, &desired.departed));
        if !reconciled {
            return Err(HaError::NotReconciled(host));
        }
        self.clear_returned(host, desired.generation)
    }

    /// [`Fleet::returned_clean`] once the host is known to be reconciled to
    /// desired generation `generation`.
    fn clear_returned(&self, host: HostId, generation: u64) -> Result<(), HaError> {
        match lock(&self.ha.leases).state(host) {
            None => return Err(HaError::UnknownHost(host)),
            Some(HostState::Returning) => {}
            Some(state) => return Err(LeaseError::NotReturning { host, state }.into()),
        }
        // Stored first, and only if no VM left the host since it reconciled:
        // a crash after this leaves the host cleared in the store (and so in
        // the leases after the restart); before it, returning in both.
        let desired = match self.store.returned_clean(host, generation)? {
            Ok(d) => d,
            Err(ReturnRefusal::UnknownHost(h)) => return Err(HaError::UnknownHost(h)),
            Err(ReturnRefusal::Changed { .. }) => return Err(HaError::NotReconciled(host)),
        };
        lock(&self.ha.leases).returned_clean(host)?;
        self.push_desired(host, desired);
        self.bus
            .ha(Some(host), None, format!("host {host} returned clean"));
        self.bump_lease_changes();
        Ok(())
    }

    /// Restarts HA VM `vm` of fenced host `from` elsewhere, if it is still
    /// there at `epoch` and not migrating: placed through the scheduler on
    /// an online host (and, for disks on shared storage, one reporting the
    /// same storage), its epoch raised, recorded as departed from `from`,
    /// all in one store transaction; then both hosts are told.
    pub fn restart_vm(&self, vm: VmId, from: HostId, epoch: u64) -> Result<VmRecord, VmError> {
        let hosts = self.candidate_hosts()?;
        self.restart_among(vm, from, epoch, hosts)
    }

    /// [`Fleet::restart_vm`] among `hosts` (the fleet's candidate hosts;
    /// any host whose lease is not online counts as down).
    fn restart_among(
        &self,
        vm: VmId,
        from: HostId,
        epoch: u64,
        mut hosts: Vec<crate::scheduler::Host>,
    ) -> Result<VmRecord, VmError> {
        let stale = VmError::Stale;
        let rec = self.store.vm(vm)?.ok_or(VmError::NotFound(vm))?;
        if !rec.vm.spec.ha {
            return Err(VmError::Invalid(format!(
                "VM {} is not HA: it is reported lost with its host, never restarted elsewhere",
                rec.vm.spec.name
            )));
        }
        if rec.placement != Placement::Host(from) {
            return Err(stale(RestartRefusal::Moved {
                from,
                now: rec.placement,
            }));
        }
        if rec.vm.epoch != epoch {
            return Err(stale(RestartRefusal::Epoch {
                expected: epoch,
                now: rec.vm.epoch,
            }));
        }
        if let Some(m) = self.store.migration(vm)? {
            return Err(stale(RestartRefusal::Migrating(m.op)));
        }
        if !lock(&self.ha.leases).must_return(from) {
            return Err(stale(RestartRefusal::NotFenced(from)));
        }
        let on_shared = !rec.vm.spec.ephemeral && !rec.vm.spec.disks.is_empty();
        let mut req = request_for(&rec.vm.spec, &rec.rules);
        let pool = if on_shared {
            self.store.ha_vm(vm)?.and_then(|h| h.shared_storage)
        } else {
            None
        };
        if on_shared {
            req.shared_storage = Some(
                pool.clone()
                    .map_or(SharedStorageNeed::Any, SharedStorageNeed::Same),
            );
        }
        if self.ha.config.disk_locks {
            // Within the old host's lock space, so the new start waits on
            // the lock while the old copy may run (keep-running). Not
            // known in this run (the host never reported since the server
            // started): the lock space is the pool the disks are on.
            let space = lock(&self.ha.lock_spaces).get(&from).cloned().or(pool);
            req.disk_locks = Some(space.map_or(SharedStorageNeed::Any, SharedStorageNeed::Same));
        }
        {
            let l = lock(&self.ha.leases);
            for h in &mut hosts {
                h.up = h.up && l.state(h.id) == Some(HostState::Online);
            }
        }
        let op_id = OpId::random();
        let placed = self
            .placer
            .place_and_reserve(&self.store, hosts.clone(), &req, |to| {
                let mut moved = rec.clone();
                moved.placement = Placement::Host(to);
                moved.vm.epoch += 1;
                moved.vm.op_id = op_id;
                (moved, None)
            })?;
        let to = match placed {
            Ok((to, _)) => to,
            Err(no_fit) => {
                TELEMETRY
                    .ha_restarts
                    .with_label_values(&[RestartOutcome::NoFit.as_str()])
                    .inc();
                return Err(VmError::NoFit(no_fit));
            }
        };
        let commit = RestartCommit {
            vm,
            from,
            epoch,
            to,
            op_id,
            keep_disks: on_shared,
            shared_storage: hosts
                .iter()
                .find(|h| h.id == to)
                .and_then(|h| h.shared_storage.clone()),
            now_ms: self.clock.unix_ms(),
        };
        let done = match self.store.restart_vm(&commit) {
            Ok(Ok(done)) => {
                self.placer.confirm(vm);
                done
            }
            Ok(Err(refusal)) => {
                self.placer.unreserve_moved(vm);
                return Err(stale(refusal));
            }
            Err(e) => {
                self.placer.unreserve_moved(vm);
                return Err(e.into());
            }
        };
        TELEMETRY
            .ha_restarts
            .with_label_values(&[RestartOutcome::Placed.as_str()])
            .inc();
        if let Some(last) = self.lease_last_heard(from) {
            TELEMETRY
                .ha_restart_seconds
                .observe(self.clock.now().saturating_duration_since(last).as_secs_f64());
        }
        let name = &done.record.vm.spec.name;
        tracing::info!(vm = %name, id = %vm, from = %from, to = %to, epoch = done.record.vm.epoch, "HA VM restarted elsewhere");
        self.bus.ha(
            Some(to),
            Some(vm),
            format!(
                "HA VM {name} restarted on host {to} (host {from} fenced), epoch {}",
                done.record.vm.epoch
            ),
        );
        self.push_desired(to, done.to);
        self.push_desired(from, done.from);
        Ok(done.record)
    }

    /// `host`'s inventory reported disk lock space `space`.
    pub(super) fn note_lock_space(&self, host: HostId, space: Option<String>) {
        let mut l = lock(&self.ha.lock_spaces);
        match space {
            Some(s) => {
                l.insert(host, s);
            }
            None => {
                l.remove(&host);
            }
        }
    }

    /// Bumps [`Fleet::lease_changes`].
    pub(super) fn bump_lease_changes(&self) {
        self.ha.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// `host` opened a session at `now`.
    pub(super) fn ha_connected(&self, host: HostId, now: Instant) {
        self.witness_session_opens(host);
        lock(&self.ha.leases).connected(host, now);
        self.bump_lease_changes();
        // A host new to this run changes the fleet the quorum counts.
        self.push_witness_terms();
    }

    /// A frame from `host` arrived at `now` (`lease_left`: a heartbeat,
    /// with the lease it reported): recorded, then (under the same lock)
    /// whether a heartbeat in it may be acknowledged.
    /// A host the leases do not track (forgotten at revocation while its
    /// session closes) is not tracked again, and gets no ack.
    pub(super) fn ha_heard(
        &self,
        host: HostId,
        now: Instant,
        lease_left: Option<Option<std::time::Duration>>,
    ) -> bool {
        let mut l = lock(&self.ha.leases);
        if l.state(host).is_none() {
            return false;
        }
        match lease_left {
            Some(left) => l.heartbeat(host, now, left),
            None => l.heard(host, now),
        }
        l.may_ack(host, now)
    }

    /// `host`'s current session closed at `now`.
    pub(super) fn ha_disconnected(&self, host: HostId, now: Instant) {
        lock(&self.ha.leases).disconnected(host, now);
        self.bump_lease_changes();
    }

    /// `host` was revoked: no longer tracked.
    pub(super) fn ha_forget(&self, host: HostId) {
        let _ = lock(&self.ha.leases).forget(host);
        self.bump_lease_changes();
        self.witness_forget(host);
    }
}

#[cfg(test)]
mod tests;
mod witness;
