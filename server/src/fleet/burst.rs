//! The fleet's side of cloud burst: VMs that wait (pending) for a host or
//! a burst, placing a waiting VM when a host fits, and moving a burst VM
//! home. The broker (`crate::burst::broker`) decides; these methods carry
//! placements out through the `Placer` (reserve under its lock, commit a
//! compare-and-set outside it, confirm or roll back) like every other
//! placement.
//!
//! Owns: nothing of its own. Must not touch: the provider (the broker's) or
//! sessions beyond reading what a host observes.

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::protocol::VmState;

use super::{request_for, CreateVm, Fleet, VmError};
use crate::scheduler;
use crate::store::{CloudRecord, CloudRefusal, Repatriation, VmRecord};

impl Fleet {
    /// Checks a create request's burst rule against the server's `[burst]`.
    pub(super) fn check_burst_rule(&self, req: &CreateVm) -> Result<(), VmError> {
        let Some(rule) = &req.placement.burst else {
            return Ok(());
        };
        let invalid = |m: String| Err(VmError::Invalid(format!("placement.burst: {m}")));
        let Some(b) = self.burst().filter(|b| b.enabled()) else {
            return invalid(
                "cloud burst is off on this server (set [burst] enabled = true with [burst.aws])".into(),
            );
        };
        if let Err(why) = b.image_for(&req.spec, rule) {
            return invalid(format!("VM {:?} cannot burst: {why}", req.spec.name));
        }
        let types = b
            .provider
            .as_ref()
            .map(|p| p.instance_types())
            .unwrap_or_default();
        for t in &rule.instance_types {
            if !types.iter().any(|x| x.name == *t) {
                return invalid(format!(
                    "instance type {t:?} is not in the instance-type table for this region"
                ));
            }
        }
        Ok(())
    }

    /// Stores a VM that no host fits as pending with the scheduler's
    /// reasons (it asked to wait, or may burst), and wakes the broker.
    pub(super) fn store_pending(&self, rec: VmRecord) -> Result<VmRecord, VmError> {
        self.store.put_vm(&rec)?.map_err(|e| VmError::NameTaken(e.0))?;
        let why = match &rec.placement {
            Placement::Pending { reason } => reason.clone(),
            _ => String::new(),
        };
        tracing::info!(vm = %rec.vm.spec.name, id = %rec.vm.id, %why, "VM pending");
        self.bus
            .vm(None, rec.vm.id, format!("VM {} pending: {why}", rec.vm.spec.name));
        if let Some(b) = self.burst() {
            b.wake.notify_one();
        }
        Ok(rec)
    }

    /// Every VM waiting for a host or a burst.
    pub fn pending_vms(&self) -> Result<Vec<VmRecord>, VmError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.vms(after, 1000)?;
            let Some(last) = page.last() else { break };
            after = Some(last.vm.id);
            out.extend(
                page.into_iter()
                    .filter(|r| matches!(r.placement, Placement::Pending { .. })),
            );
        }
        Ok(out)
    }

    /// The scheduler's request for a stored VM.
    fn stored_request(&self, rec: &VmRecord) -> scheduler::Request {
        let mut r = request_for(&rec.vm.spec, &rec.rules);
        if rec.vm.spec.ha && !rec.vm.spec.ephemeral && !rec.vm.spec.disks.is_empty() {
            r.shared_storage = Some(scheduler::SharedStorageNeed::Any);
        }
        if rec.vm.spec.ha && self.ha_config().disk_locks {
            r.disk_locks = Some(scheduler::SharedStorageNeed::Any);
        }
        r
    }

    /// Places a waiting VM on a host if one fits now; the scheduler's
    /// reasons when none does.
    pub fn place_waiting(&self, rec: &VmRecord) -> Result<Result<HostId, scheduler::NoFit>, VmError> {
        let hosts = self.candidate_hosts()?;
        let req = self.stored_request(rec);
        let op_id = OpId::random();
        let placed = self.placer.place_and_reserve(&self.store, hosts, &req, |h| {
            let mut r = rec.clone();
            r.placement = Placement::Host(h);
            r.vm.op_id = op_id;
            (r, None)
        })?;
        let (host, _) = match placed {
            Ok(p) => p,
            Err(nofit) => return Ok(Err(nofit)),
        };
        match self.store.place_pending(rec.vm.id, host, op_id) {
            Ok(Ok((_, desired))) => {
                self.placer.confirm(rec.vm.id);
                tracing::info!(vm = %rec.vm.spec.name, %host, "waiting VM placed");
                self.bus.vm(
                    Some(host),
                    rec.vm.id,
                    format!("VM {} placed on host {host} (a host fits now)", rec.vm.spec.name),
                );
                self.push_desired(host, desired);
                Ok(Ok(host))
            }
            Ok(Err(refused)) => {
                self.placer.release(rec.vm.id);
                Err(VmError::Busy(format!("not placed: {refused}")))
            }
            Err(e) => {
                self.placer.release(rec.vm.id);
                Err(e.into())
            }
        }
    }

    /// Starts moving a burst VM home: places it on a host that fits (its
    /// instance keeps running until the host's copy does). The scheduler's
    /// reasons when none fits.
    pub fn repatriate(
        &self,
        rec: &VmRecord,
        cloud: &CloudRecord,
        now_ms: u64,
    ) -> Result<Result<HostId, scheduler::NoFit>, VmError> {
        let hosts = self.candidate_hosts()?;
        let req = self.stored_request(rec);
        let placed = self.placer.place_and_reserve(&self.store, hosts, &req, |h| {
            let mut r = rec.clone();
            r.placement = Placement::Host(h);
            (r, None)
        })?;
        let (host, _) = match placed {
            Ok(p) => p,
            Err(nofit) => return Ok(Err(nofit)),
        };
        let mut next = cloud.clone();
        next.repatriation = Some(Repatriation {
            host,
            started_ms: now_ms,
            running_ms: None,
        });
        match self
            .store
            .cloud_update(cloud, &next, None, Some(Placement::Host(host)))
        {
            Ok(Ok(moved)) => {
                self.placer.confirm(rec.vm.id);
                // The record was written with a fresh op id: the index is
                // rebuilt from the store to count it on its host.
                self.placer.invalidate();
                if let Some((h, d)) = moved {
                    self.push_desired(h, d);
                }
                self.bus.vm(
                    Some(host),
                    rec.vm.id,
                    format!(
                        "VM {} is coming home to host {host} (its instance runs until the host's copy does)",
                        rec.vm.spec.name
                    ),
                );
                Ok(Ok(host))
            }
            Ok(Err(refused)) => {
                self.placer.release(rec.vm.id);
                Err(VmError::Busy(format!("not moved home: {refused}")))
            }
            Err(e) => {
                self.placer.release(rec.vm.id);
                Err(e.into())
            }
        }
    }

    /// After the broker moved a VM off a host (a move home abandoned, an
    /// instance found gone during one): the host gets its new desired
    /// state, and the usage index is rebuilt.
    pub fn left_host(&self, host: Option<HostId>) {
        self.placer.invalidate();
        if let Some(h) = host {
            match self.store.desired(h) {
                Ok(Some(d)) => self.push_desired(h, d),
                Ok(None) => {}
                Err(e) => tracing::warn!(host = %h, error = %e, "cannot read a host's desired state"),
            }
        }
    }

    /// After the broker placed a VM on a host through the store.
    pub fn placed_on(&self, host: HostId, desired: crate::store::DesiredRecord) {
        self.placer.invalidate();
        self.push_desired(host, desired);
    }

    /// Whether `host`'s agent reports `vm` running.
    pub fn observed_running(&self, vm: VmId, host: HostId) -> bool {
        self.live(host)
            .and_then(|s| s.observed(vm))
            .is_some_and(|o| o.state == VmState::Running)
    }

    /// A cloud refusal as a VM error.
    pub fn cloud_refused(r: CloudRefusal) -> VmError {
        VmError::Busy(r.to_string())
    }
}
