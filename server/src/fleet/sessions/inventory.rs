//! The session part's check of an agent's inventory: every value that
//! steers placement, reaches other hosts or the API is checked before it
//! is kept (bad ones are dropped with a rate-limited warning), then the
//! HA part hears of the disk lock space and the witness address.

use novacron_shared::ids::HostId;
use novacron_shared::protocol::Inventory;

use super::status::HostEvent;
use super::{Fleet, LiveSession, MAX_STORAGE_ID};
use crate::warn_limited;

impl Fleet {
    /// `host_id`'s agent sent `inv` on `session`.
    pub(super) fn inventory(&self, host_id: HostId, session: &LiveSession, mut inv: Inventory) {
        // The migration URI is handed to other hosts' libvirtd and
        // labels steer placement: only checked values are kept.
        if let Some(u) = inv.migration_uri.as_deref() {
            if let Err(e) = novacron_shared::spec::check_libvirt_uri(u) {
                warn_limited!(self.sessions.limiter, host_id = %host_id, error = %e, "inventory's migration URI ignored");
                inv.migration_uri = None;
            }
        }
        // The shared storage identity steers HA placement and
        // is shown in the API: a pool directory, checked.
        if let Some(p) = inv.shared_storage.as_deref() {
            if let Err(e) = novacron_shared::spec::check_path(p) {
                warn_limited!(self.sessions.limiter, host_id = %host_id, error = %e, "inventory's shared storage ignored");
                inv.shared_storage = None;
            }
        }
        let before = inv.labels.len();
        inv.labels
            .retain(|k, v| novacron_shared::spec::check_label(k, v).is_ok());
        if inv.labels.len() > novacron_shared::spec::MAX_HOST_LABELS {
            inv.labels.clear();
        }
        if inv.labels.len() != before {
            warn_limited!(self.sessions.limiter, host_id = %host_id, reported = before, kept = inv.labels.len(), "inventory's invalid host labels ignored");
        }
        let _ = self.sessions.events.send(HostEvent::Capacity {
            id: host_id,
            capacity: inv.capacity,
        });
        if let Some(pool) = inv.shared_storage.as_deref() {
            if pool.is_empty() || pool.len() > MAX_STORAGE_ID || pool.chars().any(char::is_control) {
                warn_limited!(self.sessions.limiter, host_id = %host_id, "inventory's shared storage identity ignored (empty, control characters or too long)");
                inv.shared_storage = None;
            }
        }
        tracing::debug!(host_id = %host_id, vms = inv.vms.len(), "inventory");
        let witness = inv.witness.filter(|a| !a.ip().is_unspecified() && a.port() != 0);
        if inv.witness.is_some() && witness.is_none() {
            warn_limited!(self.sessions.limiter, host_id = %host_id, "inventory's witness address ignored (unspecified address or port 0)");
        }
        inv.witness = witness;
        if let Some(l) = inv.disk_locks.as_deref() {
            if let Err(e) = novacron_shared::spec::check_path(l) {
                warn_limited!(self.sessions.limiter, host_id = %host_id, error = %e, "inventory's disk lock space ignored");
                inv.disk_locks = None;
            }
        }
        self.note_lock_space(host_id, inv.disk_locks.clone());
        *session.inventory.lock().unwrap_or_else(|p| p.into_inner()) = Some(inv);
        self.witness_address(host_id, witness);
        self.bump_lease_changes();
    }
}
