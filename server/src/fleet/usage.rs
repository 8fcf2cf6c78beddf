//! What the placed VMs claim on each host (vCPUs, memory, placement
//! groups), kept in memory so that a placement does not read every VM
//! record. Only VMs on a host claim anything. Built from the store on first
//! use; placements (creations, migration claims) and deletions update it in
//! place; rarer changes (a host's VMs replaced, migrations ended) drop it so
//! the next placement rebuilds it. The placer (`super::vms`) owns it.

use std::collections::{HashMap, HashSet};

use novacron_shared::ids::{HostId, VmId};

use super::request_for;
use crate::scheduler::Usage;
use crate::store::{Store, StoreError, VmRecord};

#[derive(Debug, Default)]
struct HostUse {
    used: Usage,
    groups: HashMap<String, u32>,
}

#[derive(Debug)]
struct VmUse {
    on: Vec<HostId>,
    vcpus: u64,
    memory_mib: u64,
    group: Option<String>,
}

/// Per-host claims of the stored VMs.
#[derive(Debug, Default)]
pub struct UsageIndex {
    hosts: HashMap<HostId, HostUse>,
    vms: HashMap<VmId, VmUse>,
}

impl UsageIndex {
    /// Reads every VM and migration claim from the store.
    pub fn build(store: &Store) -> Result<Self, StoreError> {
        let claims: HashMap<VmId, HostId> = store
            .migrations()?
            .into_iter()
            .map(|c| (c.vm, c.target))
            .collect();
        let mut idx = Self::default();
        let mut after = None;
        loop {
            let page = store.vms(after, 4096)?;
            let Some(last) = page.last() else { break };
            after = Some(last.vm.id);
            for v in &page {
                idx.add(v, claims.get(&v.vm.id).copied());
            }
        }
        Ok(idx)
    }

    /// Counts a VM on its host (and on its migration target while it
    /// moves); a VM on no host (in a cloud, pending) claims nothing here.
    pub fn add(&mut self, v: &VmRecord, migrating_to: Option<HostId>) {
        self.remove(v.vm.id);
        let Some(host) = v.host() else { return };
        let r = request_for(&v.vm.spec, &v.rules);
        let u = VmUse {
            on: std::iter::once(host).chain(migrating_to).collect(),
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            group: v.rules.group().map(str::to_string),
        };
        for h in &u.on {
            let e = self.hosts.entry(*h).or_default();
            e.used.vcpus += u.vcpus;
            e.used.memory_mib += u.memory_mib;
            if let Some(g) = &u.group {
                *e.groups.entry(g.clone()).or_default() += 1;
            }
        }
        self.vms.insert(v.vm.id, u);
    }

    /// Forgets a VM.
    pub fn remove(&mut self, id: VmId) {
        let Some(u) = self.vms.remove(&id) else { return };
        for h in &u.on {
            if let Some(e) = self.hosts.get_mut(h) {
                e.used.vcpus = e.used.vcpus.saturating_sub(u.vcpus);
                e.used.memory_mib = e.used.memory_mib.saturating_sub(u.memory_mib);
                if let Some(g) = &u.group {
                    if let Some(n) = e.groups.get_mut(g) {
                        *n -= 1;
                        if *n == 0 {
                            e.groups.remove(g);
                        }
                    }
                }
            }
        }
    }

    /// What `host`'s VMs claim, and their groups.
    pub fn of(&self, host: HostId) -> (Usage, HashSet<String>) {
        self.hosts
            .get(&host)
            .map_or_else(Default::default, |h| (h.used, h.groups.keys().cloned().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PlacementRules;
    use novacron_shared::ids::OpId;
    use novacron_shared::spec::{DesiredVm, Power, VmSpec};

    fn vm(id: u128, host: u128, group: Option<&str>) -> VmRecord {
        VmRecord {
            vm: DesiredVm {
                id: VmId(id),
                op_id: OpId(id),
                spec: VmSpec::minimal(&format!("v{id}"), 2, 100),
                power: Power::Running,
                epoch: 0,
            },
            placement: novacron_shared::placement::Placement::Host(HostId(host)),
            rules: PlacementRules {
                anti_affinity: group.map(str::to_string),
                ..PlacementRules::default()
            },
            created_ms: 0,
        }
    }

    #[test]
    fn adds_and_removes_balance_out() {
        let mut idx = UsageIndex::default();
        idx.add(&vm(1, 10, Some("web")), None);
        idx.add(&vm(2, 10, Some("web")), Some(HostId(20)));
        idx.add(&vm(3, 20, None), None);
        let (u, g) = idx.of(HostId(10));
        assert_eq!((u.vcpus, u.memory_mib), (4, 200));
        assert!(g.contains("web"));
        let (u, g) = idx.of(HostId(20));
        assert_eq!(
            (u.vcpus, u.memory_mib),
            (4, 200),
            "the migration target is claimed"
        );
        assert!(g.contains("web"));
        idx.remove(VmId(2));
        idx.add(&vm(1, 10, Some("web")), None); // re-adding replaces
        let (u, g) = idx.of(HostId(10));
        assert_eq!((u.vcpus, u.memory_mib), (2, 100));
        assert!(g.contains("web"));
        assert!(idx.of(HostId(20)).1.is_empty());
        idx.remove(VmId(1));
        assert!(idx.of(HostId(10)).1.is_empty());
        assert_eq!(idx.of(HostId(10)).0.vcpus, 0);
    }

    #[test]
    fn a_vm_on_no_host_claims_nothing() {
        let mut idx = UsageIndex::default();
        idx.add(&vm(1, 10, Some("web")), None);
        let mut pending = vm(1, 10, Some("web"));
        pending.placement = novacron_shared::placement::Placement::Pending {
            reason: "no host fits".into(),
        };
        idx.add(&pending, None);
        let (u, g) = idx.of(HostId(10));
        assert_eq!(u.vcpus, 0, "re-adding it off the host released its claim");
        assert!(g.is_empty());
    }
}
