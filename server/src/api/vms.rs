//! VMs: create, list, show, delete, power, reboot, migrate, snapshots.

use hyper::StatusCode;
use novacron_api::operations::OperationAccepted;
use novacron_api::vms::{CreateSnapshot, CreateVm, DeletedVm, MigrateVm, VmList};
use novacron_api::ErrorCode;
use novacron_shared::ids::{HostId, VmId};
use novacron_shared::protocol::CommandKind;
use novacron_shared::spec::Power;

use super::http::{parse_id, read_json, reply, Resp};
use super::{convert, hosts, vm_error, Api, ApiError, Call};
use crate::api::routes::Op;
use crate::fleet::VmError;

/// Handles the VM routes.
pub(super) async fn handle(api: &Api, call: Call) -> Result<Resp, ApiError> {
    match call.op {
        Op::CreateVm => {
            let body: CreateVm = read_json(call.req).await?;
            let rec = api.fleet.create_vm(convert::create_vm(body)).map_err(vm_error)?;
            return reply(StatusCode::CREATED, &convert::vm(api.fleet.vm_view(rec)));
        }
        Op::ListVms => {
            let limit = call.query.number("limit", 100, 1, 1000)?;
            let after = call.query.id("after")?;
            let host = call.query.id("host")?;
            let prefix = call.query.get("name_prefix").unwrap_or("").to_string();
            return reply(StatusCode::OK, &list(api, after, host, &prefix, limit)?);
        }
        _ => {}
    }
    let id: VmId = parse_id(call.param(0))?;
    match call.op {
        Op::DeleteVm => {
            let rec = api.fleet.delete_vm(id).map_err(vm_error)?;
            reply(
                StatusCode::OK,
                &DeletedVm {
                    deleted: convert::vm_record(rec),
                },
            )
        }
        Op::StartVm | Op::StopVm | Op::SuspendVm | Op::ResumeVm => {
            let power = match call.op {
                Op::StopVm => Power::Stopped,
                Op::SuspendVm => Power::Paused,
                _ => Power::Running,
            };
            let rec = api.fleet.set_power(id, power).map_err(vm_error)?;
            reply(StatusCode::ACCEPTED, &convert::vm(api.fleet.vm_view(rec)))
        }
        Op::RebootVm => vm_command(api, id, CommandKind::Reboot { vm: id }).await,
        Op::MigrateVm => {
            let body: MigrateVm = read_json(call.req).await?;
            if let Some(h) = body.host {
                if api.fleet.host(h).map_err(|e| ApiError::internal(&e))?.is_none() {
                    return Err(hosts::no_host(h));
                }
            }
            let op = api.fleet.migrate(id, body.host, &call.actor).map_err(vm_error)?;
            reply(
                StatusCode::ACCEPTED,
                &OperationAccepted {
                    operation: convert::operation(op),
                },
            )
        }
        Op::CreateSnapshot => {
            let body: CreateSnapshot = read_json(call.req).await?;
            let name = snapshot_name(&body.name)?;
            vm_command(api, id, CommandKind::SnapshotCreate { vm: id, name }).await
        }
        Op::RevertSnapshot => {
            let name = snapshot_name(call.param(1))?;
            vm_command(api, id, CommandKind::SnapshotRevert { vm: id, name }).await
        }
        Op::DeleteSnapshot => {
            let name = snapshot_name(call.param(1))?;
            vm_command(api, id, CommandKind::SnapshotDelete { vm: id, name }).await
        }
        _ => {
            let rec = api.fleet.store().vm(id).map_err(|e| ApiError::internal(&e))?;
            match rec {
                Some(r) => reply(StatusCode::OK, &convert::vm(api.fleet.vm_view(r))),
                None => Err(vm_error(VmError::NotFound(id))),
            }
        }
    }
}

/// A page of VMs after `after`, on `host`, named with `prefix`.
fn list(
    api: &Api,
    after: Option<VmId>,
    host: Option<HostId>,
    prefix: &str,
    limit: usize,
) -> Result<VmList, ApiError> {
    let mut vms = Vec::new();
    let mut cursor = after;
    loop {
        let page = api
            .fleet
            .store()
            .vms(cursor, 1024)
            .map_err(|e| ApiError::internal(&e))?;
        let Some(last) = page.last() else { break };
        cursor = Some(last.vm.id);
        for r in page {
            if host.is_some_and(|h| r.host() != Some(h)) || !r.vm.spec.name.starts_with(prefix) {
                continue;
            }
            if vms.len() == limit {
                let next = vms.last().map(|v: &novacron_api::vms::Vm| v.vm.id);
                return Ok(VmList { vms, next });
            }
            vms.push(convert::vm(api.fleet.vm_view(r)));
        }
    }
    Ok(VmList { vms, next: None })
}

/// Runs a command on the agent of the VM's host.
async fn vm_command(api: &Api, id: VmId, kind: CommandKind) -> Result<Resp, ApiError> {
    let rec = api
        .fleet
        .store()
        .vm(id)
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(|| vm_error(VmError::NotFound(id)))?;
    let host = rec.host().ok_or_else(|| {
        vm_error(VmError::Invalid(format!(
            "VM {id} is not on a host of the fleet ({}); commands go to a host's agent",
            describe(&rec.placement)
        )))
    })?;
    hosts::command(api, host, kind).await
}

fn snapshot_name(s: &str) -> Result<String, ApiError> {
    novacron_shared::spec::check_name(s, novacron_shared::spec::MAX_NAME_LEN)
        .map(|()| s.to_string())
        .map_err(|m| ApiError::bad_request(ErrorCode::InvalidName, format!("snapshot name {m}")))
}

/// Where a VM is, in words, for errors.
fn describe(p: &novacron_shared::placement::Placement) -> String {
    use novacron_shared::placement::Placement;
    match p {
        Placement::Host(h) => format!("on host {h}"),
        Placement::Cloud { provider, instance } => format!("in {provider} as {instance}"),
        Placement::Pending { reason } => format!("pending: {reason}"),
    }
}
