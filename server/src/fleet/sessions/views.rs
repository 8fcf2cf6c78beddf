//! The API's read side of the session part: each host's stored record
//! merged with its live session (capacity, last seen, labels, shared
//! storage) and its HA lease; the disk-lock waits the hosts report.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use novacron_shared::ids::HostId;

use super::{lock, Fleet, HostView, LiveSession};
use crate::store::{HostRecord, HostState, StoreError};

impl Fleet {
    /// All hosts with their live status.
    pub fn hosts(&self) -> Result<Vec<HostView>, StoreError> {
        let records = self.store.hosts()?;
        let cordons = self.store.cordons()?;
        let sessions = self.lock_sessions();
        Ok(records
            .into_iter()
            .map(|r| {
                let live = sessions.get(&r.id);
                let cordoned = cordons.contains(&r.id);
                let lease = self.lease_state(r.id);
                view(r, live, cordoned, lease)
            })
            .collect())
    }

    /// One host with its live status.
    pub fn host(&self, id: HostId) -> Result<Option<HostView>, StoreError> {
        let Some(r) = self.store.host(id)? else {
            return Ok(None);
        };
        let cordoned = self.store.cordons()?.contains(&id);
        let sessions = self.lock_sessions();
        Ok(Some(view(r, sessions.get(&id), cordoned, self.lease_state(id))))
    }

    /// By host, the VM names its latest reconcile report says wait on a
    /// disk lock held elsewhere (drift of kind `DiskLockHeld`).
    pub fn disk_lock_waits(&self) -> std::collections::BTreeMap<HostId, Vec<String>> {
        let sessions = self.lock_sessions();
        sessions
            .iter()
            .filter_map(|(h, s)| {
                let r = s.report()?;
                let names: Vec<String> = r
                    .drift
                    .into_iter()
                    .filter(|d| d.kind == novacron_shared::protocol::DriftKind::DiskLockHeld)
                    .map(|d| d.vm)
                    .collect();
                (!names.is_empty()).then_some((*h, names))
            })
            .collect()
    }
}

fn view(
    mut record: HostRecord,
    live: Option<&Arc<LiveSession>>,
    cordoned: bool,
    lease: Option<crate::ha::lease::HostState>,
) -> HostView {
    // One look at the inventory, copying only what the view shows.
    let inv = live.and_then(|s| {
        lock(&s.inventory).as_ref().map(|i| {
            (
                i.capacity,
                i.vms.len(),
                i.labels.clone(),
                i.shared_storage.clone(),
                i.disk_locks.clone(),
            )
        })
    });
    if let Some(s) = live {
        if let Some((capacity, ..)) = &inv {
            record.capacity = *capacity;
        }
        record.last_seen_ms = record.last_seen_ms.max(s.last_seen_ms.load(Ordering::Relaxed));
        if record.state != HostState::Revoked {
            record.state = HostState::Online;
        }
    }
    let (vm_count, labels, shared_storage, disk_locks) = match inv {
        Some((_, n, labels, shared, locks)) => (Some(n), labels, shared, locks),
        None => (None, Default::default(), None, None),
    };
    HostView {
        connected: live.is_some(),
        protocol_version: live.map(|s| s.version),
        vm_count,
        cordoned,
        shared_storage,
        disk_locks,
        labels,
        lease,
        record,
    }
}
