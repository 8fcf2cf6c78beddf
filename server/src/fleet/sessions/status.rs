//! The host status writer: connections, last-seen times, capacities,
//! renewed certificates and disconnections go to one task that batches them
//! into redb transactions, so a fleet reconnecting at once costs a few
//! commits, not thousands.
//!
//! Owns: the host status queue. Must not touch: anything but host records.

use std::collections::HashMap;

use novacron_shared::ids::HostId;
use novacron_shared::protocol::Capacity;
use tokio::sync::mpsc;

use crate::store::{HostState, Store, StoreError};

/// A change of a host's stored status.
pub(crate) enum HostEvent {
    Connected {
        id: HostId,
        name: String,
        agent_version: String,
        address: String,
        now_ms: u64,
    },
    Seen {
        id: HostId,
        now_ms: u64,
    },
    Capacity {
        id: HostId,
        capacity: Capacity,
    },
    CertRenewed {
        id: HostId,
        serial: String,
        not_after: i64,
    },
    Disconnected {
        id: HostId,
        now_ms: u64,
    },
}

pub(super) async fn host_writer(store: Store, mut rx: mpsc::UnboundedReceiver<HostEvent>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let events = std::mem::take(&mut batch);
        let store2 = store.clone();
        let r = tokio::task::spawn_blocking(move || apply_events(&store2, events)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "persisting host status failed"),
            Err(e) => tracing::error!(error = %e, "host writer task failed"),
        }
    }
}

fn apply_events(store: &Store, events: Vec<HostEvent>) -> Result<(), StoreError> {
    let mut by_host: HashMap<HostId, Vec<HostEvent>> = HashMap::new();
    for ev in events {
        let id = match &ev {
            HostEvent::Connected { id, .. }
            | HostEvent::Seen { id, .. }
            | HostEvent::Capacity { id, .. }
            | HostEvent::CertRenewed { id, .. }
            | HostEvent::Disconnected { id, .. } => *id,
        };
        by_host.entry(id).or_default().push(ev);
    }
    // Read-modify-write inside one transaction, so a revocation committed
    // meanwhile is never overwritten by a stale copy.
    store.update_hosts(by_host.keys().copied().collect::<Vec<_>>(), |h| {
        let revoked = h.state == HostState::Revoked;
        for ev in by_host.remove(&h.id).unwrap_or_default() {
            match ev {
                HostEvent::Connected {
                    name,
                    agent_version,
                    address,
                    now_ms,
                    ..
                } => {
                    h.name = name;
                    h.agent_version = agent_version;
                    h.addresses.retain(|a| *a != address);
                    h.addresses.insert(0, address);
                    h.addresses.truncate(4);
                    h.last_seen_ms = now_ms;
                    if !revoked {
                        h.state = HostState::Online;
                    }
                }
                HostEvent::Seen { now_ms, .. } => h.last_seen_ms = h.last_seen_ms.max(now_ms),
                HostEvent::Capacity { capacity, .. } => h.capacity = capacity,
                HostEvent::CertRenewed {
                    serial, not_after, ..
                } => {
                    h.cert_serial = serial;
                    h.cert_not_after = not_after;
                }
                HostEvent::Disconnected { now_ms, .. } => {
                    h.last_seen_ms = h.last_seen_ms.max(now_ms);
                    if !revoked {
                        h.state = HostState::Offline;
                    }
                }
            }
        }
    })
}
