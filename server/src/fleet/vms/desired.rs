//! A host's desired VMs set as a whole (`PUT /v1/hosts/{id}/vms`): the
//! VMs are pinned to the host and replace what it had, in one transaction.
//!
//! Owns: nothing of its own; it drops the placer's usage index, which
//! cannot follow a wholesale replacement.

use std::collections::{HashMap, HashSet};

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::spec::DesiredVm;

use crate::fleet::{desired_message, Fleet, VmRequest};
use crate::store::{DesiredRecord, PlacementRules, StoreError, VmRecord};

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

impl Fleet {
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
        // An HA VM's disks must be where it can restart: on shared storage.
        let pool = self.live(host).map(|s| s.shared_storage());
        for (i, v) in vms.iter().enumerate() {
            let on_shared = v.spec.ha && !v.spec.ephemeral && !v.spec.disks.is_empty();
            if on_shared && matches!(pool, Some(None)) {
                problems.push(format!(
                    "vms[{i}]: {:?} is HA with disks, but host {host} reports no shared storage: set \
                     vms.storage_shared = true in its agent's config, or make the VM ephemeral: true",
                    v.spec.name
                ));
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
        let mut records = Vec::with_capacity(vms.len());
        for r in vms {
            let prev = old.get(&r.spec.name);
            let id = r.id.or(prev.map(|p| p.id)).unwrap_or_else(VmId::random);
            let unchanged = prev.filter(|p| p.id == id && p.spec == r.spec && p.power == r.power);
            // An epoch never goes back: agents refuse a VM of an older
            // epoch than one they have seen (a restart elsewhere raised it).
            let epoch = match prev.filter(|p| p.id == id) {
                Some(p) => p.epoch,
                None => self.store.vm(id)?.map_or(0, |v| v.vm.epoch),
            };
            records.push(VmRecord {
                vm: DesiredVm {
                    id,
                    op_id: unchanged.map_or_else(OpId::random, |p| p.op_id),
                    spec: r.spec,
                    power: r.power,
                    epoch,
                },
                placement: Placement::Host(host),
                rules: PlacementRules {
                    host: Some(host),
                    ..PlacementRules::default()
                },
                created_ms: now,
            });
        }
        let rec = self.store.replace_host_vms(host, records);
        // Rebuilt at the next placement.
        self.placer.invalidate();
        let rec = rec?.map_err(|e| DesiredError::Invalid(e.to_string()))?;
        if let Some(Some(pool)) = pool {
            for v in rec
                .vms
                .iter()
                .filter(|v| v.spec.ha && !v.spec.ephemeral && !v.spec.disks.is_empty())
            {
                self.store.set_vm_storage(v.id, Some(pool.clone()))?;
            }
        }
        self.send_to(host, desired_message(rec.clone()));
        Ok(rec)
    }
}
