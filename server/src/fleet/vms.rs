//! VMs: desired state, placement and the usage index.
//!
//! A placement runs under one lock (the `Placer`'s) that holds the
//! scheduler, the usage index and the reservations; it is never held across
//! a store commit. A new VM is reserved in the usage index under the lock,
//! committed outside it, and the reservation is confirmed after the commit or
//! rolled back when the commit fails; a rebuild of the index while a commit
//! is in flight counts the reservations again, so no placement can see a
//! host emptier than it is.
//!
//! Owns: the scheduler, the usage index and the reservations. Must not
//! touch: live sessions (it reads them through [`Fleet::live`]) or
//! operations (migration reserves through the `Placer` like everyone else).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::spec::{DesiredVm, Power};

use super::usage::UsageIndex;
use super::{desired_message, lock, request_for, CreateVm, Fleet, HostVms, VmView};
use crate::scheduler;
use crate::store::{DesiredRecord, HostState, Store, StoreError, VmRecord};

pub mod desired;

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
    /// A restart planned from an older view: the VM changed since.
    #[error("restart refused: {0}")]
    Stale(crate::store::RestartRefusal),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The placement part's state, under one lock.
pub(super) struct Placer {
    state: Mutex<PlaceState>,
    policy: scheduler::Policy,
}

#[derive(Default)]
struct PlaceState {
    scheduler: scheduler::Scheduler,
    /// Built from the store on first use; dropped when something it cannot
    /// follow changes (a host's VMs replaced, a migration claimed or ended).
    usage: Option<UsageIndex>,
    /// Placed but not committed yet: the VM and the migration target it
    /// claims, counted in the index and re-counted when it is rebuilt.
    reserved: HashMap<VmId, (VmRecord, Option<HostId>)>,
}

impl PlaceState {
    fn usage(&mut self, store: &Store) -> Result<&mut UsageIndex, StoreError> {
        if self.usage.is_none() {
            let mut idx = UsageIndex::build(store)?;
            for (rec, to) in self.reserved.values() {
                idx.add(rec, *to);
            }
            self.usage = Some(idx);
        }
        Ok(self.usage.get_or_insert_with(UsageIndex::default))
    }
}

impl Placer {
    /// A placer with the given scheduling policy.
    pub(super) fn new(policy: scheduler::Policy) -> Self {
        Self {
            state: Mutex::new(PlaceState::default()),
            policy,
        }
    }

    /// Fills in what the VMs on each host claim.
    pub(super) fn fill_usage(&self, store: &Store, hosts: &mut [scheduler::Host]) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        let idx = st.usage(store)?;
        for h in hosts {
            (h.used, h.groups) = idx.of(h.id);
        }
        Ok(())
    }

    /// Under the lock: fills in usage, lets the scheduler choose among
    /// `hosts`, and reserves what `make(host)` returns there (and on the
    /// migration target `make` names). The caller commits, then calls
    /// [`Self::confirm`] or [`Self::release`].
    pub(super) fn place_and_reserve(
        &self,
        store: &Store,
        mut hosts: Vec<scheduler::Host>,
        req: &scheduler::Request,
        make: impl FnOnce(HostId) -> (VmRecord, Option<HostId>),
    ) -> Result<Result<(HostId, VmRecord), scheduler::NoFit>, StoreError> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let idx = st.usage(store)?;
        for h in &mut hosts {
            (h.used, h.groups) = idx.of(h.id);
        }
        let placed = st.scheduler.place(&self.policy, &hosts, req);
        crate::telemetry::TELEMETRY
            .scheduler_decisions
            .with_label_values(&[if placed.is_ok() { "placed" } else { "refused" }])
            .inc();
        let host = match placed {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        let (rec, to) = make(host);
        st.usage(store)?.add(&rec, to);
        st.reserved.insert(rec.vm.id, (rec.clone(), to));
        Ok(Ok((host, rec)))
    }

    /// The reserved VM was committed: the index (or the store, when the
    /// index is rebuilt) counts it from now on.
    pub(super) fn confirm(&self, id: VmId) {
        lock(&self.state).reserved.remove(&id);
    }

    /// The reserved VM's commit failed: its claim is rolled back.
    pub(super) fn release(&self, id: VmId) {
        let mut st = lock(&self.state);
        if let Some((_, to)) = st.reserved.remove(&id) {
            match (to, st.usage.as_mut()) {
                // A migration's VM stays counted on its source: rebuild.
                (Some(_), _) => st.usage = None,
                (None, Some(idx)) => idx.remove(id),
                (None, None) => {}
            }
        }
    }

    /// The commit of a reserved move of a stored VM (a restart) failed:
    /// the reservation counted it on its new host, so the index is built
    /// afresh from the store.
    pub(super) fn unreserve_moved(&self, id: VmId) {
        let mut st = lock(&self.state);
        st.reserved.remove(&id);
        st.usage = None;
    }

    /// A VM was deleted.
    pub(super) fn forget(&self, id: VmId) {
        if let Some(idx) = lock(&self.state).usage.as_mut() {
            idx.remove(id);
        }
    }

    /// Something the index cannot follow changed: rebuild it on next use.
    pub(super) fn invalidate(&self) {
        lock(&self.state).usage = None;
    }
}

impl Fleet {
    /// The hosts a placement may choose from, without usage: capacity,
    /// labels, cordons, liveness and measured load.
    pub(super) fn candidate_hosts(&self) -> Result<Vec<scheduler::Host>, StoreError> {
        let cordons = self.store.cordons()?;
        let sessions = self.live_sessions();
        Ok(self
            .store
            .hosts()?
            .into_iter()
            .filter(|h| h.state != HostState::Revoked)
            .map(|h| {
                let live = sessions.get(&h.id);
                let (capacity, labels) = live
                    .and_then(|s| s.capacity_labels())
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
                    shared_storage: live.and_then(|s| s.shared_storage()),
                    disk_locks: live.and_then(|s| s.disk_locks()),
                }
            })
            .collect())
    }

    /// The scheduler's view of the fleet: hosts with capacity, what their
    /// VMs claim, their groups, cordons and liveness.
    pub fn scheduler_hosts(&self) -> Result<Vec<scheduler::Host>, StoreError> {
        let mut hosts = self.candidate_hosts()?;
        self.placer.fill_usage(&self.store, &mut hosts)?;
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
        if self.store.vm_by_name(&req.spec.name)?.is_some() {
            return Err(VmError::NameTaken(req.spec.name));
        }
        let mut hosts = self.candidate_hosts()?;
        if let Some(pin) = req.placement.host {
            hosts.retain(|h| h.id == pin);
            if hosts.is_empty() {
                return Err(VmError::Invalid(format!("placement.host: no host with id {pin}")));
            }
        }
        let mut r = request_for(&req.spec, &req.placement);
        let on_shared = req.spec.ha && !req.spec.ephemeral && !req.spec.disks.is_empty();
        if on_shared {
            if !hosts.iter().any(|h| h.shared_storage.is_some()) {
                return Err(VmError::Invalid(format!(
                    "VM {:?} is HA with disks, but no host reports shared storage, so its disks could not \
                     follow it to another host: set vms.storage_shared = true in the agents' config \
                     (on a pool every host mounts at the same path), or make the VM ephemeral: true \
                     (recreated from its template on restart, losing its disks' contents)",
                    req.spec.name
                )));
            }
            r.shared_storage = Some(scheduler::SharedStorageNeed::Any);
        }
        if req.spec.ha && self.ha_config().disk_locks {
            // `[ha] disk_locks`: only hosts whose libvirt locks the disks.
            r.disk_locks = Some(scheduler::SharedStorageNeed::Any);
        }
        self.check_burst_rule(&req)?;
        let created_ms = self.clock.unix_ms();
        let record = |placement: Placement, req: CreateVm| VmRecord {
            vm: DesiredVm {
                id: VmId::random(),
                op_id: OpId::random(),
                spec: req.spec,
                power: req.power,
                epoch: 0,
            },
            placement,
            rules: req.placement,
            created_ms,
        };
        let waits = req.placement.wait || req.placement.burst.is_some();
        // The claim is reserved under the placement lock; the commit runs
        // outside it, so placements do not queue behind fsyncs.
        let keep = waits.then(|| req.clone());
        let placed = self.placer.place_and_reserve(&self.store, hosts, &r, |host| {
            (record(Placement::Host(host), req), None)
        })?;
        let rec = match placed {
            Ok((_, rec)) => rec,
            Err(nofit) => match keep {
                Some(req) => {
                    let pending = Placement::Pending {
                        reason: nofit.to_string(),
                    };
                    return self.store_pending(record(pending, req));
                }
                None => return Err(VmError::NoFit(nofit)),
            },
        };
        let committed = self.store.put_vm(&rec);
        let desired = match committed {
            Ok(Ok(d)) => {
                self.placer.confirm(rec.vm.id);
                d
            }
            Ok(Err(taken)) => {
                self.placer.release(rec.vm.id);
                return Err(VmError::NameTaken(taken.0));
            }
            Err(e) => {
                self.placer.release(rec.vm.id);
                return Err(e.into());
            }
        };
        let host = rec.host();
        if on_shared {
            // Where its disks live: a restart elsewhere needs the same pool.
            let pool = host.and_then(|h| self.live(h)).and_then(|s| s.shared_storage());
            if let Err(e) = self.store.set_vm_storage(rec.vm.id, pool) {
                tracing::error!(vm = %rec.vm.spec.name, error = %e, "cannot record the VM's shared storage");
            }
        }
        tracing::info!(vm = %rec.vm.spec.name, id = %rec.vm.id, host = ?host, "VM placed");
        if let Some(h) = host {
            self.bus.vm(
                Some(h),
                rec.vm.id,
                format!("VM {} created, placed on host {h}", rec.vm.spec.name),
            );
        }
        if let (Some(h), Some(d)) = (host, desired) {
            self.push_desired(h, d);
        }
        Ok(rec)
    }

    /// Changes a VM's power state.
    pub fn set_power(&self, id: VmId, power: Power) -> Result<VmRecord, VmError> {
        let mut rec = self.store.vm(id)?.ok_or(VmError::NotFound(id))?;
        if rec.vm.power != power {
            self.not_migrating(id)?;
            // One transaction: a restart or burst that moved the VM since
            // it was read is kept.
            let (now, desired) = self
                .store
                .set_vm_power(id, power, OpId::random())?
                .ok_or(VmError::NotFound(id))?;
            rec = now;
            self.bus.vm(
                rec.host(),
                id,
                format!("VM {} should be {power:?}", rec.vm.spec.name).to_lowercase(),
            );
            if let (Some(h), Some(d)) = (rec.host(), desired) {
                self.push_desired(h, d);
            }
            // A cloud VM's power is the broker's to change.
            if let (None, Some(b)) = (rec.host(), self.burst()) {
                b.wake.notify_one();
            }
        }
        Ok(rec)
    }

    /// Refuses changes to a VM while it live-migrates.
    pub(super) fn not_migrating(&self, id: VmId) -> Result<(), VmError> {
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
        self.placer.forget(id);
        // Room on a host for a waiting VM, or an instance to terminate.
        if let Some(b) = self.burst() {
            b.wake.notify_one();
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
        let observed = host
            .and_then(|h| self.live(h))
            .and_then(|s| s.observed(rec.vm.id));
        let ha_status = self.ha_status();
        let status = ha_status.vms.get(&rec.vm.id).cloned();
        let lock_wait = ha_status.lock_waits.get(&rec.vm.id).copied();
        let ha = if rec.vm.spec.ha || status.is_some() {
            let history = match self.store.ha_vm(rec.vm.id) {
                Ok(h) => h.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(vm = %rec.vm.id, error = %e, "cannot read a VM's HA history");
                    Default::default()
                }
            };
            Some(super::VmHaView {
                history,
                status,
                lock_wait,
            })
        } else {
            None
        };
        let cloud = match self.store.cloud_record(rec.vm.id) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(vm = %rec.vm.id, error = %e, "cannot read a VM's cloud record");
                None
            }
        };
        VmView {
            record: rec,
            observed,
            ha,
            cloud,
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

    /// Sends a host its desired state, if it is connected.
    pub(super) fn push_desired(&self, host: HostId, d: DesiredRecord) {
        self.send_to(host, desired_message(d));
    }

    /// A host's desired and observed VMs.
    pub fn host_vms(&self, host: HostId) -> Result<Option<HostVms>, StoreError> {
        if self.store.host(host)?.is_none() {
            return Ok(None);
        }
        let desired = self.store.desired(host)?.unwrap_or_default();
        let live = self.live(host);
        Ok(Some(HostVms {
            generation: desired.generation,
            desired: desired.vms,
            observed: live.as_ref().and_then(|s| s.inventory()),
            report: live.as_ref().and_then(|s| s.report()),
            events: live.as_ref().map(|s| s.vm_events()).unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PlacementRules;
    use novacron_shared::spec::VmSpec;

    fn host(id: u128) -> scheduler::Host {
        scheduler::Host {
            id: HostId(id),
            up: true,
            cordoned: false,
            cpus: 4,
            memory_mib: 4096,
            storage_free_mib: 100_000,
            labels: Default::default(),
            load: None,
            used: scheduler::Usage::default(),
            groups: HashSet::new(),
            shared_storage: None,
            disk_locks: None,
        }
    }

    fn rec(id: u128, on: HostId) -> VmRecord {
        VmRecord {
            vm: DesiredVm {
                id: VmId(id),
                op_id: OpId(id),
                spec: VmSpec::minimal(&format!("v{id}"), 1, 3000),
                power: Power::Running,
                epoch: 0,
            },
            placement: Placement::Host(on),
            rules: PlacementRules::default(),
            created_ms: 0,
        }
    }

    fn req() -> scheduler::Request {
        request_for(&VmSpec::minimal("x", 1, 3000), &PlacementRules::default())
    }

    #[test]
    fn a_reservation_counts_until_released_even_across_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let p = Placer::new(scheduler::Policy::default());
        let (on, placed) = p
            .place_and_reserve(&store, vec![host(1)], &req(), |h| (rec(1, h), None))
            .unwrap()
            .unwrap();
        assert_eq!((on, placed.host()), (HostId(1), Some(HostId(1))));
        // Not committed yet, and the index is rebuilt meanwhile: the
        // reservation still fills the host, so a second VM does not fit.
        p.invalidate();
        let again = p
            .place_and_reserve(&store, vec![host(1)], &req(), |h| (rec(2, h), None))
            .unwrap();
        assert!(again.is_err(), "the reserved memory is counted");
        // The commit failed: the claim is rolled back and the host is free.
        p.release(VmId(1));
        let mut hs = vec![host(1)];
        p.fill_usage(&store, &mut hs).unwrap();
        assert_eq!(hs[0].used.memory_mib, 0);
        assert!(p
            .place_and_reserve(&store, vec![host(1)], &req(), |h| (rec(3, h), None))
            .unwrap()
            .is_ok());
    }

    #[test]
    fn a_confirmed_reservation_is_read_back_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let p = Placer::new(scheduler::Policy::default());
        let (_, r) = p
            .place_and_reserve(&store, vec![host(1)], &req(), |h| (rec(1, h), None))
            .unwrap()
            .unwrap();
        store.put_vm(&r).unwrap().unwrap();
        p.confirm(VmId(1));
        p.invalidate();
        let mut hs = vec![host(1)];
        p.fill_usage(&store, &mut hs).unwrap();
        assert_eq!(hs[0].used.memory_mib, 3000, "counted once, from the store");
        p.forget(VmId(1));
        p.fill_usage(&store, &mut hs).unwrap();
        assert_eq!(hs[0].used.memory_mib, 0);
    }
}
