//! Conversions between the server's records and views and the API's types
//! (`novacron_api`): the handlers reply with the API's types only.

use novacron_api as api;

use crate::bus::{EventKind, FleetEvent};
use crate::fleet::{HostView, VmView};
use crate::store::{self, ApiTokenInfo, AuditRecord, OperationRecord, PlacementRules, Role, VmRecord};

/// A host with its live status.
pub fn host(v: HostView) -> api::hosts::Host {
    let r = v.record;
    api::hosts::Host {
        id: r.id,
        name: r.name,
        addresses: r.addresses,
        capacity: r.capacity,
        agent_version: r.agent_version,
        first_seen_ms: r.first_seen_ms,
        last_seen_ms: r.last_seen_ms,
        state: host_state(r.state),
        cert_serial: r.cert_serial,
        cert_not_after: r.cert_not_after,
        connected: v.connected,
        protocol_version: v.protocol_version,
        vm_count: v.vm_count.map(|n| n as u64),
        cordoned: v.cordoned,
        labels: v.labels,
        // A host the lease view does not track (revoked) holds no lease.
        lease: v.lease.map_or(api::ha::LeaseState::Suspect, lease_state),
        shared_storage: v.shared_storage,
        // The fence and the isolation response are filled by the caller,
        // which knows the HA status and config.
        fence: api::ha::HostFence::default(),
        isolation: api::ha::IsolationResponse::default(),
        disk_locks: v.disk_locks,
    }
}

/// A host's hardware fence for the API (idle when absent).
pub fn host_fence(f: Option<&crate::fleet::HostFence>) -> api::ha::HostFence {
    use crate::ha::fence::FenceStatus as S;
    use api::ha::FenceState as A;
    f.map_or_else(api::ha::HostFence::default, |f| api::ha::HostFence {
        state: match f.state {
            S::Idle => A::Idle,
            S::Fencing => A::Fencing,
            S::Off => A::Off,
            S::Failed => A::Failed,
        },
        error: f.error.clone(),
    })
}

/// A lease state for the API.
pub fn lease_state(s: crate::ha::lease::HostState) -> api::ha::LeaseState {
    use crate::ha::lease::HostState as S;
    use api::ha::LeaseState as L;
    match s {
        S::Online => L::Online,
        S::Suspect => L::Suspect,
        S::LeaseExpired => L::LeaseExpired,
        S::Fenced => L::Fenced,
        S::Returning => L::Returning,
        S::Maintenance => L::Maintenance,
    }
}

/// Why the server is held, for the API.
pub fn held(h: &crate::fleet::Held) -> api::ha::Held {
    api::ha::Held {
        since_ms: h.since_ms,
        silent: h.silent as u64,
        monitored: h.monitored as u64,
    }
}

/// One VM of a fenced host, for the API.
pub fn fenced_vm(
    id: novacron_shared::ids::VmId,
    name: String,
    host: novacron_shared::ids::HostId,
    s: &crate::fleet::VmHa,
) -> api::ha::FencedVm {
    use crate::fleet::VmHaState as S;
    use api::ha::VmHaState as A;
    api::ha::FencedVm {
        id,
        name,
        host,
        state: match s.state {
            S::Restarting => A::Restarting,
            S::Waiting => A::Waiting,
            S::Lost => A::Lost,
        },
        why: s.why.clone(),
        since_ms: s.since_ms,
    }
}

fn host_state(s: store::HostState) -> api::hosts::HostState {
    use api::hosts::HostState as H;
    match s {
        store::HostState::Enrolled => H::Enrolled,
        store::HostState::Online => H::Online,
        store::HostState::Offline => H::Offline,
        store::HostState::Revoked => H::Revoked,
    }
}

/// A host's VMs.
pub fn host_vms(v: crate::fleet::HostVms) -> api::hosts::HostVms {
    api::hosts::HostVms {
        generation: v.generation,
        desired: v.desired,
        observed: v.observed,
        report: v.report,
        events: v.events,
    }
}

/// A host's desired state.
pub fn desired(d: store::DesiredRecord) -> api::hosts::HostDesired {
    api::hosts::HostDesired {
        generation: d.generation,
        vms: d.vms,
        migrating: d.migrating,
    }
}

/// The fleet's form of one VM of a host's desired state.
pub fn vm_request(r: api::hosts::VmRequest) -> crate::fleet::VmRequest {
    crate::fleet::VmRequest {
        id: r.id,
        spec: r.spec,
        power: r.power,
    }
}

/// The fleet's form of a create request.
pub fn create_vm(r: api::vms::CreateVm) -> crate::fleet::CreateVm {
    crate::fleet::CreateVm {
        spec: r.spec,
        power: r.power,
        placement: rules_in(r.placement),
    }
}

fn rules_in(r: api::vms::PlacementRules) -> PlacementRules {
    PlacementRules {
        host: r.host,
        required_labels: r.required_labels,
        affinity: r.affinity,
        anti_affinity: r.anti_affinity,
        wait: r.wait,
        burst: r.burst,
    }
}

fn rules_out(r: PlacementRules) -> api::vms::PlacementRules {
    api::vms::PlacementRules {
        host: r.host,
        required_labels: r.required_labels,
        affinity: r.affinity,
        anti_affinity: r.anti_affinity,
        wait: r.wait,
        burst: r.burst,
    }
}

/// A VM with what its host last reported.
pub fn vm(v: VmView) -> api::vms::Vm {
    let epoch = v.record.vm.epoch;
    let name = v.record.vm.spec.name.clone();
    let host = v.record.host();
    let mut out = vm_record(v.record);
    out.observed = v.observed;
    out.ha = v.ha.map(|h| api::ha::VmHa {
        epoch,
        restarts: u64::from(h.history.restarts),
        last_restart_ms: h.history.last_restart.as_ref().map(|r| r.at_ms),
        last_restart_from: h.history.last_restart.as_ref().map(|r| r.from),
        fenced: h.status.as_ref().map(|s| {
            fenced_vm(
                out.vm.id,
                name.clone(),
                host.unwrap_or(novacron_shared::ids::HostId(0)),
                s,
            )
        }),
        waiting: h.lock_wait.map(|w| w.describe()),
    });
    out.cloud = v.cloud.map(|c| vm_cloud(c, Some(name.clone())));
    out
}

/// A stored VM (nothing observed).
pub fn vm_record(r: VmRecord) -> api::vms::Vm {
    api::vms::Vm {
        host: r.host(),
        vm: r.vm,
        placement: r.placement,
        rules: rules_out(r.rules),
        created_ms: r.created_ms,
        observed: None,
        ha: None,
        cloud: None,
    }
}

/// A VM's cloud side, with its name (absent once deleted).
pub fn vm_cloud(r: store::CloudRecord, name: Option<String>) -> api::burst::VmCloud {
    use api::burst::CloudState as A;
    use store::CloudState as S;
    let instance = r.instance;
    api::burst::VmCloud {
        vm: r.vm,
        name,
        provider: r.provider,
        launch_id: r.launch_id,
        state: match r.state {
            S::Launching => A::Launching,
            S::Running => A::Running,
            S::Stopping => A::Stopping,
            S::Stopped => A::Stopped,
            S::Starting => A::Starting,
            S::Terminating => A::Terminating,
        },
        instance: instance.as_ref().map(|i| i.id.clone()),
        instance_type: r.instance_type,
        image: r.image,
        provider_state: instance.as_ref().map(|i| i.provider_state.clone()),
        private_ip: instance.as_ref().and_then(|i| i.private_ip.clone()),
        public_ip: instance.as_ref().and_then(|i| i.public_ip.clone()),
        usd_per_hour: r.per_hour.dollars(),
        accrued_usd: r.accrued.dollars(),
        decided_ms: r.decided_ms,
        reasons: r.reasons,
        attempts: r.attempts,
        last_error: r.last_error,
        retry_at_ms: r.retry_at_ms,
        repatriation: r.repatriation.map(|p| api::burst::Repatriation {
            host: p.host,
            started_ms: p.started_ms,
            running_ms: p.running_ms,
        }),
        deleted: r.deleted,
    }
}

/// An operation.
pub fn operation(o: OperationRecord) -> api::operations::Operation {
    use api::operations::{OperationKind as K, OperationState as S};
    api::operations::Operation {
        id: o.id,
        kind: match o.kind {
            store::OperationKind::Migrate => K::Migrate,
            store::OperationKind::Drain => K::Drain,
        },
        vm: o.vm,
        host: o.host,
        target: o.target,
        state: match o.state {
            store::OperationState::Pending => S::Pending,
            store::OperationState::Running => S::Running,
            store::OperationState::Succeeded => S::Succeeded,
            store::OperationState::Failed => S::Failed,
        },
        progress: api::operations::Progress {
            percent: o.progress.percent,
            message: o.progress.message,
        },
        error: o.error,
        actor: o.actor,
        created_ms: o.created_ms,
        updated_ms: o.updated_ms,
    }
}

/// A role, API to store.
pub fn role_in(r: api::tokens::Role) -> Role {
    match r {
        api::tokens::Role::Viewer => Role::Viewer,
        api::tokens::Role::Operator => Role::Operator,
        api::tokens::Role::Admin => Role::Admin,
    }
}

/// A role, store to API.
pub fn role_out(r: Role) -> api::tokens::Role {
    match r {
        Role::Viewer => api::tokens::Role::Viewer,
        Role::Operator => api::tokens::Role::Operator,
        Role::Admin => api::tokens::Role::Admin,
    }
}

/// An API token as listed.
pub fn api_token(t: ApiTokenInfo) -> api::tokens::ApiToken {
    api::tokens::ApiToken {
        id: t.id,
        name: t.record.name,
        role: role_out(t.record.role),
        created_ms: t.record.created_ms,
    }
}

/// An audit entry.
pub fn audit(a: AuditRecord) -> api::audit::AuditEntry {
    api::audit::AuditEntry {
        seq: a.seq,
        at_ms: a.at_ms,
        actor: a.actor,
        token_id: a.token_id,
        role: role_out(a.role),
        remote: a.remote,
        method: a.method,
        path: a.path,
        status: a.status,
        outcome: a.outcome,
    }
}

/// A fleet event.
pub fn event(e: &FleetEvent) -> api::events::Event {
    api::events::Event {
        seq: e.seq,
        kind: match e.kind {
            EventKind::Vm => api::events::EventKind::Vm,
            EventKind::Host => api::events::EventKind::Host,
            EventKind::Operation => api::events::EventKind::Operation,
            EventKind::Ha => api::events::EventKind::Ha,
            EventKind::Burst => api::events::EventKind::Burst,
        },
        at_ms: e.at_ms,
        host: e.host,
        vm: e.vm,
        message: e.message.clone(),
        state: e.state,
        operation: e.operation.clone().map(operation),
    }
}

/// The API's owner kind of a metric owner.
pub fn owner_kind(o: crate::metrics::window::Owner) -> api::metrics::Owner {
    match o {
        crate::metrics::window::Owner::Host(_) => api::metrics::Owner::Host,
        crate::metrics::window::Owner::Vm(_) => api::metrics::Owner::Vm,
    }
}

fn owner_name(kind: &str) -> api::metrics::Owner {
    if kind == "host" {
        api::metrics::Owner::Host
    } else {
        api::metrics::Owner::Vm
    }
}

/// A range query's answer.
pub fn metrics_answer(
    a: crate::metrics::query::Answer,
    owner: crate::metrics::window::Owner,
) -> api::metrics::MetricsAnswer {
    api::metrics::MetricsAnswer {
        owner: owner_kind(owner),
        id: a.id,
        from_ms: a.from_ms,
        to_ms: a.to_ms,
        resolution: a.resolution.to_string(),
        series: a
            .series
            .into_iter()
            .map(|s| api::metrics::Series {
                name: s.name.to_string(),
                label_name: s.label_name.map(str::to_string),
                label: s.label,
                kind: s.kind,
                unit: s.unit,
                points: s.points,
            })
            .collect(),
    }
}

/// The latest values of every owner.
pub fn latest(owners: Vec<crate::metrics::query::LatestOwner>) -> api::metrics::LatestMetrics {
    api::metrics::LatestMetrics {
        owners: owners
            .into_iter()
            .map(|o| api::metrics::LatestOwner {
                owner: owner_name(o.owner),
                id: o.id,
                host: o.host,
                values: o
                    .values
                    .into_iter()
                    .map(|v| api::metrics::LatestValue {
                        name: v.name.to_string(),
                        label: v.label,
                        unit: v.unit,
                        ts_ms: v.ts_ms,
                        value: v.value,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// One host's metric stream.
pub fn metric_stream(
    host: novacron_shared::ids::HostId,
    r: crate::metrics::db::SeqRecord,
) -> api::metrics::MetricStream {
    api::metrics::MetricStream {
        host,
        epoch: r.epoch,
        stored_upto_seq: r.high,
        batches: r.batches,
        duplicates: r.duplicates,
        missing: r.gaps,
        agent_dropped: r.agent_dropped,
        last_stored_ms: r.last_ms,
    }
}
