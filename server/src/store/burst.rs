//! Cloud burst in the store: one record per VM that is (or is being put)
//! in a cloud provider, and the fleet's spend per calendar month.
//!
//! The launch id is committed with the record *before* the provider is
//! asked to launch ([`Store::cloud_claim`]), so a restarted server knows
//! every launch it may have started and looks its tag up before any retry.
//! Each change of where a VM runs is one transaction with its record: the
//! claim (VM pending → launching), the launch answered (→ placed in the
//! cloud), the release (→ pending again), the move home (→ placed on a host
//! while the instance still runs) and its abandonment.

use novacron_cloud::MicroUsd;
use novacron_shared::ids::{HostId, VmId};
use novacron_shared::placement::Placement;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::vms::put_vm_moved;
use super::{DesiredRecord, Record, Store, StoreError, VmRecord, VMS};

/// VM → its cloud record.
pub(super) const CLOUD_VMS: TableDefinition<u128, &[u8]> = TableDefinition::new("cloud_vms");
/// Month (`yyyymm`, UTC) → the fleet's spend in it, micro-dollars.
pub(super) const BURST_SPEND: TableDefinition<u32, u64> = TableDefinition::new("burst_spend");

/// Where a VM's instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloudState {
    /// The launch id is stored; the launch is being asked for (or looked up).
    Launching,
    /// The instance runs.
    Running,
    /// Asked to stop.
    Stopping,
    /// Stopped.
    Stopped,
    /// Asked to start again.
    Starting,
    /// Asked to terminate (the VM was deleted, repatriated or released).
    Terminating,
}

/// The instance the provider gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInstance {
    /// The provider's instance id.
    pub id: String,
    /// Its private address.
    pub private_ip: Option<String>,
    /// Its public address.
    pub public_ip: Option<String>,
    /// The provider's state name, as last described.
    pub provider_state: String,
}

/// A repatriation under way: the VM is placed on `host` and the instance
/// runs until the host's copy does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repatriation {
    /// The host it goes to.
    pub host: HostId,
    /// When the move started, Unix ms.
    pub started_ms: u64,
    /// When the host's copy was first seen running, Unix ms.
    pub running_ms: Option<u64>,
}

/// One VM's life in a cloud provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudRecord {
    /// The VM.
    pub vm: VmId,
    /// The provider's name (`aws`).
    pub provider: String,
    /// The launch decision's id: client token and `novacron:launch-id` tag.
    pub launch_id: String,
    /// Where it is.
    pub state: CloudState,
    /// The instance, once the provider named it.
    pub instance: Option<CloudInstance>,
    /// The instance type chosen.
    pub instance_type: String,
    /// The type's price per hour when chosen.
    pub per_hour: MicroUsd,
    /// The image (AMI) launched.
    pub image: String,
    /// When the burst was decided, Unix ms.
    pub decided_ms: u64,
    /// Why it burst (the scheduler's reasons).
    pub reasons: String,
    /// Cost accrued so far.
    pub accrued: MicroUsd,
    /// While billed: cost is accounted up to this instant, Unix ms.
    pub billed_until_ms: Option<u64>,
    /// When the current billed run began, Unix ms (for the one-minute
    /// minimum of a run).
    pub run_started_ms: Option<u64>,
    /// Calls tried for the current step (launch, stop, start, terminate).
    pub attempts: u32,
    /// The last error, shown on the VM until a call succeeds.
    pub last_error: Option<String>,
    /// Retry the current step at (Unix ms), after a throttle or an error.
    pub retry_at_ms: Option<u64>,
    /// When the current step began, Unix ms (for `launch_timeout`).
    pub step_started_ms: u64,
    /// A move home under way.
    pub repatriation: Option<Repatriation>,
    /// The VM was deleted: terminate, then forget the record.
    pub deleted: bool,
}

impl Record for CloudRecord {
    const TABLE: &'static str = "cloud_vms";
    const VERSION: u8 = 1;
}

/// Why a cloud transition was not committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudRefusal {
    /// The VM is gone.
    #[error("the VM no longer exists")]
    NoVm,
    /// The VM is not pending (placed meanwhile, or already bursting).
    #[error("the VM is not pending (it is {0:?})")]
    NotPending(Placement),
    /// The VM already has a cloud record.
    #[error("the VM already has a cloud launch ({0})")]
    AlreadyBursting(String),
    /// The VM has no cloud record.
    #[error("the VM has no cloud launch")]
    NoRecord,
    /// The record changed since it was read (the VM was deleted meanwhile).
    #[error("the VM's cloud record changed since it was read")]
    Changed,
}

fn decode_opt<R: Record>(v: Option<redb::AccessGuard<'_, &[u8]>>) -> Result<Option<R>, StoreError> {
    v.map(|x| R::decode(x.value())).transpose()
}

/// A VM was deleted inside `tx`: its cloud record (if any) is kept, marked
/// deleted and set to terminate.
pub(super) fn vm_deleted(tx: &redb::WriteTransaction, id: VmId) -> Result<(), StoreError> {
    let mut t = tx.open_table(CLOUD_VMS)?;
    let rec: Option<CloudRecord> = decode_opt(t.get(id.0)?)?;
    if let Some(mut r) = rec {
        r.deleted = true;
        r.state = CloudState::Terminating;
        r.attempts = 0;
        r.retry_at_ms = None;
        t.insert(id.0, r.encode()?.as_slice())?;
    }
    Ok(())
}

/// A spend to add in the same transaction as a record's update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spend {
    /// The month, `yyyymm` (UTC).
    pub month: u32,
    /// The amount.
    pub amount: MicroUsd,
}

impl Store {
    /// Every cloud record.
    pub fn cloud_records(&self) -> Result<Vec<CloudRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CLOUD_VMS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(CloudRecord::decode(row?.1.value())?);
        }
        Ok(out)
    }

    /// One VM's cloud record.
    pub fn cloud_record(&self, vm: VmId) -> Result<Option<CloudRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        decode_opt(tx.open_table(CLOUD_VMS)?.get(vm.0)?)
    }

    /// The fleet's spend in a month (`yyyymm`).
    pub fn burst_spend(&self, month: u32) -> Result<MicroUsd, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(MicroUsd(
            tx.open_table(BURST_SPEND)?.get(month)?.map_or(0, |v| v.value()),
        ))
    }

    /// The fleet's spend over every month.
    pub fn burst_spend_total(&self) -> Result<MicroUsd, StoreError> {
        let tx = self.db.begin_read()?;
        let mut total = 0u64;
        for row in tx.open_table(BURST_SPEND)?.iter()? {
            total = total.saturating_add(row?.1.value());
        }
        Ok(MicroUsd(total))
    }

    /// Commits a burst decision before the launch: the VM must still be
    /// pending with no cloud record; it stays pending with `reason`
    /// (launching …) and `rec` is stored with its launch id.
    pub fn cloud_claim(
        &self,
        rec: &CloudRecord,
        reason: String,
    ) -> Result<Result<(), CloudRefusal>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut vms = tx.open_table(VMS)?;
            let Some(mut v) = decode_opt::<VmRecord>(vms.get(rec.vm.0)?)? else {
                return Ok(Err(CloudRefusal::NoVm));
            };
            if !matches!(v.placement, Placement::Pending { .. }) {
                return Ok(Err(CloudRefusal::NotPending(v.placement)));
            }
            let mut cloud = tx.open_table(CLOUD_VMS)?;
            if let Some(old) = decode_opt::<CloudRecord>(cloud.get(rec.vm.0)?)? {
                return Ok(Err(CloudRefusal::AlreadyBursting(old.launch_id)));
            }
            v.placement = Placement::Pending { reason };
            vms.insert(rec.vm.0, v.encode()?.as_slice())?;
            cloud.insert(rec.vm.0, rec.encode()?.as_slice())?;
        }
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Replaces the record `old` (compare-and-set: it must be stored
    /// exactly so, or the update is refused with `Changed`) by `rec`,
    /// adding `spend` to its month, and sets the VM's placement to
    /// `placement` when given (the VM may be gone: then only the record is
    /// written). Returns the host the VM was placed on and its desired state.
    pub fn cloud_update(
        &self,
        old: &CloudRecord,
        rec: &CloudRecord,
        spend: Option<Spend>,
        placement: Option<Placement>,
    ) -> Result<Result<Option<(HostId, DesiredRecord)>, CloudRefusal>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut moved_to = None;
        {
            let mut cloud = tx.open_table(CLOUD_VMS)?;
            match decode_opt::<CloudRecord>(cloud.get(rec.vm.0)?)? {
                Some(now) if now == *old => {}
                Some(_) => return Ok(Err(CloudRefusal::Changed)),
                None => return Ok(Err(CloudRefusal::NoRecord)),
            }
            cloud.insert(rec.vm.0, rec.encode()?.as_slice())?;
            if let Some(s) = spend.filter(|s| s.amount.0 > 0) {
                let mut t = tx.open_table(BURST_SPEND)?;
                let old = t.get(s.month)?.map_or(0, |v| v.value());
                t.insert(s.month, old.saturating_add(s.amount.0))?;
            }
            if let Some(p) = placement {
                let vm: Option<VmRecord> = decode_opt(tx.open_table(VMS)?.get(rec.vm.0)?)?;
                if let Some(mut v) = vm {
                    if v.placement != p {
                        v.placement = p;
                        v.vm.op_id = novacron_shared::ids::OpId::random();
                        if put_vm_moved(&tx, &v)?.is_err() {
                            return Ok(Err(CloudRefusal::NoVm));
                        }
                        moved_to = v.host();
                    }
                }
            }
        }
        tx.commit()?;
        match moved_to {
            Some(h) => Ok(Ok(Some((h, self.desired(h)?.unwrap_or_default())))),
            None => Ok(Ok(None)),
        }
    }

    /// Forgets the record `old` (compare-and-set, as in
    /// [`Self::cloud_update`]; its instance is gone), adding `spend`; the
    /// VM, if it still exists and `pending` is given, becomes pending with
    /// that reason. Returns the host the VM left, if it was on one.
    pub fn cloud_forget(
        &self,
        old: &CloudRecord,
        spend: Option<Spend>,
        pending: Option<String>,
    ) -> Result<Result<Option<HostId>, CloudRefusal>, StoreError> {
        let vm = old.vm;
        let tx = self.db.begin_write()?;
        let mut left = None;
        {
            let mut cloud = tx.open_table(CLOUD_VMS)?;
            match decode_opt::<CloudRecord>(cloud.get(vm.0)?)? {
                Some(now) if now == *old => {}
                Some(_) => return Ok(Err(CloudRefusal::Changed)),
                None => return Ok(Err(CloudRefusal::NoRecord)),
            }
            cloud.remove(vm.0)?;
            if let Some(s) = spend.filter(|s| s.amount.0 > 0) {
                let mut t = tx.open_table(BURST_SPEND)?;
                let old = t.get(s.month)?.map_or(0, |v| v.value());
                t.insert(s.month, old.saturating_add(s.amount.0))?;
            }
            if let Some(reason) = pending {
                let v: Option<VmRecord> = decode_opt(tx.open_table(VMS)?.get(vm.0)?)?;
                if let Some(mut v) = v {
                    left = v.host();
                    v.placement = Placement::Pending { reason };
                    if put_vm_moved(&tx, &v)?.is_err() {
                        return Ok(Err(CloudRefusal::NoVm));
                    }
                }
            }
        }
        tx.commit()?;
        Ok(Ok(left))
    }
}

impl Store {
    /// Places a waiting VM on `host` (compare-and-set: it must still be
    /// pending, with no cloud record), with a new operation id. Returns the
    /// VM as stored and the host's desired state.
    pub fn place_pending(
        &self,
        vm: VmId,
        host: HostId,
        op_id: novacron_shared::ids::OpId,
    ) -> Result<Result<(VmRecord, DesiredRecord), CloudRefusal>, StoreError> {
        let tx = self.db.begin_write()?;
        let v = {
            let Some(mut v) = decode_opt::<VmRecord>(tx.open_table(VMS)?.get(vm.0)?)? else {
                return Ok(Err(CloudRefusal::NoVm));
            };
            if !matches!(v.placement, Placement::Pending { .. }) {
                return Ok(Err(CloudRefusal::NotPending(v.placement)));
            }
            if let Some(r) = decode_opt::<CloudRecord>(tx.open_table(CLOUD_VMS)?.get(vm.0)?)? {
                return Ok(Err(CloudRefusal::AlreadyBursting(r.launch_id)));
            }
            v.placement = Placement::Host(host);
            v.vm.op_id = op_id;
            if put_vm_moved(&tx, &v)?.is_err() {
                return Ok(Err(CloudRefusal::NoVm));
            }
            v
        };
        tx.commit()?;
        Ok(Ok((v, self.desired(host)?.unwrap_or_default())))
    }
}

impl Store {
    /// Sets a pending VM's reason (only while it is pending; `false` when
    /// it is not, or gone).
    pub fn set_pending_reason(&self, vm: VmId, reason: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut vms = tx.open_table(VMS)?;
            let Some(mut v) = decode_opt::<VmRecord>(vms.get(vm.0)?)? else {
                return Ok(false);
            };
            match &v.placement {
                Placement::Pending { reason: r } if r != reason => {}
                _ => return Ok(false),
            }
            v.placement = Placement::Pending {
                reason: reason.to_string(),
            };
            vms.insert(vm.0, v.encode()?.as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
