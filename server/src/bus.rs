//! The fleet's event stream: VM, host, operation and HA events, numbered, for
//! the API's server-sent events. Publishing never blocks; a subscriber
//! that falls behind by more than [`BUS_CAPACITY`] events is told how many
//! it missed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use novacron_shared::clock::Clock;
use novacron_shared::ids::{HostId, VmId};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::store::OperationRecord;

/// Events kept for slow subscribers.
pub const BUS_CAPACITY: usize = 4096;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A VM changed (created, placed, state, deleted, migrated).
    Vm,
    /// A host changed (connected, disconnected, cordoned).
    Host,
    /// An operation changed (state or progress).
    Operation,
    /// High availability: a host fenced or returned, a VM restarted
    /// elsewhere or waiting, the server held or released.
    Ha,
    /// Cloud burst: a VM burst, came home or its instance vanished; an
    /// orphan instance; a budget at 80 % or 100 %.
    Burst,
}

impl EventKind {
    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::Host => "host",
            Self::Operation => "operation",
            Self::Ha => "ha",
            Self::Burst => "burst",
        }
    }
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct FleetEvent {
    /// Increases by one per event (per server run).
    pub seq: u64,
    /// What it is about.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When, Unix ms.
    pub at_ms: u64,
    /// The host concerned.
    pub host: Option<HostId>,
    /// The VM concerned.
    pub vm: Option<VmId>,
    /// What happened, for people.
    pub message: String,
    /// The VM's state after a libvirt event, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<novacron_shared::protocol::VmState>,
    /// The operation, for operation events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationRecord>,
}

/// The publisher side.
#[derive(Debug)]
pub struct Bus {
    tx: broadcast::Sender<Arc<FleetEvent>>,
    seq: AtomicU64,
    clock: Clock,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new(Clock::system())
    }
}

impl Bus {
    /// A bus that stamps events with `clock`'s wall time.
    pub fn new(clock: Clock) -> Self {
        Self {
            tx: broadcast::channel(BUS_CAPACITY).0,
            seq: AtomicU64::new(1),
            clock,
        }
    }

    /// Publishes an event (dropped when nobody listens), numbered and
    /// stamped now.
    pub fn publish(&self, mut ev: FleetEvent) {
        ev.seq = self.seq.fetch_add(1, Ordering::Relaxed);
        ev.at_ms = self.clock.unix_ms();
        let _ = self.tx.send(Arc::new(ev));
    }

    /// A VM event.
    pub fn vm(&self, host: Option<HostId>, vm: VmId, message: String) {
        self.publish(FleetEvent::new(EventKind::Vm, host, Some(vm), message));
    }

    /// A host event.
    pub fn host(&self, host: HostId, message: String) {
        self.publish(FleetEvent::new(EventKind::Host, Some(host), None, message));
    }

    /// An HA event about a host and/or a VM.
    pub fn ha(&self, host: Option<HostId>, vm: Option<VmId>, message: String) {
        self.publish(FleetEvent::new(EventKind::Ha, host, vm, message));
    }

    /// A cloud burst event about a VM, or the fleet.
    pub fn burst(&self, vm: Option<VmId>, message: String) {
        self.publish(FleetEvent::new(EventKind::Burst, None, vm, message));
    }

    /// An operation event.
    pub fn operation(&self, op: &OperationRecord) {
        let mut ev = FleetEvent::new(EventKind::Operation, op.host, op.vm, op.progress.message.clone());
        if let Some(e) = &op.error {
            ev.message = e.clone();
        }
        ev.operation = Some(op.clone());
        self.publish(ev);
    }

    /// A new subscription, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FleetEvent>> {
        self.tx.subscribe()
    }
}

impl FleetEvent {
    /// An event (its `seq` and `at_ms` are set when published).
    pub fn new(kind: EventKind, host: Option<HostId>, vm: Option<VmId>, message: String) -> Self {
        Self {
            seq: 0,
            kind,
            at_ms: 0,
            host,
            vm,
            message,
            state: None,
            operation: None,
        }
    }

    /// Whether it concerns `host` / `vm` (a filter left empty matches all).
    pub fn matches(&self, host: Option<HostId>, vm: Option<VmId>) -> bool {
        host.is_none_or(|h| {
            self.host == Some(h) || self.operation.as_ref().is_some_and(|o| o.target == Some(h))
        }) && vm.is_none_or(|v| self.vm == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_numbered_events_and_filters_apply() {
        let bus = Bus::default();
        let mut rx = bus.subscribe();
        bus.host(HostId(1), "connected".into());
        bus.vm(Some(HostId(2)), VmId(7), "started".into());
        let a = rx.recv().await.expect("first");
        let b = rx.recv().await.expect("second");
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(a.kind, EventKind::Host);
        assert!(a.matches(Some(HostId(1)), None));
        assert!(!a.matches(Some(HostId(2)), None));
        assert!(b.matches(None, Some(VmId(7))));
        assert!(!b.matches(None, Some(VmId(8))));
        let json = serde_json::to_value(&*b).expect("json");
        assert_eq!(json["type"], "vm");
        assert_eq!(json["message"], "started");
        bus.ha(Some(HostId(3)), Some(VmId(9)), "restarted".into());
        let c = rx.recv().await.expect("third");
        assert_eq!((c.kind, c.kind.as_str()), (EventKind::Ha, "ha"));
        assert!(c.matches(Some(HostId(3)), Some(VmId(9))));
        assert_eq!(serde_json::to_value(&*c).expect("json")["type"], "ha");
    }
}
