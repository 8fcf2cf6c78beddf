//! High availability: `/v1/ha` and releasing *held*.

use hyper::StatusCode;
use novacron_api::ha::{FencedVm, GuardState, HaOverview, HostLease, LockWait, WitnessOverview};
use novacron_api::Empty;
use novacron_shared::ids::{HostId, VmId};

use super::http::{read_json, reply, Resp};
use super::{convert, Api, ApiError, Call};
use crate::api::routes::Op;
use crate::fleet::HaStatus;

/// Handles the HA routes.
pub(super) async fn handle(api: &Api, call: Call) -> Result<Resp, ApiError> {
    if call.op == Op::ReleaseHa {
        let _: Empty = read_json(call.req).await?;
        tracing::warn!(actor = %call.actor, "HA: an operator released held");
        api.fleet.request_release();
    }
    reply(StatusCode::OK, &overview(api)?)
}

/// The fleet's HA state for the API.
fn overview(api: &Api) -> Result<HaOverview, ApiError> {
    let f = &api.fleet;
    let cfg = f.ha_config();
    let timing = cfg.timing();
    let status: HaStatus = f.ha_status();
    let hosts = f.hosts().map_err(|e| ApiError::internal(&e))?;
    let host_leases: Vec<HostLease> = hosts
        .iter()
        .filter_map(|h| {
            Some(HostLease {
                id: h.record.id,
                name: h.record.name.clone(),
                lease: convert::lease_state(h.lease?),
                fence: convert::host_fence(status.fences.get(&h.record.id)),
            })
        })
        .collect();
    let mut vms = Vec::with_capacity(status.vms.len());
    for (id, s) in &status.vms {
        vms.push(fenced_vm(api, *id, s)?);
    }
    let fencing: Vec<HostLease> = host_leases
        .iter()
        .filter(|h| status.fences.contains_key(&h.id))
        .cloned()
        .collect();
    let mut lock_waits = Vec::with_capacity(status.lock_waits.len());
    for (id, w) in &status.lock_waits {
        let rec = f.store().vm(*id).map_err(|e| ApiError::internal(&e))?;
        lock_waits.push(LockWait {
            id: *id,
            name: rec.map_or_else(String::new, |r| r.vm.spec.name),
            host: w.host,
            waiting: w.describe(),
            since_ms: w.since_ms,
        });
    }
    let w = f.witness_status();
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok(HaOverview {
        enabled: cfg.enabled,
        lease_ms: ms(timing.lease),
        fence_time_ms: ms(timing.fence_time),
        fenced_after_ms: ms(timing.fenced_after()),
        guard: match (&status.held, status.releasing) {
            (Some(_), _) => GuardState::Held,
            (None, true) => GuardState::Releasing,
            (None, false) => GuardState::Normal,
        },
        held: status.held.as_ref().map(convert::held),
        hosts: host_leases,
        vms,
        isolation: cfg.isolation,
        disk_locks: cfg.disk_locks,
        hardware_fence: cfg.hardware_fence().is_some(),
        fencing,
        lock_waits,
        witness: WitnessOverview {
            enabled: w.enabled,
            quorum: w.quorum,
            peers: w.peers as u64,
            pushes: w.pushes,
        },
    })
}

/// One VM of a fenced host, with its name and host from the store.
pub(super) fn fenced_vm(api: &Api, id: VmId, s: &crate::fleet::VmHa) -> Result<FencedVm, ApiError> {
    let rec = api.fleet.store().vm(id).map_err(|e| ApiError::internal(&e))?;
    Ok(convert::fenced_vm(
        id,
        rec.as_ref().map_or_else(String::new, |r| r.vm.spec.name.clone()),
        rec.as_ref().and_then(|r| r.host()).unwrap_or(HostId(0)),
        s,
    ))
}
