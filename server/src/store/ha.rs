//! High availability in the store: the largest lease terms ever granted,
//! the per-host flags that survive a restart (maintenance, must return),
//! the VMs that left each fenced host (`departed`, listed in that host's
//! desired state until it reconciles), and each HA VM's restart history.
//!
//! A restart is one transaction ([`Store::restart_vm`]): compare-and-set on
//! the VM's host and epoch, the new placement with the epoch raised by one,
//! the old host's departed entry and the VM's history, together or not at
//! all.

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::lease::LeaseTiming;
use novacron_shared::placement::Placement;
use novacron_shared::protocol::Departed;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{bump_generation, journal, DesiredRecord, Record, Store, StoreError, HOSTS, HOST_VMS, META, VMS};

/// Per host: its HA flags.
pub(super) const HA_HOSTS: TableDefinition<u128, &[u8]> = TableDefinition::new("ha_hosts");
/// (host, VM) → the VM left that host while it was fenced.
pub(super) const DEPARTED: TableDefinition<(u128, u128), &[u8]> = TableDefinition::new("departed");
/// Per HA VM: its restart history.
pub(super) const HA_VMS: TableDefinition<u128, &[u8]> = TableDefinition::new("ha_vms");
/// The meta key of the largest lease terms ever granted.
const TERMS_KEY: &str = "ha_terms";

/// The largest lease and fence time the server ever granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaTermsRecord {
    /// `L`, ms.
    pub lease_ms: u64,
    /// `F`, ms.
    pub fence_time_ms: u64,
}

impl Record for HaTermsRecord {
    const TABLE: &'static str = "meta.ha_terms";
    const VERSION: u8 = 1;
}

impl HaTermsRecord {
    /// As lease timing.
    pub fn timing(&self) -> LeaseTiming {
        LeaseTiming {
            lease: std::time::Duration::from_millis(self.lease_ms),
            fence_time: std::time::Duration::from_millis(self.fence_time_ms),
        }
    }
}

/// A host's HA flags, kept across server restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaHostRecord {
    /// An operator put it into maintenance: never fenced while in it.
    pub maintenance: bool,
    /// Declared fenced, not yet reconciled: no lease until it is.
    pub must_return: bool,
}

impl Record for HaHostRecord {
    const TABLE: &'static str = "ha_hosts";
    const VERSION: u8 = 1;
}

/// A VM that left a host: what its agent keeps when it removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepartedRecord {
    /// Its disks are on shared storage: undefine the domain only.
    pub keep_disks: bool,
}

impl Record for DepartedRecord {
    const TABLE: &'static str = "departed";
    const VERSION: u8 = 1;
}

/// One restart of an HA VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRestart {
    /// When it was placed again, Unix ms.
    pub at_ms: u64,
    /// The fenced host it left.
    pub from: HostId,
    /// The host it was placed on.
    pub to: HostId,
}

/// An HA VM's restart history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaVmRecord {
    /// How many times it was restarted elsewhere.
    pub restarts: u32,
    /// The latest restart.
    pub last_restart: Option<LastRestart>,
    /// The shared storage identity of the host it was last placed on.
    pub shared_storage: Option<String>,
}

impl Record for HaVmRecord {
    const TABLE: &'static str = "ha_vms";
    const VERSION: u8 = 1;
}

/// A restart to commit: the VM, where it must still be, where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartCommit {
    /// The VM.
    pub vm: VmId,
    /// The fenced host it must still be placed on.
    pub from: HostId,
    /// The epoch it must still have.
    pub epoch: u64,
    /// Where it goes.
    pub to: HostId,
    /// The new operation id of its desired entry.
    pub op_id: OpId,
    /// Whether the old host keeps its disks when it removes it.
    pub keep_disks: bool,
    /// The shared storage identity of `to`.
    pub shared_storage: Option<String>,
    /// Now, Unix ms.
    pub now_ms: u64,
}

/// Why a restart was not committed (the VM changed since it was planned).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestartRefusal {
    /// The VM is gone.
    #[error("the VM no longer exists")]
    NotFound,
    /// It is no longer on the fenced host.
    #[error("the VM is no longer placed on host {from} (it is {now:?})")]
    Moved {
        /// The host the restart expected.
        from: HostId,
        /// Where it is now.
        now: Placement,
    },
    /// Its epoch changed.
    #[error("the VM's epoch is {now}, not {expected}")]
    Epoch {
        /// The epoch the restart expected.
        expected: u64,
        /// Its epoch now.
        now: u64,
    },
    /// A live migration of it is under way.
    #[error("the VM is live-migrating (operation {0})")]
    Migrating(OpId),
    /// Its host is not (or no longer) declared fenced.
    #[error("host {0} is not declared fenced")]
    NotFenced(HostId),
}

/// Why a returning host was not cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReturnRefusal {
    /// No such host.
    #[error("no host with id {0}")]
    UnknownHost(HostId),
    /// Its desired state changed since it reconciled.
    #[error("its desired state is at generation {now}, not {expected}: not reconciled to it yet")]
    Changed {
        /// The generation it reconciled to.
        expected: u64,
        /// The generation now.
        now: u64,
    },
}

/// A committed restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restarted {
    /// The VM as stored now.
    pub record: super::VmRecord,
    /// The new host's desired state.
    pub to: DesiredRecord,
    /// The old host's desired state (with the VM in `departed`).
    pub from: DesiredRecord,
    /// The VM's history, updated.
    pub history: HaVmRecord,
}

fn decode_opt<R: Record>(v: Option<redb::AccessGuard<'_, &[u8]>>) -> Result<Option<R>, StoreError> {
    v.map(|x| R::decode(x.value())).transpose()
}

impl Store {
    /// Records that `timing` is granted from now on and returns the
    /// largest terms ever granted (lease and fence time each at their
    /// maximum, so the fence wait is at least that of any earlier terms).
    pub fn raise_ha_terms(&self, timing: LeaseTiming) -> Result<LeaseTiming, StoreError> {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let tx = self.db.begin_write()?;
        let max = {
            let mut meta = tx.open_table(META)?;
            let old: Option<HaTermsRecord> = decode_opt(meta.get(TERMS_KEY)?)?;
            let mut max = HaTermsRecord {
                lease_ms: ms(timing.lease),
                fence_time_ms: ms(timing.fence_time),
            };
            if let Some(o) = old {
                max.lease_ms = max.lease_ms.max(o.lease_ms);
                max.fence_time_ms = max.fence_time_ms.max(o.fence_time_ms);
            }
            if old != Some(max) {
                meta.insert(TERMS_KEY, max.encode()?.as_slice())?;
            }
            max
        };
        tx.commit()?;
        Ok(max.timing())
    }

    /// The largest lease terms ever granted, if any were.
    pub fn ha_terms(&self) -> Result<Option<LeaseTiming>, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        let rec: Option<HaTermsRecord> = decode_opt(meta.get(TERMS_KEY)?)?;
        Ok(rec.map(|r| r.timing()))
    }

    /// Every host's HA flags (hosts without any are absent).
    pub fn ha_hosts(&self) -> Result<Vec<(HostId, HaHostRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HA_HOSTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((HostId(k.value()), HaHostRecord::decode(v.value())?));
        }
        Ok(out)
    }

    /// Applies `f` to the HA flags of each known host of `hosts`, in one
    /// transaction; flags back at their defaults are removed. Returns the
    /// hosts that exist.
    pub fn update_ha_hosts(
        &self,
        hosts: &[HostId],
        mut f: impl FnMut(&mut HaHostRecord),
    ) -> Result<Vec<HostId>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut known = Vec::new();
        {
            let records = tx.open_table(HOSTS)?;
            let mut t = tx.open_table(HA_HOSTS)?;
            for h in hosts {
                if records.get(h.0)?.is_none() {
                    continue;
                }
                known.push(*h);
                let mut rec: HaHostRecord = decode_opt(t.get(h.0)?)?.unwrap_or_default();
                f(&mut rec);
                if rec == HaHostRecord::default() {
                    t.remove(h.0)?;
                } else {
                    t.insert(h.0, rec.encode()?.as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(known)
    }

    /// The VMs that left `host`, in id order.
    pub fn departed(&self, host: HostId) -> Result<Vec<Departed>, StoreError> {
        let tx = self.db.begin_read()?;
        departed_in(&tx.open_table(DEPARTED)?, host)
    }

    /// Every host's departed VMs (hosts without any are absent).
    pub fn all_departed(&self) -> Result<std::collections::HashMap<HostId, Vec<Departed>>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEPARTED)?;
        let mut out: std::collections::HashMap<HostId, Vec<Departed>> = std::collections::HashMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (host, vm) = k.value();
            out.entry(HostId(host)).or_default().push(Departed {
                vm: VmId(vm),
                keep_disks: DepartedRecord::decode(v.value())?.keep_disks,
            });
        }
        Ok(out)
    }

    /// `host` reconciled at desired generation `generation`: forgets the
    /// VMs that left it and its must-return flag, and bumps its generation,
    /// in one transaction — unless its generation moved on since (a VM left
    /// it meanwhile, and its agent has not seen that yet).
    pub fn returned_clean(
        &self,
        host: HostId,
        generation: u64,
    ) -> Result<Result<DesiredRecord, ReturnRefusal>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            if tx.open_table(HOSTS)?.get(host.0)?.is_none() {
                return Ok(Err(ReturnRefusal::UnknownHost(host)));
            }
            let now = tx
                .open_table(super::HOST_GENERATION)?
                .get(host.0)?
                .map_or(0, |g| g.value());
            if now != generation {
                return Ok(Err(ReturnRefusal::Changed {
                    expected: generation,
                    now,
                }));
            }
            let mut t = tx.open_table(DEPARTED)?;
            let keys: Vec<(u128, u128)> = t
                .range((host.0, 0)..=(host.0, u128::MAX))?
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for k in keys {
                t.remove(k)?;
            }
            let mut flags = tx.open_table(HA_HOSTS)?;
            let mut rec: HaHostRecord = decode_opt(flags.get(host.0)?)?.unwrap_or_default();
            rec.must_return = false;
            if rec == HaHostRecord::default() {
                flags.remove(host.0)?;
            } else {
                flags.insert(host.0, rec.encode()?.as_slice())?;
            }
            bump_generation(&tx, host)?;
        }
        tx.commit()?;
        Ok(Ok(self.desired(host)?.unwrap_or_default()))
    }

    /// One VM's restart history.
    pub fn ha_vm(&self, vm: VmId) -> Result<Option<HaVmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        decode_opt(tx.open_table(HA_VMS)?.get(vm.0)?)
    }

    /// Every VM's restart history, by id.
    pub fn ha_vms(&self) -> Result<Vec<(VmId, HaVmRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HA_VMS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((VmId(k.value()), HaVmRecord::decode(v.value())?));
        }
        Ok(out)
    }

    /// Sets the shared storage a VM was placed on (at creation).
    pub fn set_vm_storage(&self, vm: VmId, shared_storage: Option<String>) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(HA_VMS)?;
            let mut rec: HaVmRecord = decode_opt(t.get(vm.0)?)?.unwrap_or_default();
            rec.shared_storage = shared_storage;
            t.insert(vm.0, rec.encode()?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Restarts a VM elsewhere in one transaction, if it is still on
    /// `c.from` at `c.epoch`, not migrating, and `c.from` is stored as
    /// declared fenced (must return): placement = `c.to`, the
    /// epoch raised by one, the new op id; `departed` gains (`c.from`, VM);
    /// its history updated; both hosts' generations bumped.
    pub fn restart_vm(&self, c: &RestartCommit) -> Result<Result<Restarted, RestartRefusal>, StoreError> {
        let tx = self.db.begin_write()?;
        let (record, history) = {
            let mut vms = tx.open_table(VMS)?;
            let Some(mut rec) = decode_opt::<super::VmRecord>(vms.get(c.vm.0)?)? else {
                return Ok(Err(RestartRefusal::NotFound));
            };
            if rec.placement != Placement::Host(c.from) {
                return Ok(Err(RestartRefusal::Moved {
                    from: c.from,
                    now: rec.placement,
                }));
            }
            if rec.vm.epoch != c.epoch {
                return Ok(Err(RestartRefusal::Epoch {
                    expected: c.epoch,
                    now: rec.vm.epoch,
                }));
            }
            let claim: Option<super::MigrationClaim> =
                decode_opt(tx.open_table(journal::MIGRATIONS)?.get(c.vm.0)?)?;
            if let Some(m) = claim {
                return Ok(Err(RestartRefusal::Migrating(m.op)));
            }
            let flags: Option<HaHostRecord> = decode_opt(tx.open_table(HA_HOSTS)?.get(c.from.0)?)?;
            if !flags.is_some_and(|f| f.must_return) {
                return Ok(Err(RestartRefusal::NotFenced(c.from)));
            }
            rec.placement = Placement::Host(c.to);
            rec.vm.epoch += 1;
            rec.vm.op_id = c.op_id;
            vms.insert(c.vm.0, rec.encode()?.as_slice())?;
            let mut index = tx.open_table(HOST_VMS)?;
            index.remove((c.from.0, c.vm.0))?;
            index.insert((c.to.0, c.vm.0), ())?;
            tx.open_table(DEPARTED)?.insert(
                (c.from.0, c.vm.0),
                DepartedRecord {
                    keep_disks: c.keep_disks,
                }
                .encode()?
                .as_slice(),
            )?;
            let mut ha = tx.open_table(HA_VMS)?;
            let mut history: HaVmRecord = decode_opt(ha.get(c.vm.0)?)?.unwrap_or_default();
            history.restarts = history.restarts.saturating_add(1);
            history.last_restart = Some(LastRestart {
                at_ms: c.now_ms,
                from: c.from,
                to: c.to,
            });
            history.shared_storage.clone_from(&c.shared_storage);
            ha.insert(c.vm.0, history.encode()?.as_slice())?;
            (rec, history)
        };
        bump_generation(&tx, c.from)?;
        bump_generation(&tx, c.to)?;
        tx.commit()?;
        Ok(Ok(Restarted {
            record,
            to: self.desired(c.to)?.unwrap_or_default(),
            from: self.desired(c.from)?.unwrap_or_default(),
            history,
        }))
    }
}

/// The departed VMs of `host` in an open table.
pub(super) fn departed_in(
    t: &impl ReadableTable<(u128, u128), &'static [u8]>,
    host: HostId,
) -> Result<Vec<Departed>, StoreError> {
    let mut out = Vec::new();
    for row in t.range((host.0, 0)..=(host.0, u128::MAX))? {
        let (k, v) = row?;
        let r = DepartedRecord::decode(v.value())?;
        out.push(Departed {
            vm: VmId(k.value().1),
            keep_disks: r.keep_disks,
        });
    }
    Ok(out)
}

/// Drops a deleted VM's history (its departed entries stay until the old
/// host reconciles, so that host still removes it).
pub(super) fn forget_vm(tx: &redb::WriteTransaction, vm: VmId) -> Result<(), StoreError> {
    tx.open_table(HA_VMS)?.remove(vm.0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{HostRecord, HostState, MigrationClaim, PlacementRules, VmRecord};
    use novacron_shared::protocol::Capacity;
    use novacron_shared::spec::{DesiredVm, Power, VmSpec};

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        (dir, s)
    }

    fn host(id: u128) -> HostRecord {
        HostRecord {
            id: HostId(id),
            name: format!("h{id}"),
            addresses: vec![],
            capacity: Capacity::default(),
            agent_version: "0".into(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            state: HostState::Offline,
            cert_serial: format!("{id:x}"),
            cert_not_after: 0,
        }
    }

    fn vm(id: u128, on: u128) -> VmRecord {
        let mut spec = VmSpec::minimal(&format!("v{id}"), 1, 64);
        spec.ha = true;
        VmRecord {
            vm: DesiredVm {
                id: VmId(id),
                op_id: OpId(id),
                spec,
                power: Power::Running,
                epoch: 0,
            },
            placement: Placement::Host(HostId(on)),
            rules: PlacementRules::default(),
            created_ms: 1,
        }
    }

    fn commit(vm: u128, from: u128, epoch: u64, to: u128) -> RestartCommit {
        RestartCommit {
            vm: VmId(vm),
            from: HostId(from),
            epoch,
            to: HostId(to),
            op_id: OpId(900 + vm),
            keep_disks: true,
            shared_storage: Some("/srv/pool".into()),
            now_ms: 1_000,
        }
    }

    #[test]
    fn the_largest_terms_ever_granted_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.ha_terms().unwrap(), None);
        let long = LeaseTiming::new(Duration::from_secs(20));
        assert_eq!(s.raise_ha_terms(long).unwrap(), long);
        drop(s);
        let s = Store::open(&path).unwrap();
        // A shorter lease now: the stored maximum stays, and is returned.
        let short = LeaseTiming {
            lease: Duration::from_secs(5),
            fence_time: Duration::from_secs(3),
        };
        let max = s.raise_ha_terms(short).unwrap();
        assert_eq!(max.lease, Duration::from_secs(20));
        assert_eq!(
            max.fence_time,
            Duration::from_secs(3),
            "each term at its own maximum"
        );
        assert!(max.fenced_after() >= long.fenced_after());
        assert!(max.fenced_after() >= short.fenced_after());
        assert_eq!(s.ha_terms().unwrap(), Some(max));
    }

    #[test]
    fn host_flags_persist_and_unknown_hosts_are_skipped() {
        let (_d, s) = open();
        s.put_hosts(&[host(1), host(2)]).unwrap();
        let known = s
            .update_ha_hosts(&[HostId(1), HostId(9)], |r| r.maintenance = true)
            .unwrap();
        assert_eq!(known, vec![HostId(1)]);
        s.update_ha_hosts(&[HostId(2)], |r| r.must_return = true).unwrap();
        let all = s.ha_hosts().unwrap();
        assert_eq!(
            all,
            vec![
                (
                    HostId(1),
                    HaHostRecord {
                        maintenance: true,
                        must_return: false
                    }
                ),
                (
                    HostId(2),
                    HaHostRecord {
                        maintenance: false,
                        must_return: true
                    }
                ),
            ]
        );
        s.update_ha_hosts(&[HostId(1)], |r| r.maintenance = false)
            .unwrap();
        assert_eq!(s.ha_hosts().unwrap().len(), 1, "default flags are not kept");
    }

    #[test]
    fn a_restart_moves_the_vm_and_records_its_departure_in_one_transaction() {
        let (_d, s) = open();
        s.put_hosts(&[host(1), host(2)]).unwrap();
        s.put_vm(&vm(7, 1)).unwrap().unwrap();
        s.update_ha_hosts(&[HostId(1)], |r| r.must_return = true).unwrap();
        let g1 = s.desired(HostId(1)).unwrap().unwrap().generation;
        let r = s.restart_vm(&commit(7, 1, 0, 2)).unwrap().unwrap();
        assert_eq!(r.record.placement, Placement::Host(HostId(2)));
        assert_eq!((r.record.vm.epoch, r.record.vm.op_id), (1, OpId(907)));
        assert_eq!(
            r.to.vms.iter().map(|v| (v.id, v.epoch)).collect::<Vec<_>>(),
            [(VmId(7), 1)]
        );
        assert!(r.from.vms.is_empty());
        assert!(r.from.generation > g1);
        let gone = Departed {
            vm: VmId(7),
            keep_disks: true,
        };
        assert_eq!(r.from.departed, vec![gone]);
        assert!(r.to.departed.is_empty());
        assert_eq!(s.departed(HostId(1)).unwrap(), vec![gone]);
        let h = s.ha_vm(VmId(7)).unwrap().unwrap();
        assert_eq!(h, r.history);
        assert_eq!(h.restarts, 1);
        assert_eq!(
            h.last_restart,
            Some(LastRestart {
                at_ms: 1_000,
                from: HostId(1),
                to: HostId(2)
            })
        );
        assert_eq!(h.shared_storage.as_deref(), Some("/srv/pool"));
        assert_eq!(s.vm(VmId(7)).unwrap().unwrap(), r.record);
        // The host reconciled: departed and its flag are cleared together.
        // Reconciled to an older generation: refused, nothing cleared.
        let g = r.from.generation;
        assert_eq!(
            s.returned_clean(HostId(1), g - 1).unwrap(),
            Err(ReturnRefusal::Changed {
                expected: g - 1,
                now: g
            })
        );
        assert_eq!(s.departed(HostId(1)).unwrap(), vec![gone]);
        let d = s.returned_clean(HostId(1), g).unwrap().unwrap();
        assert!(d.departed.is_empty() && d.generation > g);
        assert!(s.ha_hosts().unwrap().is_empty());
        assert_eq!(
            s.returned_clean(HostId(9), 0).unwrap(),
            Err(ReturnRefusal::UnknownHost(HostId(9)))
        );
        // No longer declared fenced: no restart from it.
        s.put_vm(&vm(8, 1)).unwrap().unwrap();
        assert_eq!(
            s.restart_vm(&commit(8, 1, 0, 2)).unwrap(),
            Err(RestartRefusal::NotFenced(HostId(1)))
        );
    }

    #[test]
    fn a_restart_is_refused_when_the_vm_changed_and_then_changes_nothing() {
        let (_d, s) = open();
        s.put_hosts(&[host(1), host(2), host(3)]).unwrap();
        s.put_vm(&vm(7, 1)).unwrap().unwrap();
        s.update_ha_hosts(&[HostId(1), HostId(3)], |r| r.must_return = true)
            .unwrap();
        assert_eq!(
            s.restart_vm(&commit(8, 1, 0, 2)).unwrap(),
            Err(RestartRefusal::NotFound)
        );
        assert_eq!(
            s.restart_vm(&commit(7, 1, 3, 2)).unwrap(),
            Err(RestartRefusal::Epoch { expected: 3, now: 0 })
        );
        assert!(matches!(
            s.restart_vm(&commit(7, 3, 0, 2)).unwrap(),
            Err(RestartRefusal::Moved { from: HostId(3), .. })
        ));
        // A second restart planned from the same view loses the race.
        s.restart_vm(&commit(7, 1, 0, 2)).unwrap().unwrap();
        assert!(matches!(
            s.restart_vm(&commit(7, 1, 0, 3)).unwrap(),
            Err(RestartRefusal::Moved { .. })
        ));
        assert_eq!(s.departed(HostId(3)).unwrap(), vec![]);
        assert_eq!(s.ha_vm(VmId(7)).unwrap().unwrap().restarts, 1);
        // Under live migration: refused.
        s.put_vm(&vm(8, 1)).unwrap().unwrap();
        let claim = MigrationClaim {
            vm: VmId(8),
            source: HostId(1),
            target: HostId(3),
            op: OpId(55),
            started_ms: 0,
        };
        s.claim_migration(&claim).unwrap().unwrap();
        assert_eq!(
            s.restart_vm(&commit(8, 1, 0, 2)).unwrap(),
            Err(RestartRefusal::Migrating(OpId(55)))
        );
        assert_eq!(
            s.vm(VmId(8)).unwrap().unwrap().placement,
            Placement::Host(HostId(1))
        );
        // Deleting a VM drops its history, not the old host's departed entry.
        s.delete_vm(VmId(7)).unwrap();
        assert_eq!(s.ha_vm(VmId(7)).unwrap(), None);
        assert_eq!(s.departed(HostId(1)).unwrap().len(), 1);
    }

    #[test]
    fn ha_records_carry_their_version() {
        let h = HaVmRecord {
            restarts: 2,
            last_restart: None,
            shared_storage: Some("x".into()),
        };
        let b = h.encode().unwrap();
        assert_eq!(b[0], HaVmRecord::VERSION);
        assert_eq!(HaVmRecord::decode(&b).unwrap(), h);
        let mut newer = b.clone();
        newer[0] = HaVmRecord::VERSION + 1;
        assert!(matches!(
            HaVmRecord::decode(&newer),
            Err(StoreError::TooNew { .. })
        ));
        let t = HaTermsRecord {
            lease_ms: 5,
            fence_time_ms: 2,
        };
        assert_eq!(HaTermsRecord::decode(&t.encode().unwrap()).unwrap(), t);
    }
}
