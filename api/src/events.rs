//! The event stream: `/v1/events` (server-sent events, one JSON [`Event`]
//! per `data:` line; the SSE event name is its `type`).

use novacron_shared::ids::{HostId, VmId};
use novacron_shared::protocol::VmState;
use serde::{Deserialize, Serialize};

use crate::operations::Operation;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A VM changed (created, placed, state, deleted, migrated).
    Vm,
    /// A host changed (connected, disconnected, cordoned).
    Host,
    /// An operation changed (state or progress).
    Operation,
    /// High availability: a host's lease changed, a VM was restarted on
    /// another host or lost with its host, the mass-failure guard held or
    /// released.
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

/// One fleet event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// The operation, for operation events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// The `lagged` event: the client fell behind and missed events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lagged {
    /// How many it missed.
    pub missed: u64,
}
