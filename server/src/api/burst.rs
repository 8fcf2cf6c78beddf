//! Cloud burst: `GET /v1/burst` (the broker's caps and what is used of
//! them, every VM with a cloud side, the VMs waiting, the orphans).
//!
//! Reads the burst side's last published status only; it never calls the
//! provider. A server started without the burst side answers "disabled"
//! with the default caps.

use hyper::StatusCode;
use novacron_api::burst::{BurstBudget, BurstStatus, Orphan, PendingVm};

use super::http::{reply, Resp};
use super::{convert, Api, ApiError, Call};
use crate::burst::{cost, OrphanView, PendingView, Shared, Status};
use crate::config::BurstConfig;

/// Handles `GET /v1/burst`.
pub(super) fn handle(api: &Api, _call: &Call) -> Result<Resp, ApiError> {
    reply(
        StatusCode::OK,
        &status(api.fleet.burst().map(|b| &**b), api.clock.unix_ms()),
    )
}

/// The burst status for the API: from the burst side when there is one,
/// else "disabled" with the default caps. `now_ms` names the month when the
/// broker has not published one yet.
pub(super) fn status(shared: Option<&Shared>, now_ms: u64) -> BurstStatus {
    let Some(b) = shared else {
        let caps = BurstConfig::default().caps();
        return BurstStatus {
            enabled: false,
            provider: None,
            region: None,
            fleet: String::new(),
            budget: budget(caps, &Status::default(), now_ms),
            instances: Vec::new(),
            pending: Vec::new(),
            orphans: Vec::new(),
            total_usd: 0.0,
        };
    };
    let s = b.status();
    BurstStatus {
        enabled: b.enabled(),
        provider: b.provider.as_ref().map(|p| p.name().to_string()),
        region: b.provider.as_ref().map(|p| p.region().to_string()),
        fleet: b.fleet_tag.clone(),
        budget: budget(b.caps, &s, now_ms),
        instances: s
            .records
            .iter()
            .map(|(r, name)| convert::vm_cloud(r.clone(), name.clone()))
            .collect(),
        pending: s.pending.iter().map(pending).collect(),
        orphans: s.orphans.iter().map(orphan).collect(),
        total_usd: s.total.dollars(),
    }
}

/// The caps and their use.
fn budget(caps: crate::config::Caps, s: &Status, now_ms: u64) -> BurstBudget {
    let month = if s.month == 0 {
        cost::month_of(now_ms)
    } else {
        s.month
    };
    BurstBudget {
        max_instances: caps.instances,
        instances: s.instances,
        max_usd_per_hour: caps.per_hour.dollars(),
        usd_per_hour: s.per_hour.dollars(),
        max_usd_per_month: caps.per_month.dollars(),
        month_usd: s.month_spent.dollars(),
        month: cost::month_name(month),
    }
}

fn pending(p: &PendingView) -> PendingVm {
    PendingVm {
        vm: p.vm,
        name: p.name.clone(),
        burstable: p.burstable,
        reason: p.reason.clone(),
    }
}

fn orphan(o: &OrphanView) -> Orphan {
    Orphan {
        instance: o.instance.clone(),
        instance_type: o.instance_type.clone(),
        provider_state: o.provider_state.clone(),
        vm_tag: o.vm_tag.clone(),
        first_seen_ms: o.first_seen_ms,
        terminate_at_ms: o.terminate_at_ms,
    }
}
