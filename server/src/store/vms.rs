//! VMs in the store: each VM's record (what it should be and where it is
//! placed), the name index, the host → VMs index and each host's desired
//! state and generation. Only a VM placed on a host is in the host index.

use novacron_shared::codec;
use novacron_shared::ids::{HostId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::spec::DesiredVm;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::{
    bump_generation, journal, MigrationClaim, Record, Store, StoreError, HOST_GENERATION, HOST_VMS, VMS,
    VM_NAMES,
};

fn put_vm(tx: &redb::WriteTransaction, v: &VmRecord) -> Result<Result<(), NameTaken>, StoreError> {
    let mut names = tx.open_table(VM_NAMES)?;
    let mut vms = tx.open_table(VMS)?;
    if let Some(other) = names.get(v.vm.spec.name.as_str())?.map(|x| x.value()) {
        if other != v.vm.id.0 {
            return Ok(Err(NameTaken(v.vm.spec.name.clone())));
        }
    }
    if let Some(old) = vms
        .get(v.vm.id.0)?
        .map(|x| VmRecord::decode(x.value()))
        .transpose()?
    {
        if old.vm.spec.name != v.vm.spec.name {
            names.remove(old.vm.spec.name.as_str())?;
        }
    }
    names.insert(v.vm.spec.name.as_str(), v.vm.id.0)?;
    vms.insert(v.vm.id.0, v.encode()?.as_slice())?;
    if let Some(h) = v.host() {
        tx.open_table(HOST_VMS)?.insert((h.0, v.vm.id.0), ())?;
    }
    Ok(Ok(()))
}

/// Writes a VM inside `tx`, moving it off the host it was on (if its
/// placement changed) and bumping the generations of the hosts involved.
pub(super) fn put_vm_moved(
    tx: &redb::WriteTransaction,
    v: &VmRecord,
) -> Result<Result<(), NameTaken>, StoreError> {
    let old = tx
        .open_table(VMS)?
        .get(v.vm.id.0)?
        .map(|x| VmRecord::decode(x.value()))
        .transpose()?;
    if let Err(e) = put_vm(tx, v)? {
        return Ok(Err(e));
    }
    if let Some(old_host) = old.and_then(|o| o.host()).filter(|h| Some(*h) != v.host()) {
        tx.open_table(HOST_VMS)?.remove((old_host.0, v.vm.id.0))?;
        bump_generation(tx, old_host)?;
    }
    if let Some(h) = v.host() {
        bump_generation(tx, h)?;
    }
    Ok(Ok(()))
}

fn remove_vm(tx: &redb::WriteTransaction, id: u128) -> Result<Option<VmRecord>, StoreError> {
    let old = tx
        .open_table(VMS)?
        .remove(id)?
        .map(|x| VmRecord::decode(x.value()))
        .transpose()?;
    if let Some(o) = &old {
        tx.open_table(VM_NAMES)?.remove(o.vm.spec.name.as_str())?;
        if let Some(h) = o.host() {
            tx.open_table(HOST_VMS)?.remove((h.0, id))?;
        }
    }
    Ok(old)
}

/// The VMs one host should run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRecord {
    /// Increases with every change.
    pub generation: u64,
    /// The VMs.
    pub vms: Vec<DesiredVm>,
    /// VMs in a live migration from or to this host (left alone by its agent).
    #[serde(default)]
    pub migrating: Vec<VmId>,
    /// HA VMs restarted elsewhere while this host was fenced: its agent
    /// removes them; cleared when the host is reported reconciled.
    #[serde(default)]
    pub departed: Vec<novacron_shared::protocol::Departed>,
}

/// One VM: what it should be and where it runs.
///
/// Only a VM placed on a host is in that host's desired state (and in the
/// host index, generations, usage index and migrations); a VM in a cloud
/// provider or pending is listed, but no agent runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM, as its host's agent gets it.
    pub vm: DesiredVm,
    /// Where it is placed.
    pub placement: Placement,
    /// The rules it was placed by (kept for later placements: groups).
    pub rules: PlacementRules,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

impl VmRecord {
    /// The host it is placed on, when it is on one.
    pub fn host(&self) -> Option<HostId> {
        self.placement.host()
    }
}

impl Record for VmRecord {
    const TABLE: &'static str = "vms";
    /// 2: `host` became `placement` (a host, a cloud provider, or pending).
    /// 3: the VM gained its HA epoch, and its spec `ephemeral` and
    /// `ha_priority`.
    /// 4: the placement rules gained `wait` and `burst`.
    const VERSION: u8 = 4;

    fn decode_old(version: u8, body: &[u8]) -> Result<Self, StoreError> {
        match version {
            1 => {
                let v1: VmRecordV1 = codec::decode(body).map_err(Self::corrupt)?;
                Ok(VmRecord {
                    vm: v1.vm.into(),
                    placement: Placement::Host(v1.host),
                    rules: v1.rules.into(),
                    created_ms: v1.created_ms,
                })
            }
            2 => {
                let v2: VmRecordV2 = codec::decode(body).map_err(Self::corrupt)?;
                Ok(VmRecord {
                    vm: v2.vm.into(),
                    placement: v2.placement,
                    rules: v2.rules.into(),
                    created_ms: v2.created_ms,
                })
            }
            3 => {
                let v3: VmRecordV3 = codec::decode(body).map_err(Self::corrupt)?;
                Ok(VmRecord {
                    vm: v3.vm,
                    placement: v3.placement,
                    rules: v3.rules.into(),
                    created_ms: v3.created_ms,
                })
            }
            _ => codec::decode(body).map_err(Self::corrupt),
        }
    }
}

/// [`VmRecord`] as version 1 stored it (every VM was on a host).
#[derive(Deserialize)]
struct VmRecordV1 {
    vm: DesiredVmV2,
    host: HostId,
    rules: PlacementRulesV3,
    created_ms: u64,
}

/// [`VmRecord`] as version 2 stored it (no epoch, the older spec).
#[derive(Deserialize)]
struct VmRecordV2 {
    vm: DesiredVmV2,
    placement: Placement,
    rules: PlacementRulesV3,
    created_ms: u64,
}

/// [`VmRecord`] as version 3 stored it (the older placement rules).
#[derive(Deserialize)]
struct VmRecordV3 {
    vm: DesiredVm,
    placement: Placement,
    rules: PlacementRulesV3,
    created_ms: u64,
}

/// A [`DesiredVm`] as record versions 1 and 2 stored it.
#[derive(Serialize, Deserialize)]
struct DesiredVmV2 {
    id: VmId,
    op_id: novacron_shared::ids::OpId,
    spec: VmSpecV2,
    power: novacron_shared::spec::Power,
}

/// A [`VmSpec`](novacron_shared::spec::VmSpec) as record versions 1 and 2
/// stored it: every field up to `labels`.
#[derive(Serialize, Deserialize)]
struct VmSpecV2 {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    disks: Vec<novacron_shared::spec::DiskSpec>,
    nics: Vec<novacron_shared::spec::NicSpec>,
    cloud_init: Option<novacron_shared::spec::CloudInit>,
    boot: Option<novacron_shared::spec::KernelBoot>,
    machine: novacron_shared::spec::Machine,
    ha: bool,
    labels: std::collections::BTreeMap<String, String>,
}

impl From<DesiredVmV2> for DesiredVm {
    fn from(v: DesiredVmV2) -> Self {
        let s = v.spec;
        DesiredVm {
            id: v.id,
            op_id: v.op_id,
            spec: novacron_shared::spec::VmSpec {
                name: s.name,
                vcpus: s.vcpus,
                memory_mib: s.memory_mib,
                disks: s.disks,
                nics: s.nics,
                cloud_init: s.cloud_init,
                boot: s.boot,
                machine: s.machine,
                ha: s.ha,
                labels: s.labels,
                ephemeral: false,
                ha_priority: 0,
            },
            power: v.power,
            epoch: 0,
        }
    }
}

/// Placement rules of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementRules {
    /// Put it on this host (skips the scheduler's scoring, not its filters).
    #[serde(default)]
    pub host: Option<HostId>,
    /// Labels the host must carry.
    #[serde(default)]
    pub required_labels: std::collections::BTreeMap<String, String>,
    /// Prefer hosts running VMs of this group.
    #[serde(default)]
    pub affinity: Option<String>,
    /// Never share a host with another VM of this group.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// When no host fits: keep it pending (placed when a host fits) instead
    /// of refusing it. A burstable VM always waits.
    #[serde(default)]
    pub wait: bool,
    /// It may run in the cloud when no host fits.
    #[serde(default)]
    pub burst: Option<novacron_shared::placement::BurstRule>,
}

/// [`PlacementRules`] as record versions 1 to 3 stored them.
#[derive(Serialize, Deserialize)]
struct PlacementRulesV3 {
    host: Option<HostId>,
    required_labels: std::collections::BTreeMap<String, String>,
    affinity: Option<String>,
    anti_affinity: Option<String>,
}

impl From<PlacementRulesV3> for PlacementRules {
    fn from(r: PlacementRulesV3) -> Self {
        PlacementRules {
            host: r.host,
            required_labels: r.required_labels,
            affinity: r.affinity,
            anti_affinity: r.anti_affinity,
            wait: false,
            burst: None,
        }
    }
}

impl PlacementRules {
    /// The group this VM belongs to, if any.
    pub fn group(&self) -> Option<&str> {
        self.anti_affinity.as_deref().or(self.affinity.as_deref())
    }
}

/// A VM name is already taken by another VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a VM named {0:?} already exists")]
pub struct NameTaken(pub String);

impl Store {
    /// A host's desired VMs (generation 0 and none if never set).
    pub fn desired(&self, id: HostId) -> Result<Option<DesiredRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let generation = tx.open_table(HOST_GENERATION)?.get(id.0)?.map(|g| g.value());
        let Some(generation) = generation else {
            return Ok(None);
        };
        let vms = tx.open_table(VMS)?;
        let mut out = Vec::new();
        for row in tx.open_table(HOST_VMS)?.range((id.0, 0)..=(id.0, u128::MAX))? {
            let (k, _) = row?;
            if let Some(v) = vms.get(k.value().1)? {
                out.push(VmRecord::decode(v.value())?.vm);
            }
        }
        let mut migrating = Vec::new();
        for row in tx.open_table(journal::MIGRATIONS)?.iter()? {
            let c = MigrationClaim::decode(row?.1.value())?;
            if c.target == id || c.source == id {
                migrating.push(c.vm);
            }
        }
        let departed = super::ha::departed_in(&tx.open_table(super::ha::DEPARTED)?, id)?;
        Ok(Some(DesiredRecord {
            generation,
            vms: out,
            migrating,
            departed,
        }))
    }

    /// Every host's desired-state generation (hosts never given one are absent).
    pub fn generations(&self) -> Result<std::collections::HashMap<HostId, u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOST_GENERATION)?;
        let mut out = std::collections::HashMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(HostId(k.value()), v.value());
        }
        Ok(out)
    }

    /// Replaces the VMs placed on `host` with `vms` (pinned there), in one
    /// transaction: VMs of the host not listed are deleted. Returns the
    /// host's new desired state.
    pub fn replace_host_vms(
        &self,
        host: HostId,
        vms: Vec<VmRecord>,
    ) -> Result<Result<DesiredRecord, NameTaken>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let keep: std::collections::HashSet<u128> = vms.iter().map(|v| v.vm.id.0).collect();
            let current: Vec<u128> = tx
                .open_table(HOST_VMS)?
                .range((host.0, 0)..=(host.0, u128::MAX))?
                .map(|r| r.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for id in current.into_iter().filter(|id| !keep.contains(id)) {
                remove_vm(&tx, id)?;
            }
            for v in vms {
                if let Err(e) = put_vm(&tx, &v)? {
                    return Ok(Err(e));
                }
            }
            bump_generation(&tx, host)?;
        }
        tx.commit()?;
        Ok(Ok(self.desired(host)?.unwrap_or_default()))
    }

    /// Adds or replaces one VM; returns its host's new desired state (none
    /// when it is not on a host). A VM that moved hosts (or off a host) is
    /// removed from the old host's state too (that host's generation is
    /// bumped as well).
    pub fn put_vm(&self, v: &VmRecord) -> Result<Result<Option<DesiredRecord>, NameTaken>, StoreError> {
        let tx = self.db.begin_write()?;
        if let Err(e) = put_vm_moved(&tx, v)? {
            return Ok(Err(e));
        }
        tx.commit()?;
        match v.host() {
            Some(h) => Ok(Ok(Some(self.desired(h)?.unwrap_or_default()))),
            None => Ok(Ok(None)),
        }
    }

    /// Sets a VM's power and operation id in one transaction, keeping
    /// whatever placement and epoch it has now (a restart or a burst may
    /// have moved it since the caller read it). Returns the VM as stored
    /// and its host's desired state; `None` when there is no such VM.
    pub fn set_vm_power(
        &self,
        id: VmId,
        power: novacron_shared::spec::Power,
        op_id: novacron_shared::ids::OpId,
    ) -> Result<Option<(VmRecord, Option<DesiredRecord>)>, StoreError> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut vms = tx.open_table(VMS)?;
            let Some(mut v) = vms.get(id.0)?.map(|x| VmRecord::decode(x.value())).transpose()? else {
                return Ok(None);
            };
            v.vm.power = power;
            v.vm.op_id = op_id;
            vms.insert(id.0, v.encode()?.as_slice())?;
            v
        };
        if let Some(h) = rec.host() {
            bump_generation(&tx, h)?;
        }
        tx.commit()?;
        let desired = match rec.host() {
            Some(h) => Some(self.desired(h)?.unwrap_or_default()),
            None => None,
        };
        Ok(Some((rec, desired)))
    }

    /// Deletes a VM; returns its record (and so its placement) if it existed.
    pub fn delete_vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_write()?;
        let old = remove_vm(&tx, id.0)?;
        super::ha::forget_vm(&tx, id)?;
        super::burst::vm_deleted(&tx, id)?;
        if let Some(h) = old.as_ref().and_then(VmRecord::host) {
            bump_generation(&tx, h)?;
        }
        tx.commit()?;
        Ok(old)
    }

    /// One VM.
    pub fn vm(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VMS)?;
        t.get(id.0)?.map(|v| VmRecord::decode(v.value())).transpose()
    }

    /// One VM, by name.
    pub fn vm_by_name(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let Some(id) = tx.open_table(VM_NAMES)?.get(name)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let t = tx.open_table(VMS)?;
        t.get(id)?.map(|v| VmRecord::decode(v.value())).transpose()
    }

    /// VMs in id order, starting after `after`, at most `limit`.
    pub fn vms(&self, after: Option<VmId>, limit: usize) -> Result<Vec<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VMS)?;
        let mut out = Vec::new();
        let iter = match after {
            Some(a) if a.0 == u128::MAX => return Ok(out),
            Some(a) => t.range(a.0 + 1..)?,
            None => t.range(0..)?,
        };
        for row in iter {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            out.push(VmRecord::decode(v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: u128, placement: Placement) -> VmRecord {
        VmRecord {
            vm: DesiredVm {
                id: VmId(id),
                op_id: novacron_shared::ids::OpId(id),
                spec: novacron_shared::spec::VmSpec::minimal(&format!("v{id}"), 1, 64),
                power: novacron_shared::spec::Power::Running,
                epoch: 0,
            },
            placement,
            rules: PlacementRules::default(),
            created_ms: 5,
        }
    }

    /// `v` in the layout of record versions 1 and 2 (its epoch and the
    /// newer spec fields must be at their defaults).
    fn legacy(v: &DesiredVm) -> DesiredVmV2 {
        assert_eq!((v.epoch, v.spec.ephemeral, v.spec.ha_priority), (0, false, 0));
        let s = v.spec.clone();
        DesiredVmV2 {
            id: v.id,
            op_id: v.op_id,
            spec: VmSpecV2 {
                name: s.name,
                vcpus: s.vcpus,
                memory_mib: s.memory_mib,
                disks: s.disks,
                nics: s.nics,
                cloud_init: s.cloud_init,
                boot: s.boot,
                machine: s.machine,
                ha: s.ha,
                labels: s.labels,
            },
            power: v.power,
        }
    }

    /// `r` in the layout of record versions 1 to 3 (`wait` and `burst` at
    /// their defaults).
    fn legacy_rules(r: &PlacementRules) -> PlacementRulesV3 {
        assert!(!r.wait && r.burst.is_none());
        PlacementRulesV3 {
            host: r.host,
            required_labels: r.required_labels.clone(),
            affinity: r.affinity.clone(),
            anti_affinity: r.anti_affinity.clone(),
        }
    }

    #[test]
    fn a_version_3_vm_record_decodes_without_wait_or_burst() {
        #[derive(Serialize)]
        struct V3<'a>(&'a DesiredVm, &'a Placement, &'a PlacementRulesV3, u64);
        let mut current = vm(5, Placement::Host(HostId(9)));
        current.vm.epoch = 3;
        current.rules.affinity = Some("db".into());
        let mut bytes = vec![3u8];
        codec::encode_into(
            &V3(&current.vm, &current.placement, &legacy_rules(&current.rules), 5),
            &mut bytes,
        )
        .unwrap();
        assert_eq!(VmRecord::decode(&bytes).unwrap(), current);
        let mut as_current = bytes.clone();
        as_current[0] = VmRecord::VERSION;
        assert!(
            VmRecord::decode(&as_current).is_err(),
            "the migration is what makes it readable"
        );
    }

    #[test]
    fn a_version_2_vm_record_decodes_with_epoch_zero_and_default_ha_options() {
        #[derive(Serialize)]
        struct V2<'a>(&'a DesiredVmV2, &'a Placement, &'a PlacementRulesV3, u64);
        let mut current = vm(
            4,
            Placement::Pending {
                reason: "full".into(),
            },
        );
        current.vm.spec.ha = true;
        current.vm.spec.labels.insert("tier".into(), "db".into());
        let mut bytes = vec![2u8];
        codec::encode_into(
            &V2(
                &legacy(&current.vm),
                &current.placement,
                &legacy_rules(&current.rules),
                5,
            ),
            &mut bytes,
        )
        .unwrap();
        let r = VmRecord::decode(&bytes).unwrap();
        assert_eq!(r, current);
        // A version-2 body read as the current layout does not decode: the
        // migration is what makes it readable.
        let mut as_current = bytes.clone();
        as_current[0] = VmRecord::VERSION;
        assert!(VmRecord::decode(&as_current).is_err());
    }

    #[test]
    fn a_version_1_vm_record_decodes_as_placed_on_its_host() {
        // Version 1's exact layout: the VM, then its host id.
        #[derive(Serialize)]
        struct V1<'a>(&'a DesiredVmV2, HostId, &'a PlacementRulesV3, u64);
        let current = vm(3, Placement::Host(HostId(42)));
        let rules = PlacementRules {
            anti_affinity: Some("web".into()),
            ..PlacementRules::default()
        };
        let mut bytes = vec![1u8];
        codec::encode_into(
            &V1(&legacy(&current.vm), HostId(42), &legacy_rules(&rules), 77),
            &mut bytes,
        )
        .unwrap();
        let r = VmRecord::decode(&bytes).unwrap();
        assert_eq!(r.placement, Placement::Host(HostId(42)));
        assert_eq!(r.vm, current.vm);
        assert_eq!(r.rules, rules);
        assert_eq!(r.created_ms, 77);
        // Rewritten, it is the current version and round-trips.
        let again = r.encode().unwrap();
        assert_eq!(again[0], VmRecord::VERSION);
        assert_eq!(VmRecord::decode(&again).unwrap(), r);
    }

    #[test]
    fn a_version_1_vm_record_in_the_database_is_found_on_its_host() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        s.put_vm(&vm(1, Placement::Host(HostId(7)))).unwrap().unwrap();
        // Overwrite the stored value with version 1's bytes for the same VM.
        #[derive(Serialize)]
        struct V1<'a>(&'a DesiredVmV2, HostId, &'a PlacementRulesV3, u64);
        let v = vm(1, Placement::Host(HostId(7)));
        let mut bytes = vec![1u8];
        codec::encode_into(
            &V1(&legacy(&v.vm), HostId(7), &legacy_rules(&v.rules), 5),
            &mut bytes,
        )
        .unwrap();
        {
            let tx = s.db.begin_write().unwrap();
            tx.open_table(VMS).unwrap().insert(1, bytes.as_slice()).unwrap();
            tx.commit().unwrap();
        }
        assert_eq!(s.vm(VmId(1)).unwrap().unwrap(), v);
        let d = s.desired(HostId(7)).unwrap().unwrap();
        assert_eq!(d.vms, vec![v.vm]);
    }

    #[test]
    fn cloud_and_pending_vms_are_listed_but_on_no_host() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let on_host = s.put_vm(&vm(1, Placement::Host(HostId(7)))).unwrap().unwrap();
        assert_eq!(on_host.map(|d| d.vms.len()), Some(1));
        let g = s.desired(HostId(7)).unwrap().unwrap().generation;
        let cloud = Placement::Cloud {
            provider: "aws".into(),
            instance: "i-1".into(),
        };
        assert_eq!(s.put_vm(&vm(2, cloud.clone())).unwrap().unwrap(), None);
        let pending = Placement::Pending {
            reason: "no host fits".into(),
        };
        assert_eq!(s.put_vm(&vm(3, pending)).unwrap().unwrap(), None);
        let d = s.desired(HostId(7)).unwrap().unwrap();
        assert_eq!(d.generation, g, "a VM on no host changes no host's generation");
        assert_eq!(d.vms.iter().map(|v| v.id).collect::<Vec<_>>(), [VmId(1)]);
        assert_eq!(s.vms(None, 10).unwrap().len(), 3);
        assert_eq!(s.vm(VmId(2)).unwrap().unwrap().placement, cloud);
        // Moving the host's VM to the cloud takes it off the host.
        let d = s.put_vm(&vm(1, cloud)).unwrap().unwrap();
        assert_eq!(d, None);
        let d = s.desired(HostId(7)).unwrap().unwrap();
        assert!(d.vms.is_empty());
        assert!(d.generation > g);
        // Deleting a cloud VM touches no host.
        let g = d.generation;
        assert!(s.delete_vm(VmId(2)).unwrap().is_some());
        assert_eq!(s.desired(HostId(7)).unwrap().unwrap().generation, g);
        assert!(s.vm_by_name("v2").unwrap().is_none());
    }
}
